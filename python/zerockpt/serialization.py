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

# Format dtype names -> torch dtypes (the safetensors table, plus F8_E8M0).
_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
}


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
    """Saves a mapping of names to tensors, a module, or nested training state as safetensors.

    Bytes go straight from tensor memory to the file (no pickle, no serialised copy), written
    by several threads at disjoint offsets. Tensors on a GPU (or any accelerator) are copied
    to the host in 8 MiB chunks, asynchronously on a side stream that first waits for the
    current stream, into a bounded pool of pinned buffers (``staging_bytes``) that the writer
    threads drain as the next chunks arrive: never a host copy of the whole model. CPU and
    GPU tensors may be mixed. The file is written under a temporary name in the
    same directory and renamed over ``path`` only once complete, so ``path`` never holds a
    partial file and an existing file survives any error. Tensors that are the same view of
    one storage (tied weights) are stored once and come back as one tensor from :func:`load`.

    A module is saved as its ``state_dict()`` (taken by zerockpt's C++ walk), and the state
    dict's ``_metadata`` (module versions) is stored too, so :func:`zerockpt.load_state_dict`
    from the file behaves as ``load_state_dict`` of the state dict itself.

    Anything else is saved as nested training state, e.g. ``{"model": model.state_dict(),
    "optim": optimizer.state_dict(), "step": 1000, "rng": torch.get_rng_state()}``: dicts,
    OrderedDicts and defaultdicts (str or int keys; a defaultdict's factory is kept if it is
    None or a builtin type, else TypeError), lists, tuples, sets, frozensets and
    argparse.Namespace, with tensor leaves (stored as tensors named by their path, e.g.
    ``optim/state/0/exp_avg``), numpy arrays and scalars of numeric dtypes, bytes and
    bytearray (stored as tensors too), and None, bool, int, float, str, torch.dtype,
    torch.Size and torch.device leaves (kept in the metadata). :func:`load` rebuilds the same
    structure, each value with its type. Nothing is pickled: any other object is a TypeError
    naming its path.

    With ``max_shard_size``, ``path`` is a directory (created if missing) that receives a
    sharded checkpoint in the Hugging Face layout, as transformers' ``save_pretrained`` writes
    it: ``model-00001-of-00003.safetensors`` ... and ``model.safetensors.index.json``
    (``{"metadata": {"total_size": ...}, "weight_map": {name: shard file}}``), always, even for
    one shard. Tensors fill shards greedily in the saved order; a tensor larger than the limit
    gets a shard of its own, and tensors sharing memory (tied weights) share a shard, so they
    stay tied. Each shard holds ``metadata``; a module's ``_metadata`` or the structure of
    nested training state goes in the index's ``metadata`` (``zerockpt.*`` entries), so both
    kinds can be sharded. All files are first written into a private staging directory inside
    ``path`` (an error there leaves ``path`` as it was), then the shards are renamed into place
    and the index last, which commits the checkpoint; then shard files of earlier saves
    (``model-*-of-*.safetensors``) that the new index does not list are removed. A crash in the
    short window between the first shard rename and the index rename leaves shards that the
    old index does not match: loading then raises ``FormatError`` rather than mixing two
    checkpoints. One sharded save at a time per directory: concurrent ones may leave an index
    whose shards were overwritten (detected on load, as above). :func:`load`, :func:`open` and
    :func:`zerockpt.load_state_dict` read the directory (or the index file).

    Args:
        tensors: Names to tensors (CPU or accelerator), any dtype the safetensors format names,
            any strides; an ``nn.Module``, saved as its state dict; or nested training state
            as above.
        path: Destination file (its directory must exist, unless ``makedirs``), or a binary
            file object: the file is written at its position, which is left just after it (as
            ``torch.save``); an ``open(..., "wb")`` file by parallel ``pwrite``, anything else
            through ``write`` in order, straight from tensor memory (checksums from a first
            pass over the tensors unless it is a ``BytesIO``). Atomicity is then the caller's;
            ``durable`` fsyncs a real file; ``max_shard_size`` and ``direct_io=True`` need a
            path.
        metadata: Extra ``str -> str`` entries for the header's ``__metadata__``. Keys starting
            with ``zerockpt.`` are reserved.
        durable: fsync the file and its directory before returning, so the checkpoint survives
            a power loss once this returns.
        direct_io: Write through O_DIRECT from reused page-aligned staging buffers, bypassing
            the page cache. ``None`` (default) uses it for durable saves of 64 MiB or more;
            file systems that refuse it fall back to buffered writes.
        threads: Writer threads; default ``min(cpu_count, 8)``.
        checksums: Store each tensor's CRC-32C (metadata ``zerockpt.crc32c``), computed from the
            bytes as they are written, for ``load(..., verify=True)`` and :func:`verify`.
        max_shard_size: Write a sharded checkpoint directory (see above) whose shards hold at
            most this many tensor bytes each: an int, or a str as transformers takes it,
            ``"5GB"``, ``"500MB"`` (powers of 1000), ``"10GiB"`` (powers of 1024). ``None``
            (default) writes the single file ``path``.
        progress: Show a progress bar of the bytes written (needs tqdm:
            ``zerockpt[progress]``). With or without it, Ctrl-C stops the save between 8 MiB
            chunks (KeyboardInterrupt): nothing is committed.
        staging_bytes: Pinned host memory for copying accelerator tensors, in 8 MiB chunks;
            default 256 MiB (less when the tensors are smaller). Unused for CPU tensors.
        makedirs: Create the missing directories above ``path`` (fsynced when ``durable``).
            A sharded save always creates its directory and those above it.

    Raises:
        ImportError: ``progress=True`` and tqdm is not installed.
        TypeError: An object, key or dtype or layout cannot be stored (the message names its
            path or key), ``metadata`` is not a mapping of str to str, ``path`` is not a str,
            ``os.PathLike`` or file object, or a text-mode file object.
        ValueError: Tensors are different but overlapping views of one storage, a tensor is on
            the meta device, metadata uses a reserved key, containers are nested too deeply,
            ``staging_bytes`` is under 8 MiB, ``threads`` is not a positive int,
            ``max_shard_size`` is not a size, ``path`` is an existing file while
            ``max_shard_size`` is given, or a file object is closed or not writable.
        FileNotFoundError: The directory to write into does not exist (``filename`` is that
            directory) and ``makedirs`` is false.
        OSError: The file could not be written (errno and filename set); ``path`` is untouched.
            One exception: with ``durable=True``, if only the final fsync of the directory
            fails, the new file is already in place (renamed) but its rename may not survive a
            power loss.
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
        _progress.run(
            progress,
            description,
            lambda counter: sharded.save_sharded(flat, where, limit, own, options, counter),
            total=_progress.unique_nbytes(flat.values()),
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
    """Loads every tensor of a safetensors file or sharded checkpoint, in the order they were saved.

    With ``mmap=True`` (default) the tensors are zero-copy views of a private (copy-on-write)
    mapping of the file: loading costs only the header, bytes are read when first touched,
    writing into a tensor never changes the file, and the mapping is released when the last
    tensor from it is freed. A file later replaced by rename (as :func:`save` does) leaves
    them unchanged; a file truncated in place by another writer may not.

    With ``device="cuda"`` (or any accelerator), reader threads pread the file into a bounded
    pool of pinned buffers and queue asynchronous host-to-device copies on the current stream,
    refilling each buffer as soon as its copies are done: the bytes never go to the device
    from pageable (mapped) memory, and the tensors are ready on the current stream when this
    returns.

    A sharded checkpoint (Hugging Face layout, from ``save(..., max_shard_size=...)``,
    transformers' ``save_pretrained`` or any writer) is read through its index: the index is
    validated, the shards are loaded in parallel (the ``threads`` are shared among them), each
    must hold exactly the tensors the index assigns to it, and the tensors come back in the
    index's order (zerockpt writes it in the saved order; transformers sorts it).

    Args:
        path: A safetensors file, from zerockpt or any other writer; an index file (a name
            ending in ``.json``, e.g. ``model.safetensors.index.json``); or a directory holding
            ``model.safetensors.index.json`` (preferred) or ``model.safetensors``. Or a binary
            file object: the file that starts at its position is read, and the object is left
            just after it (as ``torch.load``); an ``open(..., "rb")`` file is mapped or read
            from its descriptor, anything else read once into anonymous memory.
        device: Where the tensors go: ``"cpu"`` (default), or an accelerator such as
            ``"cuda"``, ``"cuda:1"``, ``torch.device("cuda", 0)`` or a device index.
        mmap: For the CPU: map the file (default) or read it eagerly into fresh memory with
            parallel preads. Ignored for other devices.
        threads: Reader (and checksum) threads; default ``min(cpu_count, 8)``.
        verify: Check every tensor's bytes against the CRC-32C stored when it was saved before
            returning. A file without checksums (from another writer) loads unchecked, with a
            warning.
        progress: Show a progress bar of the bytes read or checked (needs tqdm:
            ``zerockpt[progress]``); a mapped load without ``verify`` reads nothing up front,
            so its bar is full at once.
        staging_bytes: Pinned host memory for copying to an accelerator, in 8 MiB chunks;
            default 256 MiB (less for smaller files).
        map_location: torch.load's name for ``device``: a str or ``torch.device`` (not a dict
            or callable: the file records no device to remap from).
        weights_only: Accepted for torch.load habits: True changes nothing, since nothing is
            ever unpickled; False is refused (ValueError), as zerockpt has no mode that runs
            a file's code.

    Returns:
        A dict of names to tensors; names saved as aliases of one tensor map to the same tensor.
        A file saved from nested training state gives that structure back (same containers,
        key types and leaves).
        A file saved from a state dict with ``_metadata`` (e.g. ``save(model, path)``) gives an
        ``OrderedDict`` with that ``_metadata`` attribute, as ``model.state_dict()`` has.

    Raises:
        ChecksumError: With ``verify``, tensors whose bytes do not match their checksum (the
            message names each one).
        FormatError: The file is not valid safetensors (the message names the key or offset),
            or an index is malformed or does not match its shards (the message names it).
        OSError: The file, or a shard an index lists, cannot be opened or read (errno and
            filename set); a directory holds neither an index nor ``model.safetensors``.
        TypeError: A stored dtype has no torch equivalent, ``path`` is not a str,
            ``os.PathLike`` or file object (bytes: see :func:`load_bytes`) or is a text-mode
            one, or ``map_location`` is not a str or ``torch.device``.
        ValueError: ``device`` is the meta device, ``threads`` is not a positive int,
            ``staging_bytes`` is under 8 MiB, a file object is closed or not readable,
            ``device`` and ``map_location`` disagree, or ``weights_only=False`` (TypeError if
            it is not a bool).
        RuntimeError: ``device`` is not available (AssertionError where torch is not built
            for it, as torch itself raises).
        ImportError: ``progress=True`` and tqdm is not installed.
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

    The same bytes ``save`` writes to a file, written by several threads straight from tensor
    memory into the returned ``bytes`` (no other copy); ``safetensors.torch.load`` reads them
    (a flat dict of tensors; nested state needs :func:`load_bytes`).

    >>> data = zerockpt.save_bytes({"w": torch.ones(2)}, metadata={"step": "7"})
    >>> zerockpt.load_bytes(data)["w"]
    tensor([1., 1.])

    Args:
        obj: A mapping of names to tensors, a module or nested training state (see
            :func:`save`).
        metadata: Extra ``str -> str`` entries for the header's ``__metadata__``.
        threads: Copying threads; default ``min(cpu_count, 8)``.
        checksums: Store each tensor's CRC-32C (see :func:`save`).
        progress: Show a progress bar (needs tqdm).
        staging_bytes: Pinned host memory for copying accelerator tensors (see :func:`save`).

    Returns:
        The file's bytes.

    Raises:
        TypeError, ValueError: As :func:`save` raises them for ``obj`` and ``metadata``.
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

    ``data`` may come from :func:`save_bytes`, ``safetensors.torch.save`` or any writer.

    The bytes are validated as a file's are and copied once into anonymous memory that the
    returned CPU tensors view (freed with the last of them): ``data`` may change or go away
    afterwards. All of ``data`` must be the one file.

    >>> zerockpt.load_bytes(safetensors.torch.save({"w": torch.zeros(3)}))["w"]
    tensor([0., 0., 0.])

    Args:
        data: The file's bytes: ``bytes``, ``bytearray``, ``memoryview`` or any contiguous
            buffer.
        device: Where the tensors go, as for :func:`load`.
        threads: Reader (and checksum) threads; default ``min(cpu_count, 8)``.
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
        has_checksums: False for files that store no checksums: then nothing was checked. For
            a sharded checkpoint, true only if every shard stores them.
        tensors: Stored tensors in the file, aliases not counted (the number checked, when it
            has checksums); for a sharded checkpoint, in all its shards.
        failed: Names of the stored tensors whose bytes do not match their checksum.
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
        shape: The tensor's shape.
        data_offsets: Byte range ``(begin, end)`` in the data region, as in the header.
        alias_of: The stored tensor this name is an alias of, if it was saved as one (then
            ``data_offsets`` are that tensor's).
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
    """Lazy, read-only access to a safetensors file or sharded checkpoint; see :func:`open`.

    A mapping of names to tensors: each tensor is produced when asked for and its bytes are
    not touched before that. Tensors taken from the file stay valid after :meth:`close`; after
    it, everything that reads the file (all but :meth:`keys`, ``len`` and iteration) raises
    ``ValueError``.

    Args:
        path: A safetensors file; an index file (a name ending in ``.json``); or a directory
            holding ``model.safetensors.index.json`` or ``model.safetensors`` (see
            :func:`load`).

    Raises:
        TypeError: ``path`` is not a str or ``os.PathLike``.
        FormatError: The header is not valid safetensors, or an index is malformed or does not
            match its shards.
        OSError: The file or a shard cannot be opened or read (errno and filename set); a
            directory holds neither an index nor ``model.safetensors``.
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
        """
        handle = self._handle(name)
        handle.info(name)  # KeyError for a name a single file does not hold
        return handle.path

    def metadata(self) -> dict[str, str]:
        """Reads the header's ``__metadata__``.

        For a sharded checkpoint: that of its first shard (by name), which holds the metadata
        given to ``save`` as every shard does. The index's own metadata is in :attr:`index`.

        Returns:
            The entries, zerockpt's own ``zerockpt.*`` ones included; ``{}`` if there are none
            (or the index lists no shard).

        Raises:
            ValueError: The file is closed.
        """
        files = self._handles()
        return files[0].metadata() if files else {}

    def info(self, name: str) -> TensorInfo:
        """Describes a tensor from the header, without reading its bytes.

        Args:
            name: A tensor name.

        Returns:
            Its dtype, shape and byte range. For a sharded checkpoint the byte range is within
            the data region of the shard holding it (see :meth:`file_of`).

        Raises:
            KeyError: There is no tensor ``name``.
            ValueError: The file is closed.
        """
        fmt, shape, begin, end, alias_of = self._handle(name).info(name)
        return TensorInfo(_DTYPES.get(fmt), fmt, tuple(shape), (begin, end), alias_of)

    def verify(self, *, threads: int | None = None, progress: bool = False) -> VerifyResult:
        """Checks every tensor's bytes against its stored CRC-32C; see :func:`verify`.

        For a sharded checkpoint the shards are checked in parallel; ``has_checksums`` is true
        only if every shard stores checksums.

        Args:
            threads: Checksum threads; default ``min(cpu_count, 8)``.
            progress: Show a progress bar of the bytes checked (needs tqdm:
                ``zerockpt[progress]``).

        Returns:
            A :class:`VerifyResult` naming the tensors that fail, if any.

        Raises:
            ValueError: The file is closed, or ``threads`` is not a positive int.
            FormatError: A file's checksum metadata is malformed.
            OSError: A file cannot be read (errno and filename set).
            ImportError: ``progress=True`` and tqdm is not installed.
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
            mmap: Return a zero-copy view of a private (copy-on-write) mapping of the file,
                whose bytes are read when first touched; False reads them into a fresh tensor.

        Returns:
            The tensor; it stays valid after :meth:`close`.

        Raises:
            KeyError: There is no tensor ``name``.
            ValueError: The file is closed.
            TypeError: The stored dtype has no torch equivalent.
            OSError: With ``mmap=False``, the bytes cannot be read (errno and filename set).
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
        """Releases the file(s); tensors already taken from them stay valid."""
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

    Only the header is read and validated; each tensor's bytes are mapped when it is asked for.
    A sharded checkpoint (a directory holding ``model.safetensors.index.json``, or the index
    file; see :func:`load`) is opened as one mapping over all its shards: the index is
    validated and every shard's header is read and checked against it, in parallel.

    >>> with zerockpt.open("model.safetensors") as f:
    ...     print(f.keys(), f.info("w").shape, f.metadata())
    ...     w = f["w"]

    Args:
        path: A safetensors file, from zerockpt or any other writer; an index file (a name
            ending in ``.json``); or a directory holding ``model.safetensors.index.json``
            (preferred) or ``model.safetensors``.

    Returns:
        A :class:`TensorFile`, a read-only mapping of names to tensors; close it (or use it as
        a context manager) to release the file.

    Raises:
        TypeError: ``path`` is not a str or ``os.PathLike``.
        FormatError: The header is not valid safetensors, or an index is malformed or does not
            match its shards.
        OSError: The file or a shard cannot be opened or read (errno and filename set); a
            directory holds neither an index nor ``model.safetensors``.
    """
    return TensorFile(path)


def verify(path: PathLike, *, threads: int | None = None, progress: bool = False) -> VerifyResult:
    """Checks a file's structure and every tensor's bytes against the CRC-32C stored for it.

    The header is validated as :func:`open` does; then all tensor bytes are read (through the
    page cache, by ``threads`` threads) and checksummed. A file that stores no checksums
    (written by another tool, or with ``checksums=False``) has nothing to check:
    ``has_checksums`` is False and ``ok`` is True. A sharded checkpoint (a directory or index
    file, see :func:`load`) is checked shard by shard, in parallel.

    >>> result = zerockpt.verify("model.safetensors")
    >>> result.ok, result.failed
    (True, ())

    Args:
        path: A file, or a sharded checkpoint's directory or index file.
        threads: Checksum threads; default ``min(cpu_count, 8)``.
        progress: Show a progress bar of the bytes checked (needs tqdm:
            ``zerockpt[progress]``).

    Returns:
        A :class:`VerifyResult` naming the tensors that fail, if any.

    Raises:
        FormatError: The file is not valid safetensors, or its checksum metadata is malformed;
            an index is malformed or does not match its shards.
        OSError: The file cannot be opened or read (errno and filename set).
        TypeError: ``path`` is not a str or ``os.PathLike``.
        ValueError: ``threads`` is not a positive int.
        ImportError: ``progress=True`` and tqdm is not installed.
    """
    with TensorFile(path) as f:
        return f.verify(threads=threads, progress=progress)
