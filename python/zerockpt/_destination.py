"""The directory a save writes into: a clear error when it is missing, or created on request."""

from __future__ import annotations

import errno
import os


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_parent(path: str, *, makedirs: bool, durable: bool) -> None:
    """Checks (or, with ``makedirs``, creates) the directory that will hold the file ``path``.

    Created directories are made one level at a time; with ``durable``, each new entry is
    fsynced into its parent, so the whole path survives a power loss once the save's own fsync
    of the file's directory is done.

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
    missing = []
    directory = parent
    while not os.path.isdir(directory):
        missing.append(directory)
        above = os.path.dirname(directory)
        if not above or above == directory:
            break
        directory = above
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            if not os.path.isdir(directory):  # a file, or a link to none: not a directory
                raise
            continue  # made meanwhile by another process
        if durable:
            _fsync_directory(os.path.dirname(directory) or ".")
