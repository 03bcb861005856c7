"""save / load / open: dicts of tensors <-> safetensors files."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any

import torch

from zerockpt import (
    _C,
    _args,
    _destination,
    _fileobj,
    _parallel,
    _progress,
    _slice,
    _state,
    _torchfile,
    sharded,
)
from zerockpt._args import PathLike
from zerockpt._state import SaveInput

# What save() and load() take as a destination or source: a path or a binary file object.
FileLike = PathLike | IO[bytes]


def save(
    tensors: SaveInput,
    path: FileLike,
    *,
    metadata: Mapping[str, str] | None = None,
    durable: bool = True,
    direct_io: bool | None = None,
    threads: int | None = None,
    checksums: bool = True,
    max_shard_size: int | str | None = None,
    progress: bool = False,
    staging_bytes: int | None = None,
    makedirs: bool = False,
) -> None:
    """Saves tensors, a module or nested training state as a safetensors file.

    The file appears at ``path`` only once complete (an existing file survives any error) and,
    with ``durable``, survives a power loss once this returns. A module is saved as its
    ``state_dict()`` with its ``_metadata``; dicts, lists, tuples and other containers of tensors
    and plain values are saved as nested state that :func:`load` rebuilds (what it may hold:
    docs/format.md, "Nested state"). Tensors may be on any device; tied
    tensors (the same view of one storage) are stored once. Ctrl-C stops the save with nothing
    committed. How the bytes travel, and the sharded layout: docs/design.md.

    Args:
        tensors: Names to tensors, an ``nn.Module``, or nested training state.
        path: The destination file (its directory must exist); with ``max_shard_size``, a
            directory. Or a binary file object, written at its position and left just after the
            file (as ``torch.save``); atomicity is then the caller's.
        metadata: Extra ``str -> str`` header entries; the ``zerockpt.`` prefix is reserved.
        durable: fsync the file and its directory before returning.
        direct_io: Force O_DIRECT on or off; None chooses by size.
        threads: Writer threads; None: the default.
        checksums: Store each tensor's CRC-32C, for ``load(..., verify=True)`` and
            :func:`verify`.
        max_shard_size: Write a Hugging Face sharded checkpoint directory instead, with shards of
            at most this many bytes: an int or a str such as ``"5GB"`` or ``"10GiB"``.
        progress: Show a progress bar of the bytes written (needs tqdm).
        staging_bytes: Pinned host memory for copying accelerator tensors; None: the default.
        makedirs: Create the missing directories above ``path`` (fsynced when ``durable``). A
            sharded save always creates its directory and those above it.

    Raises:
        TypeError: An object, key, dtype or layout cannot be stored (the message names it),
            ``metadata`` is not a mapping of str to str, or ``path`` is neither a path nor a
            binary file object.
        ValueError: Different views of one storage overlap, a tensor is on the meta device, a
            metadata key is reserved, containers nest too deeply, ``threads``, ``staging_bytes``
            or ``max_shard_size`` is invalid, ``path`` is a file while ``max_shard_size`` is
            given, or a file object is closed, not writable, or given with ``max_shard_size`` or
            ``direct_io=True``.
        FileNotFoundError: The directory to write into does not exist (``filename`` is that
            directory) and ``makedirs`` is false.
        OSError: The file could not be written (errno and filename set); ``path`` is unchanged.
        ImportError: ``progress=True`` and tqdm is not installed.

    Example:
        >>> zerockpt.save({"w": torch.ones(2, 3)}, "model.safetensors")
        >>> zerockpt.load("model.safetensors")["w"].shape
        torch.Size([2, 3])
    """
    flat, metadata, own = _state.prepare_save(tensors, metadata)
    if _fileobj.is_file_object(path):
        _fileobj.save(
            flat,
            metadata,
            own,
            path,
            durable=bool(durable),
            direct_io=direct_io,
            threads=_args.threads(threads),
            checksums=bool(checksums),
            max_shard_size=max_shard_size,
            progress=progress,
            staging_bytes=_args.staging_bytes(staging_bytes),
        )
        return
    where = _args.fspath(path)
    staging = _args.staging_bytes(staging_bytes)
    # A bad size raises before any bar is drawn.
    limit = None if max_shard_size is None else sharded.parse_size(max_shard_size)
    options = _args.save_options(
        metadata=metadata,
        durable=durable,
        direct_io=direct_io,
        threads=_args.threads(threads),
        checksums=checksums,
        staging_bytes=staging,
    )
    description = _progress.label("Saving", where)
    if limit is not None:
        tensors = _state.flat_dict(flat)
        _progress.run(
            progress,
            description,
            lambda counter: sharded.save_sharded(tensors, where, limit, own, options, counter),
            total=_progress.unique_nbytes(tensors.values()),
        )
        return
    _destination.make_parent(where, makedirs=bool(makedirs), durable=bool(durable))
    _progress.run(
        progress, description, lambda counter: _C.save(flat, where, options, own, counter)
    )


def _torch_load_device(
    device: str | torch.device | int | None, map_location: object
) -> str | torch.device | int:
    """``device``, or torch.load's ``map_location`` in its place; TypeError/ValueError if both
    disagree or ``map_location`` is not one device."""
    if map_location is None:
        return "cpu" if device is None else device
    if not isinstance(map_location, str | torch.device):
        raise TypeError(
            "map_location: zerockpt.load takes only a str or torch.device (the device every "
            f"tensor goes to), got {type(map_location).__name__}. A safetensors file records no "
            "device to remap from: pass the target device (map_location='cuda:0'), or move "
            "tensors after loading"
        )
    if device is not None and torch.device(device) != torch.device(map_location):
        raise ValueError(
            f"device={device!r} and map_location={map_location!r} disagree; map_location is "
            "torch.load's name for device: give one of them"
        )
    return map_location


def _check_weights_only(weights_only: bool | None) -> None:
    """torch.load's ``weights_only``: True is what zerockpt always does; False cannot be."""
    if weights_only is None or weights_only is True:
        return
    if weights_only is not False:
        raise TypeError(f"weights_only must be a bool, got {type(weights_only).__name__}")
    raise ValueError(
        "weights_only=False: zerockpt never unpickles, so there is no unrestricted mode to "
        "turn on; files hold tensors and a JSON description of the structure. Load a "
        "torch.save checkpoint with torch.load, or convert it once with 'zerockpt convert'"
    )


