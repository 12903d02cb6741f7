"""The pipeline: one module per DVC stage (`python -m tasks.<stage>`) and the libraries they share.

Stages: prepare_data validate_data tokenizer cpt family_sft expand sft rl compress evaluate route gates
export deploy (the vision-language profile adds privacy).
Libraries: tasks/core (params, stage contract, files), tasks/data, tasks/training, tasks/release.
A stage never imports another stage; choices and their reasons: docs/choices.md.
"""

from tasks.core.cpus import pin_cpu_kernels

# Before any stage imports torch or numpy: the same CPU kernels on every x86-64-v3 machine, so outputs are
# the same bits on CPUs with and without AVX-512 (docs/choices.md, "Bits across machines").
pin_cpu_kernels()
