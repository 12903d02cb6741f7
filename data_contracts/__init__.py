"""ruyi-pipeline: data_contracts."""
