"""Bounded reads of the small metadata files next to checkpoints.

The ``latest`` pointer, index files and DCP ``.metadata.json`` are read whole. A hostile or
mistaken path must not stall or exhaust the reader: a FIFO is opened without blocking and
refused, a device (``/dev/zero``, even through a symlink) is refused before a byte is read, and
a regular file is read only up to a size cap.
"""

from __future__ import annotations

import errno
import os
import stat

from zerockpt import _C

# Larger than any real index or DCP metadata (100k tensors take a few MB).
MAX_JSON_BYTES = 256 << 20
# A pointer names one file.
MAX_POINTER_BYTES = 4096

_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def read_small_file(path: str, limit: int, what: str) -> bytes:
    """Reads a small regular file whole, refusing anything else before reading.

    Args:
        path: The file (symlinks are followed; what they name is checked).
        limit: The most bytes to accept.
        what: What the file is, for messages (``"index"``).

    Returns:
        The file's bytes.

    Raises:
        FormatError: The file is not a regular file (a FIFO, device or socket), or is larger
            than ``limit`` bytes. The message names it.
        IsADirectoryError: It is a directory.
        OSError: It cannot be opened or read (errno and filename set).
    """
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        mode = info.st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, f"the {what} is a directory", path)
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise _C.FormatError(f"{path}: the {what} is {kind}, not a regular file")
        if info.st_size > limit:
            raise _C.FormatError(f"{path}: the {what} is larger than {limit} bytes")
        chunks: list[bytes] = []
        total = 0
        while True:  # up to limit + 1 bytes, whatever st_size says (the file may grow)
            chunk = os.read(fd, min(limit + 1 - total, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise _C.FormatError(f"{path}: the {what} is larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)
