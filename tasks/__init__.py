"""The pipeline: one module per DVC stage (`python -m tasks.<stage>`) and the libraries they share.

Stages: prepare_data validate_data tokenizer cpt family_sft expand sft rl compress evaluate route gates
export deploy (the vision-language profile adds privacy).
Libraries: tasks/core (params, stage contract, files), tasks/data, tasks/training, tasks/release.
A stage never imports another stage; choices and their reasons: docs/choices.md.
"""
