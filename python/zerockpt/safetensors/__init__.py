"""The safetensors API on zerockpt: switching is one import line.

>>> from zerockpt.safetensors import safe_open  # was: from safetensors import ...
>>> from zerockpt.safetensors.torch import save_file, load_file  # was: safetensors.torch

Also reachable as ``zerockpt.safetensors.save_file`` etc. (``from zerockpt import safetensors
as st``). Same names, signatures, return values and exceptions as safetensors 0.8
(``safetensors`` and ``safetensors.torch``; ``safetensors.numpy`` is
:mod:`zerockpt.safetensors.numpy`), on zerockpt's reader and writer:

- Files are ordinary safetensors files that safetensors reads (and the reverse). Saves are
  atomic (temporary file + rename) and durable (fsync), as :func:`zerockpt.save`; zerockpt
  records ``"format": "pt"`` and its own ``zerockpt.*`` entries in ``__metadata__``, which
  :meth:`safe_open.metadata` leaves out, so it returns exactly what was given to ``save_file``
  (``None`` if nothing was).
- What safetensors refuses, this refuses too, with the same exception types: non-contiguous
  tensors, tensors sharing memory (use :func:`save_model`), sparse or meta tensors.
- :func:`save_model` and :func:`load_model` handle tied weights as safetensors does: one name
  of each tied group is stored (the one safetensors would keep), so files are
  interchangeable both ways.

Not supported: frameworks other than torch and numpy (``tf``, ``flax``, ``mlx``, ``paddle``);
``backend="pread"`` is accepted and reads through the same mapping.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import torch as _torch  # not "torch": the submodule zerockpt.safetensors.torch takes that name

from zerockpt import _C, _slice

__version__ = "0.8.0"

# The metadata entry zerockpt.safetensors' writers add: the user's metadata keys as a JSON list,
# or JSON null when none was given, so readers tell them from zerockpt's own "format": "pt".
USER_METADATA_KEY = _C.RESERVED_PREFIX + "user_metadata"

_TORCH_FRAMEWORKS = ("pt", "torch", "pytorch")
_NUMPY_FRAMEWORKS = ("np", "numpy")
_OTHER_FRAMEWORKS = ("tf", "tensorflow", "flax", "jax", "mlx", "paddle", "paddlepaddle")


class SafetensorError(Exception):
    """Raised where safetensors raises its ``SafetensorError``: a malformed file, a name the
    file does not hold, a closed handle, an invalid framework or device."""


def _check_framework(framework: Any) -> str:
    if not isinstance(framework, str):
        raise TypeError(
            f"argument 'framework': '{type(framework).__name__}' object is not an instance of 'str'"
        )
    if framework in _TORCH_FRAMEWORKS or framework in _NUMPY_FRAMEWORKS:
        return framework
    if framework in _OTHER_FRAMEWORKS:
        raise SafetensorError(
            f"framework {framework} is not supported by zerockpt.safetensors (torch and numpy only)"
        )
    raise SafetensorError(f"framework {framework} is invalid")


def parse_device(device: Any) -> _torch.device:
    """The device a safetensors ``device=`` argument names: ``"cpu"``, an accelerator name
    (``"cuda"``, ``"cuda:1"``, ``"xpu"``...), a device index, or a ``_torch.device``.

    Raises:
        SafetensorError: ``device`` is not one of those (safetensors' message).
        RuntimeError: The device is not available, or an index is given and torch has no
            accelerator.
    """
    if device is None:
        return _torch.device("cpu")
    if isinstance(device, _torch.device):
        dev = device
    elif isinstance(device, int) and not isinstance(device, bool):
        if device < 0:
            raise SafetensorError(f"device {device} is invalid")
        return _torch.device(device)  # the current accelerator; RuntimeError if there is none
    elif isinstance(device, str):
        try:
            dev = _torch.device(device)
        except RuntimeError:
            raise SafetensorError(f"device {device} is invalid") from None
        # safetensors takes "cpu" but not "cpu:0".
        if dev.type == "cpu" and device != "cpu":
            raise SafetensorError(f"device {device} is invalid")
    else:
        raise SafetensorError(f"device {device!r} is invalid")
    if dev.type == "meta":
        raise SafetensorError(f"device {device} is invalid")
    backend = getattr(_torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if dev.type != "cpu" and callable(available) and not available():
        raise RuntimeError(f"device {device} is not available (torch.{dev.type}.is_available())")
    return dev


def _open_file(filename: Any) -> _C._File:
    """``_C._File(filename)`` with safetensors' exceptions for a missing or malformed file."""
    if not isinstance(filename, str | os.PathLike):
        raise TypeError(
            f"argument 'filename': '{type(filename).__name__}' object cannot be converted to "
            "'PyString'"
        )
    path = os.fspath(filename)
    try:
        return _C._File(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"No such file or directory: {path}") from None
    except _C.FormatError as e:
        raise SafetensorError(f"Error while deserializing header: {e}") from e


def file_metadata(handle: _C._File) -> dict[str, str] | None:
    """The header's ``__metadata__`` as safetensors returns it: None if the header has none.

    For a file zerockpt wrote, its own entries are left out: the ``zerockpt.*`` ones and the
    ``"format": "pt"`` it adds; what :func:`save_file` was given comes back.
    """
    entries = handle.metadata()
    if not entries:
        return {} if _header_has_metadata(handle) else None
    user = entries.get(USER_METADATA_KEY)
    if user is not None:
        try:
            keys = json.loads(user)
        except ValueError:
            keys = None
        if keys is None:
            return None
        return {k: entries[k] for k in entries if k in set(keys)}
    if _C.RESERVED_PREFIX + "version" in entries:  # zerockpt.save: keep "format", drop its own
        return {k: v for k, v in entries.items() if not k.startswith(_C.RESERVED_PREFIX)}
    return entries


def _header_has_metadata(handle: _C._File) -> bool:
    """Whether the (already validated) header holds a ``__metadata__`` entry, even empty."""
    with open(handle.path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = f.read(size)
    try:
        return "__metadata__" in json.loads(header)
    except ValueError:
        return False


class safe_open:
    """Opens a safetensors file lazily, as ``safetensors.safe_open``.

    >>> with safe_open("model.safetensors", framework="pt", device="cpu") as f:
    ...     w = f.get_tensor("w")
    ...     shard = f.get_slice("w")[0:1024]

    Args:
        filename: A safetensors file (str or ``os.PathLike``).
        framework: ``"pt"`` (also ``"torch"``, ``"pytorch"``) for torch tensors, ``"np"`` or
            ``"numpy"`` for numpy arrays.
        device: ``"cpu"`` (default), an accelerator (``"cuda"``, ``"cuda:1"``, a device index),
            or a ``_torch.device``.
        backend: safetensors' ``"mmap"`` or ``"pread"``: both read through zerockpt's mapping.

    Raises:
        FileNotFoundError: ``filename`` does not exist.
        SafetensorError: The header is not valid safetensors; ``framework`` or ``device`` is
            invalid.
        TypeError: ``framework`` is not a str.
    """

    def __init__(
        self, filename: Any, framework: Any, device: Any = "cpu", *, backend: str = "mmap"
    ) -> None:
        self._framework = _check_framework(framework)
        self._device = parse_device(device)
        if backend not in ("mmap", "pread"):
            raise SafetensorError(f"backend {backend} is invalid")
        self._file: _C._File | None = _open_file(filename)

    def _handle(self) -> _C._File:
        if self._file is None:
            raise SafetensorError("File is closed")
        return self._file

    def _convert(self, tensor: _torch.Tensor) -> Any:
        if self._framework in _NUMPY_FRAMEWORKS:
            return tensor.numpy()
        if self._device.type != "cpu":
            return tensor.to(self._device)
        return tensor

    def _check_name(self, handle: _C._File, name: str) -> None:
        try:
            handle.info(name)
        except KeyError:
            raise SafetensorError(f"File does not contain tensor {name}") from None

    def keys(self) -> list[str]:
        """The tensor names, sorted (as safetensors lists them)."""
        return sorted(self._handle().keys())

    def offset_keys(self) -> list[str]:
        """The tensor names in the order of their bytes in the file."""
        handle = self._handle()
        return sorted(handle.keys(), key=lambda name: (handle.info(name)[2], name))

    def metadata(self) -> dict[str, str] | None:
        """The header's ``__metadata__``, or None if it has none (see :func:`file_metadata`)."""
        return file_metadata(self._handle())

    def get_tensor(self, name: str) -> Any:
        """One tensor, on the handle's device (CPU: a view of the mapped file)."""
        handle = self._handle()
        self._check_name(handle, name)
        return self._convert(handle.get_tensor(name, True))

    def get_tensors(self) -> dict[str, Any]:
        """Every tensor, by name, in the order of :meth:`offset_keys`."""
        return {name: self.get_tensor(name) for name in self.offset_keys()}

    def get_slice(self, name: str) -> _slice.TensorSlice:
        """A lazily sliced tensor: ``f.get_slice("w")[0:2]`` reads only the pages it selects.

        Indexing is torch's indexing of the whole tensor (safetensors 0.8's behaviour for
        ``framework="pt"``); the result goes to the handle's device.
        """
        handle = self._handle()
        self._check_name(handle, name)
        return _slice.get_slice(handle, name, self._convert)

    def __enter__(self) -> safe_open:
        self._handle()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._file = None


# serialize / serialize_file take raw memory (TensorSpec), as safetensors 0.8 does.
_SPEC_DTYPES: dict[str, _torch.dtype] = {
    name: value
    for name in (
        "bool",
        "uint8",
        "int8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "float16",
        "bfloat16",
        "float32",
        "float64",
        "complex64",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
    )
    if isinstance(value := getattr(_torch, name, None), _torch.dtype)
}


class TensorSpec:
    """One tensor in raw memory for :func:`serialize` / :func:`serialize_file`.

    Args:
        dtype: A dtype name as numpy or torch spell it (``"float32"``, ``"bfloat16"``...).
        shape: The tensor's shape.
        data_ptr: Address of its first byte; the memory must stay alive during the save.
        data_len: Its size in bytes (``prod(shape) * itemsize``).

    Raises:
        SafetensorError: Unknown dtype, or ``data_len`` does not match ``shape``.
    """

    __slots__ = ("data_len", "data_ptr", "dtype", "shape")

    def __init__(self, *, dtype: str, shape: Any, data_ptr: int, data_len: int) -> None:
        if dtype not in _SPEC_DTYPES:
            raise SafetensorError(f"dtype {dtype} is invalid")
        self.dtype = dtype
        self.shape = [int(d) for d in shape]
        self.data_ptr = int(data_ptr)
        self.data_len = int(data_len)
        expected = math.prod(self.shape) * _SPEC_DTYPES[dtype].itemsize
        if expected != self.data_len:
            raise SafetensorError(
                f"TensorSpec: data_len {self.data_len} does not match shape {self.shape} of "
                f"{dtype} ({expected} bytes)"
            )

    def tensor(self) -> _torch.Tensor:
        """A tensor viewing the memory (no copy)."""
        dtype = _SPEC_DTYPES[self.dtype]
        if self.data_len == 0:
            return _torch.empty(self.shape, dtype=dtype)
        buffer = (ctypes.c_uint8 * self.data_len).from_address(self.data_ptr)
        return _torch.frombuffer(buffer, dtype=_torch.uint8).view(dtype).reshape(self.shape)


def _spec_tensors(tensor_dict: Any) -> dict[str, _torch.Tensor]:
    if not isinstance(tensor_dict, Mapping) or not all(
        isinstance(v, TensorSpec) for v in tensor_dict.values()
    ):
        raise TypeError("serialize takes a dict of str to TensorSpec")
    return {name: spec.tensor() for name, spec in tensor_dict.items()}


def _dict(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    return None if metadata is None else dict(metadata)


def serialize(
    tensor_dict: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = None
) -> bytes:
    """The safetensors bytes of tensors in raw memory (see :class:`TensorSpec`)."""
    from zerockpt.safetensors import torch as st_torch

    return st_torch.save(_spec_tensors(tensor_dict), metadata=_dict(metadata))


def serialize_file(
    tensor_dict: Mapping[str, TensorSpec],
    filename: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes tensors in raw memory (see :class:`TensorSpec`) into ``filename``."""
    from zerockpt.safetensors import torch as st_torch

    st_torch.save_file(_spec_tensors(tensor_dict), filename, metadata=_dict(metadata))


def deserialize(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    """``[(name, {"dtype": "F32", "shape": [...], "data": bytes}), ...]`` of safetensors bytes,
    in the order of their bytes."""
    from zerockpt.safetensors import torch as st_torch

    return st_torch._deserialize(data)


from zerockpt.safetensors.torch import (  # noqa: E402  (needs the names above)
    load,
    load_file,
    load_model,
    save,
    save_file,
    save_model,
)

__all__ = [
    "SafetensorError",
    "TensorSpec",
    "deserialize",
    "load",
    "load_file",
    "load_model",
    "safe_open",
    "save",
    "save_file",
    "save_model",
    "serialize",
    "serialize_file",
]
