"""ruyi-pipeline: flows."""
