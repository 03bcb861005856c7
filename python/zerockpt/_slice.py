"""``get_slice``: safetensors' lazy slicing of one stored tensor (``PySafeSlice``).

A :class:`TensorSlice` holds a zero-copy view of the tensor in a private mapping of the file;
indexing it is torch's own basic and advanced indexing of that view, exactly as safetensors 0.8
does for ``framework="pt"``, so results, views and errors (``IndexError``, ``ValueError``,
``TypeError``) are torch's. Nothing is read when the slice is made or indexed: the pages that
hold the selected elements are read when the result is first touched, so two rows of a 256 MiB
tensor cost a few pages, not the tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from zerockpt import _C


class TensorSlice:
    """One tensor of a file, to be sliced lazily: ``f.get_slice(name)[0:2, ::2]``.

    The same interface as safetensors' ``PySafeSlice``: :meth:`get_shape`, :meth:`get_dtype`
    and indexing. It stays usable after the file is closed.
    """

    __slots__ = ("_convert", "_dtype", "_shape", "_view")

    def __init__(
        self,
        view: torch.Tensor,
        format_dtype: str,
        shape: list[int],
        convert: Callable[[torch.Tensor], Any] | None = None,
    ) -> None:
        self._view = view
        self._dtype = format_dtype
        self._shape = shape
        self._convert = convert

    def get_shape(self) -> list[int]:
        """The tensor's shape as the header gives it (a new list each call)."""
        return list(self._shape)

    def get_dtype(self) -> str:
        """The dtype as the file names it, e.g. ``"F32"``, ``"BF16"``."""
        return self._dtype

    def __getitem__(self, index: Any) -> Any:
        """The selected part: ints, slices (positive steps), Ellipsis, None, index lists.

        Returns:
            A tensor as ``tensor[index]`` gives it for the whole tensor (a view of the mapped
            file on the CPU), moved to the handle's device (or converted to its framework).

        Raises:
            IndexError, ValueError, TypeError: As torch raises them for the same index.
        """
        out = self._view[index]
        return out if self._convert is None else self._convert(out)

    def __repr__(self) -> str:
        return f"<zerockpt.TensorSlice {self._dtype} {self._shape}>"


def get_slice(
    handle: _C._File, name: str, convert: Callable[[torch.Tensor], Any] | None = None
) -> TensorSlice:
    """A :class:`TensorSlice` of tensor ``name`` of ``handle`` (KeyError if it has none)."""
    fmt, shape, _, _, _ = handle.info(name)
    return TensorSlice(handle.get_tensor(name, True), fmt, list(shape), convert)
