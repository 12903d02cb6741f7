"""megatron-core backend of the family: the model on TP x PP ranks and HF <-> megatron conversion.

    convert_hf_to_mcore(family_dir, out_dir, tp=2, pp=2)   # file level, no process group
    convert_mcore_to_hf(mcore_dir, out_dir)                # exact inverse (bitwise)
    # on each rank, after torch.distributed.init_process_group:
    init_parallel(tp=2, pp=2); model = load_model(out_dir)  # FamilialGPTModel of this rank's stage
    # training with megatron's DDP, optimizer and pipeline schedules: ruyi_model.megatron.train
    # (also `torchrun --nproc_per_node N -m ruyi_model.megatron.train ...`)

The converters (ruyi_model.megatron.convert) and the layout rules (layout) import no megatron code;
the model (model), imported lazily from here, needs megatron-core; on a machine without CUDA it runs
on CPU/gloo through cpu_shim.
"""

from ruyi_model.megatron.convert import convert_hf_to_mcore, convert_mcore_to_hf, read_split
from ruyi_model.megatron.layout import SplitLayout, check_split

_MODEL_NAMES = (
    "FamilialGPTModel",
    "build_model",
    "load_model",
    "init_parallel",
    "transformer_config",
    "familial_loss_func",
    "set_exit_loss_scale",
)


def __getattr__(name):
    if name in _MODEL_NAMES:
        from ruyi_model.megatron import model

        return getattr(model, name)
    raise AttributeError(f"module 'ruyi_model.megatron' has no attribute {name!r}")


__all__ = [
    "convert_hf_to_mcore",
    "convert_mcore_to_hf",
    "read_split",
    "check_split",
    "SplitLayout",
    *_MODEL_NAMES,
]
