"""ruyi-pipeline: tasks."""