def load(
    path: FileLike,
    *,
    device: str | torch.device | int | None = None,
    mmap: bool = True,
    threads: int | None = None,
    verify: bool = False,
    progress: bool = False,
    staging_bytes: int | None = None,
    map_location: str | torch.device | None = None,
    weights_only: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Loads every tensor of a safetensors file or sharded checkpoint, in saved order.

    On the CPU the tensors are, by default, zero-copy views of a private (copy-on-write) mapping
    of the file: writing into them never changes the file. With an accelerator ``device`` they
    are new tensors there, ready on the current stream. Files saved from nested state or from a
    module come back as that structure (with ``_metadata``). See docs/design.md for the mapping
    rules and the device pipeline.

    Args:
        path: A safetensors file from any writer; an index file (``*.json``); a directory
            holding ``model.safetensors.index.json`` or ``model.safetensors``; or a binary file
            object, read from its position and left just after the file (as ``torch.load``).
        device: Where the tensors go: ``"cpu"``, or an accelerator such as ``"cuda:1"``.
        mmap: For the CPU: map the file (default) or read it into fresh memory.
        threads: Reader threads; None: the default.
        verify: Check every tensor against its stored CRC-32C first (a file without checksums
            loads unchecked, with a warning).
        progress: Show a progress bar of the bytes read or checked (needs tqdm).
        staging_bytes: Pinned host memory for copying to an accelerator; None: the default.
        map_location: torch.load's name for ``device``: a str or ``torch.device`` (not a dict or
            callable: the file records no device to remap from).
        weights_only: Accepted for torch.load habits: True changes nothing (nothing is ever
            unpickled); False is refused.

    Returns:
        A dict of names to tensors (aliases map to the same tensor), the nested structure that
        was saved, or an ``OrderedDict`` with the ``_metadata`` of a saved state dict.

    Raises:
        ChecksumError: With ``verify``, tensors fail their checksum (the message names each).
        FormatError: The file is not valid safetensors, or an index is malformed or does not
            match its shards (the message names the key or offset).
        OSError: A file cannot be opened or read (errno and filename set), or a directory holds
            no checkpoint.
        TypeError: A stored dtype has no torch equivalent, ``path`` is neither a path nor a
            binary file object (bytes: see :func:`load_bytes`), or ``map_location`` is not a str
            or ``torch.device``.
        ValueError: ``device`` is the meta device, ``threads`` or ``staging_bytes`` is invalid,
            a file object is closed or not readable, ``device`` and ``map_location`` disagree,
            or ``weights_only=False``.
        RuntimeError: ``device`` is not available (AssertionError where torch is not built for
            it, as torch raises).
        ImportError: ``progress=True`` and tqdm is not installed.

    Example:
        >>> zerockpt.save({"w": torch.ones(2)}, "model.safetensors")
        >>> zerockpt.load("model.safetensors")
        {'w': tensor([1., 1.])}
    """
    _check_weights_only(weights_only)
    to = _args.load_device(_torch_load_device(device, map_location))
    staging = _args.staging_bytes(staging_bytes)
    if _fileobj.is_file_object(path):
        loaded, own, name = _fileobj.load(
            path,
            device=to,
            mmap=bool(mmap),
            threads=_args.threads(threads),
            verify=bool(verify),
            progress=progress,
            staging_bytes=staging,
        )
        return _state.rebuild(loaded, own, name)  # type: ignore[no-any-return]
    target = sharded.resolve(_args.fspath(path))
    where: str
    if isinstance(target, sharded.ShardIndex):
        index = target
        where = index.path
        tensors, unchecked = _progress.run(
            progress,
            _progress.label("Loading", path),
            lambda counter: sharded.load_shards(
                index,
                mmap=bool(mmap),
                threads=_args.threads(threads),
                verify=bool(verify),
                progress=counter,
                device=to,
                staging_bytes=staging,
            ),
            total=index.total_size(),
        )
        own = index.own_metadata()
        if verify and unchecked:
            sharded.warn_unverified(index, unchecked, stacklevel=2)
    else:
        where = target
        options = _args.load_options(
            mmap=mmap,
            threads=_args.threads(threads),
            verify=verify,
            device=to,
            staging_bytes=staging,
        )
        with _torchfile.explained(where):
            tensors, own, has_checksums = _progress.run(
                progress,
                _progress.label("Loading", where),
                lambda counter: _C.load(where, options, counter),
            )
        if verify and not has_checksums:
            _state.warn_unverified(where)
    return _state.rebuild(tensors, own, where)  # type: ignore[no-any-return]


def save_bytes(
    obj: SaveInput,
    metadata: Mapping[str, str] | None = None,
    *,
    threads: int | None = None,
    checksums: bool = True,
    progress: bool = False,
    staging_bytes: int | None = None,
) -> bytes:
    """Serializes what :func:`save` takes into the bytes of a safetensors file, in memory.

    The same bytes :func:`save` writes to a file, written straight from tensor memory into the
    returned ``bytes``; ``safetensors.torch.load`` reads them (a flat dict of tensors; nested
    state needs :func:`load_bytes`).

    Args:
        obj: Names to tensors, a module or nested training state (see :func:`save`).
        metadata: Extra ``str -> str`` entries for the header's ``__metadata__``.
        threads: Copying threads; None: the default.
        checksums: Store each tensor's CRC-32C (see :func:`save`).
        progress: Show a progress bar (needs tqdm).
        staging_bytes: Pinned host memory for copying accelerator tensors (see :func:`save`).

    Returns:
        The file's bytes.

    Raises:
        TypeError, ValueError: As :func:`save` raises them for ``obj`` and ``metadata``.

    Example:
        >>> data = zerockpt.save_bytes({"w": torch.ones(2)}, metadata={"step": "7"})
        >>> zerockpt.load_bytes(data)["w"]
        tensor([1., 1.])
    """
    flat, metadata, own = _state.prepare_save(obj, metadata)
    return _fileobj.save_bytes(
        flat,
        metadata,
        own,
        threads=_args.threads(threads),
        checksums=bool(checksums),
        progress=progress,
        staging_bytes=_args.staging_bytes(staging_bytes),
    )


def load_bytes(
    data: bytes | bytearray | memoryview,
    device: str | torch.device | int = "cpu",
    *,
    threads: int | None = None,
    verify: bool = False,
    progress: bool = False,
    staging_bytes: int | None = None,
) -> Any:
    """Loads a safetensors file held in memory, as :func:`load` loads a path.

    ``data`` may come from :func:`save_bytes`, ``safetensors.torch.save`` or any writer; all of
    it must be the one file. It is validated as a file is and copied once into memory that the
    returned tensors view, so ``data`` may change or go away afterwards.

    Args:
        data: The file's bytes: ``bytes``, ``bytearray``, ``memoryview`` or any contiguous
            buffer.
        device: Where the tensors go, as for :func:`load`.
        threads: Reader (and checksum) threads; None: the default.
        verify: Check each tensor against its stored CRC-32C (see :func:`load`).
        progress: Show a progress bar (needs tqdm).
        staging_bytes: Pinned host memory for copying to an accelerator (see :func:`load`).

    Returns:
        What :func:`load` returns for the same file: a dict of names to tensors, or the nested
        structure that was saved.

    Raises:
        FormatError: ``data`` is not a valid safetensors file (the message names ``<bytes>``
            and the key or offset at fault); ChecksumError with ``verify``.
        TypeError: ``data`` is not a buffer, or a stored dtype has no torch equivalent.
        ValueError, RuntimeError: As :func:`load` raises them for ``device`` and ``threads``.

    Example:
        >>> data = zerockpt.save_bytes({"w": torch.zeros(3)})
        >>> zerockpt.load_bytes(data)
        {'w': tensor([0., 0., 0.])}
    """
    loaded, own, name = _fileobj.load(
        data,
        device=_args.load_device(device),
        mmap=True,
        threads=_args.threads(threads),
        verify=bool(verify),
        progress=progress,
        staging_bytes=_args.staging_bytes(staging_bytes),
    )
    return _state.rebuild(loaded, own, name)


@dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify` found. ``ok`` is true when no tensor failed its checksum.

    Attributes:
        path: The file checked, or the index file of a sharded checkpoint.
        has_checksums: False when the file (or a shard) stores no checksums: nothing was checked
            there.
        tensors: The number of stored tensors (aliases not counted), in all shards.
        failed: Names of the stored tensors whose bytes do not match their checksum.

    Example:
        >>> zerockpt.save({"w": torch.ones(2)}, "model.safetensors")
        >>> zerockpt.verify("model.safetensors")
        VerifyResult(path='model.safetensors', has_checksums=True, tensors=1, failed=())
    """

    path: str
    has_checksums: bool
    tensors: int
    failed: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when no tensor failed its checksum (also when there were none to check)."""
        return not self.failed


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor, read without touching its bytes.

    Attributes:
        dtype: The torch dtype, or None if torch has none for ``format_dtype``.
        format_dtype: The dtype as the file names it, e.g. ``"F32"``.
        shape: The shape the header records: the tensor's, except for ``F4`` (two values per
            ``float4_e2m1fn_x2`` element), whose last dimension is twice the loaded tensor's.
        data_offsets: Byte range ``(begin, end)`` in the data region, as in the header.
        alias_of: The stored tensor this name is an alias of, if it was saved as one (then
            ``data_offsets`` are that tensor's).

    Example:
        >>> zerockpt.save({"w": torch.ones(2, 3)}, "model.safetensors")
        >>> info = zerockpt.open("model.safetensors").info("w")
        >>> info.dtype, info.shape, info.nbytes
        (torch.float32, (2, 3), 24)
    """

    dtype: torch.dtype | None
    format_dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]
    alias_of: str | None

    @property
    def nbytes(self) -> int:
        """Size of the tensor's bytes in the file: ``data_offsets[1] - data_offsets[0]``."""
        return self.data_offsets[1] - self.data_offsets[0]


