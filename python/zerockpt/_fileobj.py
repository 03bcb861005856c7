"""save / load through binary file objects and bytes in memory (not paths).

The file is the same safetensors bytes a path gets. Writing: a regular file opened through
``open(..., "wb")`` (``io.FileIO`` or a buffered object over one) is written with parallel
``pwrite`` at its current position, like a path; any other object gets the header and then
each tensor's bytes in order through its ``write``, straight from tensor memory (a read-only
``memoryview``, released when ``write`` returns). Reading: a regular file is mapped or read
from its descriptor at its current position; anything else (bytes, ``BytesIO``, pipes,
compressed streams) is read once into anonymous memory, which then serves as the file.
Either way the object is left positioned just after the safetensors file, as
``torch.save``/``torch.load`` leave it.
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
from collections.abc import Callable, Mapping
from typing import IO, TYPE_CHECKING, Any

import torch

from zerockpt import _C, _args, _progress, _state

if TYPE_CHECKING:
    from typing_extensions import TypeIs

_COPY_CHUNK = 8 << 20  # bytes read or written per call when copying a stream


def is_file_object(obj: object) -> TypeIs[IO[bytes]]:
    """True for what save/load take as a file object rather than a path.

    Raises:
        TypeError: ``obj`` is bytes in memory, which are neither (the message names
            ``load_bytes``).
    """
    if isinstance(obj, bytes | bytearray | memoryview):
        raise TypeError(
            f"path must be a str, os.PathLike or binary file object, got {type(obj).__name__} "
            "(for a checkpoint held in memory use zerockpt.load_bytes / zerockpt.save_bytes)"
        )
    if isinstance(obj, str | os.PathLike):
        return False
    return callable(getattr(obj, "write", None)) or callable(getattr(obj, "read", None))


def describe(f: Any) -> str:
    """The name of ``f`` in messages: its file name, else ``<TypeName>``."""
    name = getattr(f, "name", None)
    if isinstance(name, str | bytes):
        return os.fsdecode(name)
    return f"<{type(f).__name__}>"


def _check_binary(f: Any, mode: str) -> None:
    """ValueError if ``f`` is closed or cannot ``mode`` ("read"/"write"), TypeError if text."""
    if getattr(f, "closed", False):
        raise ValueError(f"{describe(f)}: I/O operation on closed file")
    if isinstance(f, io.TextIOBase):
        raise TypeError(
            f"{describe(f)} is a text-mode file object; safetensors files are binary: open it "
            f"with {'rb' if mode == 'read' else 'wb'!r}"
        )
    able = getattr(f, "readable" if mode == "read" else "writable", None)
    if not callable(getattr(f, mode, None)) or (callable(able) and not able()):
        raise io.UnsupportedOperation(
            f"{describe(f)} is not {'readable' if mode == 'read' else 'writable'} (open it with "
            f"{'rb' if mode == 'read' else 'wb'!r})"
        )


def _regular_fd(f: Any) -> int | None:
    """``f``'s descriptor if its bytes are exactly those of a regular file at ``f.tell()``.

    Only ``io.FileIO`` and buffered objects over one qualify: other objects with a ``fileno``
    (``gzip.GzipFile``, ...) transform the bytes on their way to it.
    """
    raw = f.raw if isinstance(f, io.BufferedReader | io.BufferedWriter | io.BufferedRandom) else f
    if not isinstance(raw, io.FileIO):
        return None
    try:
        fd = f.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode) or not f.seekable():
            return None
    except (OSError, ValueError):
        return None
    return int(fd)


def _appending(f: Any, fd: int) -> bool:
    """True if writes to ``fd`` go to the end whatever the offset (opened with "a")."""
    try:
        import fcntl

        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND)
    except (ImportError, OSError):
        return "a" in getattr(f, "mode", "")


def save(
    flat: _state.Flat,
    metadata: Mapping[str, str] | None,
    own: dict[str, str],
    f: Any,
    *,
    durable: bool,
    direct_io: bool | None,
    threads: int,
    checksums: bool,
    max_shard_size: int | str | None,
    progress: bool,
    staging_bytes: int,
) -> None:
    """:func:`zerockpt.save` to the binary file object ``f``, at its current position."""
    _check_binary(f, "write")
    name = describe(f)
    if max_shard_size is not None:
        raise ValueError(f"{name}: max_shard_size writes a directory; it needs a path")
    if direct_io:
        raise ValueError(f"{name}: direct_io=True needs a path (it opens the file itself)")
    options = _args.save_options(
        metadata=metadata, threads=threads, checksums=checksums, staging_bytes=staging_bytes
    )
    fd = _regular_fd(f)
    if fd is not None and not _appending(f, fd):
        f.flush()  # what is buffered goes first, where it belongs
        base = f.tell()
        size = _progress.run(
            progress,
            _progress.label("Saving", name),
            lambda counter: _C.save_fd(flat, fd, base, name, options, own, counter),
        )
        f.seek(base + size)
        if durable:
            os.fsync(fd)
        return
    # Only a BytesIO is sure to seek back and overwrite in place (a GzipFile says it seeks but
    # cannot go back; an append-mode file writes at the end): others get their checksums from
    # a first pass over the tensors, so that the header goes out complete.
    rewrite: Callable[[bytes], None] | None = None
    if isinstance(f, io.BytesIO):
        base = f.tell()

        def rewrite_prefix(prefix: bytes) -> None:
            end = f.tell()
            f.seek(base)
            f.write(prefix)
            f.seek(end)

        rewrite = rewrite_prefix

    _progress.run(
        progress,
        _progress.label("Saving", name),
        lambda counter: _C.save_stream(flat, f.write, rewrite, name, options, own, counter),
    )
    flush = getattr(f, "flush", None)
    if callable(flush):
        flush()
    if durable and fd is not None:
        os.fsync(fd)


def save_bytes(
    flat: _state.Flat,
    metadata: Mapping[str, str] | None,
    own: dict[str, str],
    *,
    threads: int,
    checksums: bool,
    progress: bool,
    staging_bytes: int,
) -> bytes:
    """The safetensors file of ``flat`` as bytes, written straight into the bytes object."""
    options = _args.save_options(
        metadata=metadata, threads=threads, checksums=checksums, staging_bytes=staging_bytes
    )
    return _progress.run(
        progress,
        "Saving <bytes>",
        lambda counter: _C.save_bytes(flat, options, own, counter),
    )


def _anonymous_fd() -> int:
    """A descriptor of a new, nameless file in memory (a temporary file off Linux)."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        return int(memfd_create("zerockpt", os.MFD_CLOEXEC))
    fd, path = tempfile.mkstemp(prefix="zerockpt-")
    os.unlink(path)
    return int(fd)


