"""zerockpt: fast, safe PyTorch checkpoints in the safetensors format.

Files are byte-for-byte safetensors: written zero-copy from tensor memory by several threads,
atomically (temporary file + rename) and durably (fsync), and loaded as zero-copy views of a
private memory mapping.

>>> import torch, zerockpt
>>> zerockpt.save({"w": torch.ones(2, 3)}, "model.safetensors")
>>> zerockpt.load("model.safetensors")["w"].shape
torch.Size([2, 3])
"""

import importlib
from typing import TYPE_CHECKING, Any

import torch  # noqa: F401  (loads libtorch before the extension that links it)

# A clear ImportError when the installed torch is not the one _C was built for, then loads _C.
from zerockpt import _torch_abi  # noqa: F401  (isort: keep before _C)
from zerockpt._C import ChecksumError, FormatError
from zerockpt.checkpoint import Checkpointer, PendingSave, release_snapshot_buffer, save_async
from zerockpt.module_state import load_state_dict, state_dict
from zerockpt.serialization import (
    TensorFile,
    TensorInfo,
    VerifyResult,
    load,
    load_bytes,
    open,
    save,
    save_bytes,
    verify,
)

if TYPE_CHECKING:
    from zerockpt.distributed import DistributedCheckpointer

__all__ = [
    "Checkpointer",
    "ChecksumError",
    "DistributedCheckpointer",
    "FormatError",
    "PendingSave",
    "TensorFile",
    "TensorInfo",
    "VerifyResult",
    "load",
    "load_bytes",
    "load_state_dict",
    "open",
    "release_snapshot_buffer",
    "save",
    "save_async",
    "save_bytes",
    "state_dict",
    "verify",
]
__version__ = "0.1.0"

# Imported on first use, so that ``import zerockpt`` stays free of torch.distributed.checkpoint:
# ``zerockpt.dcp.Writer`` works without ``import zerockpt.dcp``.
_LAZY_SUBMODULES = ("accelerate", "dcp", "distributed", "lightning", "safetensors", "transformers")


def __getattr__(name: str) -> Any:
    if name == "DistributedCheckpointer":
        from zerockpt.distributed import DistributedCheckpointer

        return DistributedCheckpointer
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_SUBMODULES, "DistributedCheckpointer"})
