"""PyTorch interop: PEFT adapters out (and back), the reference implementation's checkpoints in and out."""

from d2l_jax.export.peft import load_peft_adapter, save_peft
from d2l_jax.export.reference import (
    KeyMapping,
    ReferenceFormatError,
    check_expressible,
    read_reference_checkpoint,
    reference_table,
    write_reference_checkpoint,
)
from d2l_jax.export.torch_checkpoint import TorchCheckpointError, UnsafeCheckpointError

__all__ = [
    "KeyMapping",
    "ReferenceFormatError",
    "TorchCheckpointError",
    "UnsafeCheckpointError",
    "check_expressible",
    "load_peft_adapter",
    "read_reference_checkpoint",
    "reference_table",
    "save_peft",
    "write_reference_checkpoint",
]