def _copy_in(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data[: 1 << 30]) :]


def _read_exact(f: Any, n: int, out: list[bytes]) -> int:
    """Reads up to ``n`` bytes of ``f`` into ``out``; how many it got (fewer: the end)."""
    got = 0
    while got < n:
        chunk = f.read(min(n - got, _COPY_CHUNK))
        if chunk is None:
            raise BlockingIOError(f"{describe(f)}: read() returned None (non-blocking stream)")
        if not chunk:
            break
        if not isinstance(chunk, bytes | bytearray):
            raise TypeError(f"{describe(f)}: read() returned {type(chunk).__name__}, not bytes")
        out.append(bytes(chunk))
        got += len(chunk)
    return got


def _stream_into(f: Any, fd: int, name: str) -> None:
    """Copies one safetensors file from the stream ``f`` into ``fd``, reading no further.

    Raises:
        FormatError: The header is invalid, or the stream ends before the file does (naming
            the offset).
    """
    head: list[bytes] = []
    got = _read_exact(f, 8, head)
    if got < 8:
        raise _C.FormatError(
            f"{name}: the stream ended after {got} bytes, too few to hold a safetensors header"
        )
    n = _C.header_length(b"".join(head), name)
    got = _read_exact(f, n, head)
    if got < n:
        raise _C.FormatError(
            f"{name}: the stream ended at offset {8 + got}, inside the {n}-byte header (truncated?)"
        )
    prefix = b"".join(head)
    size = _C.image_size(prefix, name)
    _copy_in(fd, memoryview(prefix))
    done = len(prefix)
    while done < size:
        data: list[bytes] = []
        got = _read_exact(f, min(size - done, _COPY_CHUNK), data)
        for chunk in data:
            _copy_in(fd, memoryview(chunk))
        if got == 0:
            raise _C.FormatError(
                f"{name}: the stream ended at offset {done} of the {size}-byte file its header "
                "describes (truncated?)"
            )
        done += got


def _as_bytes(data: Any) -> memoryview:
    """``data`` (bytes, bytearray, memoryview or another contiguous buffer) as bytes."""
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(
            f"data must be bytes, bytearray or memoryview, got {type(data).__name__}"
        ) from None
    if not view.c_contiguous:
        raise ValueError("data must be a contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def load(
    source: Any,
    *,
    device: torch.device | None,
    mmap: bool,
    threads: int,
    verify: bool,
    progress: bool,
    staging_bytes: int,
) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Loads the file held by ``source`` (bytes-like: all of it) or that starts at the position
    of the binary file object ``source`` (which is then left just after it).

    Returns:
        The tensors, zerockpt's own metadata entries, and the name used in messages.
    """

    options = _args.load_options(
        mmap=mmap, threads=threads, verify=verify, device=device, staging_bytes=staging_bytes
    )

    def run(fd: int, base: int, name: str, exact: bool) -> tuple[Any, Any, int]:
        tensors, own, has_checksums, end = _progress.run(
            progress,
            _progress.label("Loading", name),
            lambda counter: _C.load_fd(fd, base, name, exact, options, counter),
        )
        if verify and not has_checksums:
            _state.warn_unverified(name, stacklevel=6)  # the caller of load() or load_bytes()
        return tensors, own, end

    def from_memory(data: memoryview, name: str, exact: bool) -> tuple[Any, Any, int]:
        fd = _anonymous_fd()
        try:
            _copy_in(fd, data)
            return run(fd, 0, name, exact)
        finally:
            os.close(fd)  # the mapping, if any, keeps the memory

    if isinstance(source, bytes | bytearray | memoryview) or not is_file_object(source):
        name = "<bytes>"
        with _as_bytes(source) as data:
            tensors, own, _ = from_memory(data, name, True)
        return tensors, own, name
    _check_binary(source, "read")
    name = describe(source)
    if isinstance(source, io.BytesIO):
        base = source.tell()
        whole = source.getbuffer()
        rest = whole[base:]
        try:
            tensors, own, end = from_memory(rest, name, False)
        finally:
            rest.release()
            whole.release()
        source.seek(base + end)
        return tensors, own, name
    fd = _regular_fd(source)
    if fd is not None:
        tensors, own, end = run(fd, source.tell(), name, False)
        source.seek(end)
        return tensors, own, name
    fd = _anonymous_fd()
    try:
        _stream_into(source, fd, name)
        tensors, own, _ = run(fd, 0, name, True)
    finally:
        os.close(fd)
    return tensors, own, name