class TensorFile(Mapping[str, torch.Tensor]):
    """Lazy, read-only mapping of the tensors of a file or sharded checkpoint; see :func:`open`.

    Only headers are read up front; each tensor is made when asked for. Tensors taken from it
    stay valid after :meth:`close`; after it, all that reads the file raises ``ValueError``.

    Args:
        path: A safetensors file, an index file (``*.json``), or a checkpoint directory (as for
            :func:`load`).

    Raises:
        TypeError: ``path`` is not a str or ``os.PathLike``.
        FormatError: A header is not valid safetensors, or an index is malformed or does not
            match its shards.
        OSError: A file cannot be opened or read (errno and filename set), or a directory holds
            no checkpoint.

    Example:
        >>> zerockpt.save({"w": torch.ones(2)}, "model.safetensors")
        >>> with zerockpt.TensorFile("model.safetensors") as f:
        ...     print(list(f), f["w"])
        ['w'] tensor([1., 1.])
    """

    def __init__(self, path: PathLike) -> None:
        target = sharded.resolve(_args.fspath(path))
        self._index: sharded.ShardIndex | None = None
        self._shard_of: dict[str, int] = {}
        if isinstance(target, sharded.ShardIndex):
            self._index = target
            self._files: list[_C._File] | None = sharded.open_shards(target)
            self._path = target.path
            self._keys = list(target.weight_map)
            position = {shard: i for i, shard in enumerate(target.shards)}
            self._shard_of = {name: position[s] for name, s in target.weight_map.items()}
        else:
            with _torchfile.explained(target):
                file = _C._File(target)
            self._files = [file]
            self._path = file.path
            self._keys = file.keys()

    @property
    def path(self) -> str:
        """The file, or the index file of a sharded checkpoint."""
        self._handles()
        return self._path

    @property
    def files(self) -> tuple[str, ...]:
        """The safetensors files read: the file itself, or every shard (sorted by name)."""
        return tuple(f.path for f in self._handles())

    @property
    def index(self) -> dict[str, Any] | None:
        """A sharded checkpoint's index (``{"metadata": ..., "weight_map": ...}``), else None."""
        self._handles()
        if self._index is None:
            return None
        return {"metadata": dict(self._index.metadata), "weight_map": dict(self._index.weight_map)}

    def _handles(self) -> list[_C._File]:
        if self._files is None:
            raise ValueError("I/O operation on a closed zerockpt.TensorFile")
        return self._files

    def _handle(self, name: str | None = None) -> _C._File:
        """The file holding ``name`` (KeyError if no shard does); no name: the (first) file."""
        files = self._handles()
        if self._index is None or name is None:
            return files[0]
        position = self._shard_of.get(name)
        if position is None:
            raise KeyError(name)
        return files[position]

    def keys(self) -> list[str]:  # type: ignore[override]
        """Lists the tensor names; works on a closed file too.

        Returns:
            The names in saved order (sharded: the index's order), aliases included.

        Example:
            >>> zerockpt.save({"b": torch.ones(1), "a": torch.ones(2)}, "model.safetensors")
            >>> zerockpt.open("model.safetensors").keys()
            ['b', 'a']
        """
        return list(self._keys)

    def file_of(self, name: str) -> str:
        """Tells which file holds a tensor: the file itself, or the shard the index names.

        Args:
            name: A tensor name.

        Returns:
            The path of the file (shard) holding ``name``.

        Raises:
            KeyError: There is no tensor ``name``.
            ValueError: The file is closed.

        Example:
            >>> zerockpt.save({"w": torch.ones(2)}, "model.safetensors")
            >>> zerockpt.open("model.safetensors").file_of("w")
            'model.safetensors'
        """
        handle = self._handle(name)
        handle.info(name)  # KeyError for a name a single file does not hold
        return handle.path

    def metadata(self) -> dict[str, str]:
        """Reads the header's ``__metadata__`` (for a sharded checkpoint: its first shard's).

        Returns:
            The entries, zerockpt's own ``zerockpt.*`` ones included; ``{}`` if there are none. The
            index's own metadata is in :attr:`index`.

        Raises:
            ValueError: The file is closed.

        Example:
            >>> zerockpt.save({"w": torch.ones(2)}, "model.safetensors", metadata={"epoch": "3"})
            >>> zerockpt.open("model.safetensors").metadata()["epoch"]
            '3'
        """
        files = self._handles()
        return files[0].metadata() if files else {}

    def info(self, name: str) -> TensorInfo:
        """Describes a tensor from the header, without reading its bytes.

        Args:
            name: A tensor name.

        Returns:
            Its dtype, shape and byte range (for a sharded checkpoint, within the shard
            :meth:`file_of` names).

        Raises:
            KeyError: There is no tensor ``name``.
            ValueError: The file is closed.

        Example:
            >>> zerockpt.save({"w": torch.ones(2, 3)}, "model.safetensors")
            >>> info = zerockpt.open("model.safetensors").info("w")
            >>> info.dtype, info.shape, info.nbytes
            (torch.float32, (2, 3), 24)
        """
        fmt, shape, begin, end, alias_of = self._handle(name).info(name)
        return TensorInfo(_C.torch_dtype(fmt), fmt, tuple(shape), (begin, end), alias_of)

    def verify(self, *, threads: int | None = None, progress: bool = False) -> VerifyResult:
        """Checks every tensor's bytes against its stored CRC-32C; see :func:`verify`.

        Args:
            threads: Checksum threads; None: the default.
            progress: Show a progress bar of the bytes checked (needs tqdm).

        Returns:
            A :class:`VerifyResult` naming the tensors that fail, if any.

        Raises:
            ValueError: The file is closed, or ``threads`` is not a positive int.
            FormatError: A file's checksum metadata is malformed.
            OSError: A file cannot be read (errno and filename set).
            ImportError: ``progress=True`` and tqdm is not installed.

        Example:
            >>> zerockpt.save({"w": torch.ones(2)}, "model.safetensors")
            >>> zerockpt.open("model.safetensors").verify().ok
            True
        """
        files = self._handles()
        workers, per_file = _parallel.thread_budget(_args.threads(threads), len(files))

        def check(handle: _C._File, counter: _C.Progress | None) -> tuple[bool, list[str], int]:
            has_checksums, failed = handle.verify(per_file, False, counter)
            names = handle.keys()
            stored = sum(1 for name in names if handle.info(name)[4] is None)
            return has_checksums, failed, stored

        results = _progress.run(
            progress,
            _progress.label("Verifying", self._path),
            lambda counter: _parallel.run_parallel(
                lambda handle: check(handle, counter), files, workers, counter
            ),
            total=sum(_progress.stored_bytes(handle) for handle in files),
        )
        return VerifyResult(
            self._path,
            all(r[0] for r in results),
            sum(r[2] for r in results),
            tuple(name for r in results for name in r[1]),
        )

    def get_tensor(self, name: str, *, mmap: bool = True) -> torch.Tensor:
        """Reads one tensor (``f[name]`` is ``f.get_tensor(name)``).

        Args:
            name: A tensor name.
            mmap: Return a zero-copy view of a private mapping of the file; False reads the bytes
                into a fresh tensor.

        Returns:
            The tensor; it stays valid after :meth:`close`.

        Raises:
            KeyError: There is no tensor ``name``.
            ValueError: The file is closed.
            TypeError: The stored dtype has no torch equivalent.
            OSError: With ``mmap=False``, the bytes cannot be read (errno and filename set).

        Example:
            >>> zerockpt.save({"w": torch.ones(2)}, "model.safetensors")
            >>> zerockpt.open("model.safetensors").get_tensor("w", mmap=False)
            tensor([1., 1.])
        """
        return self._handle(name).get_tensor(name, mmap)

    def get_slice(self, name: str) -> _slice.TensorSlice:
        """A lazily sliced tensor, as safetensors' ``get_slice``: ``f.get_slice("w")[0:2]``.

        Args:
            name: A tensor name.

        Returns:
            A :class:`zerockpt._slice.TensorSlice` with ``get_shape()``, ``get_dtype()`` (the
            file's name, e.g. ``"BF16"``) and indexing as torch indexes the whole tensor; only
            the pages holding the selected elements are read, when the result is first used.

        Raises:
            KeyError: There is no tensor ``name``.
            ValueError: The file is closed.
            TypeError: The stored dtype has no torch equivalent.

        Example:
            >>> zerockpt.save({"w": torch.arange(6.0).reshape(3, 2)}, "model.safetensors")
            >>> zerockpt.open("model.safetensors").get_slice("w")[1:]
            tensor([[2., 3.],
                    [4., 5.]])
        """
        return _slice.get_slice(self._handle(name), name)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get_tensor(name)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self._handle(name).info(name)
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def close(self) -> None:
        """Releases the file(s); tensors already taken from them stay valid.

        Example:
            >>> zerockpt.save({"w": torch.ones(2)}, "model.safetensors")
            >>> f = zerockpt.open("model.safetensors")
            >>> w = f["w"]
            >>> f.close()
            >>> w  # still valid
            tensor([1., 1.])
        """
        self._files = None

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._files is None:
            return f"<zerockpt.TensorFile {self._path!r} (closed)>"
        shards = "" if self._index is None else f", {len(self._files)} shards"
        return f"<zerockpt.TensorFile {self._path!r} ({len(self._keys)} tensors{shards})>"


