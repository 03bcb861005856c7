"""The directory a save writes into: a clear error when it is missing, or created on request."""

from __future__ import annotations

import errno
import os

from zerockpt import _C


def make_parent(path: str, *, makedirs: bool, durable: bool) -> None:
    """Checks (or, with ``makedirs``, creates) the directory that will hold the file ``path``.

    Missing directories are created as a sharded save creates its own (``_C.make_directories``:
    with ``durable``, each new entry is fsynced into its parent).

    Raises:
        FileNotFoundError: The directory is missing and ``makedirs`` is false; its ``filename``
            is that directory.
        OSError: A directory cannot be created (errno and filename set).
    """
    parent = os.path.dirname(path) or "."
    if os.path.isdir(parent):
        return
    if not makedirs:
        if os.path.lexists(parent):
            return  # a file or a dangling link: the writer reports it, naming the destination
        raise FileNotFoundError(
            errno.ENOENT,
            f"{os.strerror(errno.ENOENT)}: the directory to save {path!r} into does not exist "
            "(pass makedirs=True to create it)",
            parent,
        )
    _C.make_directories(parent, durable)
