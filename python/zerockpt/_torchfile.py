"""Recognising pickle-based checkpoints (``torch.save`` files) by their first bytes.

One place for the library's loaders (which then raise a FormatError that says what the file is
and how to convert it) and the CLI (which converts such files). Nothing here unpickles: only the
file's first bytes and, for a zip archive, its list of member names are read.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import stat
import sys
import warnings
import zipfile
from collections.abc import Iterator
from typing import Any

import torch

from zerockpt import _C

ZIP_MAGIC = b"PK\x03\x04"
# torch.save's legacy (pre-1.6) format opens with this number, pickled (torch.serialization).
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_PROTO = 0x80  # pickle opcode PROTO (protocol 2 and later)
_FRAME = 0x95  # pickle opcode FRAME (protocol 4 and later): 8 length bytes follow
_LONG1 = 0x8A  # pickle opcode LONG1: a length byte, then that many bytes of a little-endian int

TORCH_SAVE = "torch.save"
TORCH_SAVE_LEGACY = "torch.save (legacy)"
TORCHSCRIPT = "torchscript"
PICKLE = "pickle"
ZIP = "zip"

_DESCRIPTIONS = {
    TORCH_SAVE: "a torch.save checkpoint (a zip archive holding data.pkl)",
    TORCH_SAVE_LEGACY: "a torch.save checkpoint (the legacy pickle format)",
    TORCHSCRIPT: "a TorchScript archive (torch.jit.save)",
    PICKLE: "a Python pickle",
    ZIP: "a zip archive",
}


def _read_head(path: str, size: int) -> tuple[bytes, bool]:
    """The first ``size`` bytes of ``path`` and whether it is a regular file (else ``b""``)."""
    # O_NONBLOCK: a FIFO is not waited on; only a regular file is read.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b"", False
        return os.pread(fd, size, 0), True
    finally:
        os.close(fd)


def _zip_kind(path: str) -> str:
    """What a zip archive is, by its member names: torch.save puts ``<archive>/data.pkl``."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return ZIP
    # TorchScript archives hold a data.pkl too, beside their code and constants.
    if any(n.endswith("/constants.pkl") for n in names):
        return TORCHSCRIPT
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return TORCH_SAVE
    return ZIP


def pickled_kind(path: str) -> str | None:
    """What pickle-based format ``path`` is in, if any, from its first bytes.

    Returns:
        ``TORCH_SAVE`` (a zip archive holding ``data.pkl``), ``TORCH_SAVE_LEGACY`` (a pickle
        stream opening with torch's magic number), ``TORCHSCRIPT``, ``PICKLE`` (any other
        pickle stream of protocol 2 or later), ``ZIP`` (any other zip archive), or None (none
        of these, or not a regular file).

    Raises:
        OSError: ``path`` cannot be opened or read.
    """
    head, regular = _read_head(path, 32)
    if not regular:
        return None
    if head.startswith(ZIP_MAGIC):
        return _zip_kind(path)
    if len(head) < 2 or head[0] != _PROTO or not 2 <= head[1] <= 5:
        return None
    body = head[2:]
    if body[:1] == bytes([_FRAME]):
        body = body[9:]
    if body[:2] == bytes([_LONG1, len(_LEGACY_MAGIC)]) and body[2:12] == _LEGACY_MAGIC:
        return TORCH_SAVE_LEGACY
    return PICKLE


def is_torch_save(kind: str | None) -> bool:
    """Whether :func:`pickled_kind`'s answer is a ``torch.save`` file (torch.load reads it)."""
    return kind in (TORCH_SAVE, TORCH_SAVE_LEGACY)


def describe(path: str, kind: str) -> str:
    """The message for a file of pickle-based ``kind`` given where safetensors was expected."""
    what = f"{path}: {_DESCRIPTIONS[kind]}, not a safetensors file; zerockpt never unpickles"
    if is_torch_save(kind):
        stem = os.path.splitext(path)[0]
        out = (
            f"{stem}.safetensors"
            if f"{stem}.safetensors" != path
            else f"{stem}.converted.safetensors"
        )
        return (
            f"{what}. Convert it once with 'zerockpt convert {path} {out}' (it is "
            "read with torch.load(weights_only=True)), then load the new file"
        )
    return what


@contextlib.contextmanager
def explained(path: str) -> Iterator[None]:
    """Turns a FormatError about ``path`` into one saying what it is, if it is a pickle format.

    Only a failed read looks at the file again, so a good file costs nothing more.
    """
    try:
        yield
    except _C.ChecksumError:
        raise
    except _C.FormatError as e:
        try:
            kind = pickled_kind(path)
        except OSError:
            kind = None
        if kind is None:
            raise
        raise _C.FormatError(describe(path, kind)) from e


# Globals that plain training state pickles and that ``zerockpt convert`` lets
# ``torch.load(weights_only=True)`` build (torch allows few by default): numpy arrays, dtypes and
# scalars (numpy RNG state, Hugging Face Trainer's rng_state.pth), argparse.Namespace and
# Lightning's AttributeDict (hyperparameters). Each is plain data that zerockpt stores without
# pickle; anything else stays refused by torch.load.
_DATA_GLOBALS = frozenset(
    {
        "argparse.Namespace",
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "lightning.fabric.utilities.data.AttributeDict",
        "lightning_fabric.utilities.data.AttributeDict",
        "pytorch_lightning.utilities.parsing.AttributeDict",
    }
)


def _resolve_global(name: str) -> object | None:
    """The object a pickled global names, if it is plain data to allow (and importable)."""
    module_name, _, attribute = name.rpartition(".")
    numpy_dtype_class = module_name == "numpy.dtypes"  # e.g. numpy.dtypes.UInt32DType
    if name not in _DATA_GLOBALS and not numpy_dtype_class:
        return None
    try:
        with warnings.catch_warnings():  # numpy 2 warns on its numpy.core alias
            warnings.simplefilter("ignore", DeprecationWarning)
            module = importlib.import_module(module_name)
    except ImportError:
        return None  # torch.load then names it as unsupported
    value = getattr(module, attribute, None)
    if numpy_dtype_class:
        np = sys.modules.get("numpy")
        if np is None or not (isinstance(value, type) and issubclass(value, np.dtype)):
            return None
    return value


def data_globals(path: str) -> list[Any]:
    """The plain-data globals (see ``_DATA_GLOBALS``) a ``torch.save`` file references.

    For ``torch.serialization.safe_globals`` around ``torch.load(path, weights_only=True)``.
    Reading the list disassembles the pickle; it runs nothing.
    """
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except ValueError:  # the legacy format, which torch does not list: numpy and argparse
        names = [n for n in sorted(_DATA_GLOBALS) if n.partition(".")[0] in ("numpy", "argparse")]
    except (RuntimeError, OSError):  # a broken archive: torch.load reports it
        return []
    found = [value for value in map(_resolve_global, names) if value is not None]
    np = sys.modules.get("numpy")
    if np is not None and np.dtype in found:
        # A dtype's class (numpy.dtypes.Float32DType...) is built while unpickling, not named
        # as a global: allow all of them with numpy.dtype itself.
        dtypes = importlib.import_module("numpy.dtypes")
        found += [
            value
            for value in vars(dtypes).values()
            if isinstance(value, type) and issubclass(value, np.dtype)
        ]
    return found