def open(path: PathLike) -> TensorFile:
    """Opens a safetensors file or sharded checkpoint for lazy access to its tensors.

    Only the header (for a sharded checkpoint: the index and every shard's header, checked
    against each other) is read; each tensor's bytes are mapped when it is asked for.

    Args:
        path: A safetensors file from any writer, an index file (``*.json``), or a directory
            holding ``model.safetensors.index.json`` or ``model.safetensors``.

    Returns:
        A :class:`TensorFile`; close it (or use it as a context manager) to release the file.

    Raises:
        TypeError: ``path`` is not a str or ``os.PathLike``.
        FormatError: A header is not valid safetensors, or an index is malformed or does not
            match its shards.
        OSError: A file cannot be opened or read (errno and filename set), or a directory holds
            no checkpoint.

    Example:
        >>> zerockpt.save({"w": torch.ones(2, 3)}, "model.safetensors")
        >>> with zerockpt.open("model.safetensors") as f:
        ...     print(f.keys(), f.info("w").shape, f["w"].sum())
        ['w'] (2, 3) tensor(6.)
    """
    return TensorFile(path)


def verify(path: PathLike, *, threads: int | None = None, progress: bool = False) -> VerifyResult:
    """Checks a file's header and every tensor's bytes against the CRC-32C stored for it.

    A file without checksums (another writer, or ``checksums=False``) has nothing to check:
    ``has_checksums`` is False and ``ok`` is True. Shards of a sharded checkpoint are checked in
    parallel.

    Args:
        path: A file, or a sharded checkpoint's directory or index file.
        threads: Checksum threads; None: the default.
        progress: Show a progress bar of the bytes checked (needs tqdm).

    Returns:
        A :class:`VerifyResult` naming the tensors that fail, if any.

    Raises:
        FormatError: The file is not valid safetensors or its checksum metadata is malformed, or
            an index is malformed or does not match its shards.
        OSError: A file cannot be opened or read (errno and filename set).
        TypeError: ``path`` is not a str or ``os.PathLike``.
        ValueError: ``threads`` is not a positive int.
        ImportError: ``progress=True`` and tqdm is not installed.

    Example:
        >>> zerockpt.save({"w": torch.ones(2)}, "model.safetensors")
        >>> zerockpt.verify("model.safetensors").ok
        True
    """
    with TensorFile(path) as f:
        return f.verify(threads=threads, progress=progress)
