"""``safetensors.numpy`` on zerockpt: dicts of numpy arrays <-> safetensors files and bytes.

Arrays are written through :mod:`zerockpt.safetensors.torch` (big-endian arrays are stored
little-endian, as safetensors does; arrays sharing memory are stored as copies, as
safetensors.numpy stores them) and come back as numpy arrays.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from zerockpt.safetensors import torch as st_torch

__all__ = ["load", "load_file", "save", "save_file"]


def _to_torch(tensors: Any) -> dict[str, torch.Tensor]:
    if not isinstance(tensors, dict):
        raise ValueError(f"Expected a dict of [str, np.ndarray] but received {type(tensors)}")
    out = {}
    for name, array in tensors.items():
        if not isinstance(array, np.ndarray):
            raise ValueError(
                f"Key `{name}` is invalid, expected np.ndarray but received {type(array)}"
            )
        array = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
        out[name] = torch.from_numpy(array)
    return out


def _to_numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: t.numpy() for name, t in tensors.items()}


def save(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors bytes of a dict of arrays."""
    return st_torch._save(_to_torch(tensors), metadata, copy_shared=True)


def save_file(
    tensors: dict[str, np.ndarray],
    filename: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
) -> None:
    """Saves a dict of arrays into ``filename`` (atomic and durable, as zerockpt saves)."""
    st_torch._save_file(_to_torch(tensors), filename, metadata, copy_shared=True)


def load(data: bytes) -> dict[str, np.ndarray]:
    """Loads safetensors bytes into a dict of arrays."""
    return _to_numpy(st_torch.load(data))


def load_file(filename: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Loads a safetensors file into a dict of arrays."""
    return _to_numpy(st_torch.load_file(filename))
