"""Infrastructure every stage shares: params schema, stage contract, files, paths, artifacts, code deps."""
