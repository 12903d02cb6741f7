"""The pipeline: one module per DVC stage (`python -m tasks.<stage>`) and the libraries they share.

Stages: prepare_data validate_data tokenizer cpt expand sft rl compress evaluate gates export deploy.
Libraries: tasks/core (params, stage contract, files), tasks/data, tasks/training, tasks/release.
A stage never imports another stage; choices and their reasons: docs/choices.md.
"""
