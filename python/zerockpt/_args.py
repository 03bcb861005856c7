"""Argument checks shared by the public functions, and the option objects they pass to ``_C``.

Every call into the C++ core takes one ``_C.SaveOptions`` or ``_C.LoadOptions`` (the structs of
the public C++ header ``zerockpt/zerockpt.h``), built here from checked arguments, so that the
public signatures, the binding and the C++ API name the same options the same way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from zerockpt import _C

PathLike = str | os.PathLike[str]


def fspath(path: PathLike) -> str:
    """``path`` as a str; TypeError unless it is a str or ``os.PathLike``."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def threads(threads: int | None) -> int:
    """The ``threads`` argument for ``_C`` (0: its default), checked."""
    if threads is None:
        return 0
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    return threads


def staging_bytes(staging_bytes: int | None) -> int:
    """The ``staging_bytes`` argument for ``_C`` (0: its default), checked."""
    if staging_bytes is None:
        return 0
    if (
        not isinstance(staging_bytes, int)
        or isinstance(staging_bytes, bool)
        or staging_bytes < _C.CHUNK_BYTES
    ):
        raise ValueError(
            f"staging_bytes must be an int of at least {_C.CHUNK_BYTES} (one chunk) or None, "
            f"got {staging_bytes!r}"
        )
    return staging_bytes


def save_options(
    *,
    metadata: Mapping[str, str] | None = None,
    durable: bool = True,
    direct_io: bool | None = None,
    threads: int = 0,
    checksums: bool = True,
    staging_bytes: int = 0,
) -> _C.SaveOptions:
    """How a save writes, for ``_C.save`` and ``_C.save_async``.

    Args:
        metadata: The user's ``__metadata__`` entries (a dict of str to str, or None).
        durable: fsync the file and its directory.
        direct_io: O_DIRECT on, off, or None (by size).
        threads: Checked by :func:`threads` (0: the default).
        checksums: Store CRC-32C checksums.
        staging_bytes: Checked by :func:`staging_bytes` (0: the default).

    Raises:
        TypeError: ``metadata`` holds a key or value that is not a str (the message names it).
    """
    options = _C.SaveOptions()
    options.metadata = metadata
    options.durable = bool(durable)
    options.direct_io = direct_io
    options.threads = threads
    options.checksums = bool(checksums)
    options.staging_bytes = staging_bytes
    return options


def load_options(
    *,
    mmap: bool = True,
    threads: int = 0,
    verify: bool = False,
    device: torch.device | None = None,
    staging_bytes: int = 0,
) -> _C.LoadOptions:
    """How a load reads, for ``_C.load`` and ``_C.load_state_dict``.

    Args:
        mmap: Map the file (CPU only) or read it into fresh memory.
        threads: Checked by :func:`threads` (0: the default).
        verify: Check the stored checksums.
        device: Stage the tensors into new tensors on this device; None: the CPU mapping (or
            reads, with ``mmap=False``).
        staging_bytes: Checked by :func:`staging_bytes` (0: the default).
    """
    options = _C.LoadOptions()
    options.mmap = bool(mmap)
    options.threads = threads
    options.verify = bool(verify)
    if device is not None:
        options.device = device
    options.staging_bytes = staging_bytes
    return options


def load_device(device: str | torch.device | int) -> torch.device | None:
    """Where ``load`` puts tensors: None for the CPU mapping, else a device to stage into."""
    dev = torch.device(device)
    if dev.type == "meta":
        raise ValueError("device='meta' holds no data: use torch.device('meta') modules instead")
    if dev.type == "cpu" and not _C._staging_host_tensors():
        return None
    return dev
