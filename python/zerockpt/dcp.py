"""torch.distributed.checkpoint storage on zerockpt: safetensors files, JSON metadata.

:class:`Writer` and :class:`Reader` are DCP ``StorageWriter`` / ``StorageReader``
implementations, for ``dcp.save``, ``dcp.async_save`` and ``dcp.load`` with DCP's planners
(resharding included)::

    import torch.distributed.checkpoint as dcp
    import zerockpt.dcp

    dcp.save(state_dict, storage_writer=zerockpt.dcp.Writer("ckpt"))
    dcp.load(state_dict, storage_reader=zerockpt.dcp.Reader("ckpt"))

A checkpoint is a directory: one safetensors file per rank, ``__<rank>_0.safetensors``, written
by the zerockpt engine (parallel, straight from tensor memory, atomic, durable, checksummed),
and ``.metadata.json``, DCP's global metadata as JSON (never pickled), committed last and
atomically by the coordinator. The coordinator removes an existing ``.metadata.json`` before
any rank writes, so a directory holds a complete checkpoint exactly when it has that file.

Values DCP itself serializes (non-tensor leaves: its planners ``torch.save`` them into bytes)
are stored as uint8 tensors and handed back to the planner as bytes, as DCP's own storage does.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import stat
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from zerockpt import _C, _args
from zerockpt._args import PathLike
from zerockpt._smallfile import MAX_JSON_BYTES, read_small_file
from zerockpt.serialization import VerifyResult
from zerockpt.serialization import verify as verify_file
from zerockpt.structure import flatten, unflatten

__all__ = [
    "DCP_VERSION",
    "FORMAT",
    "FORMAT_VERSION",
    "METADATA_FILE",
    "NATIVE_FORMAT",
    "Reader",
    "Writer",
    "decode_metadata",
    "describe",
    "encode_metadata",
    "to_file",
    "verify",
]

# The global metadata file of a checkpoint directory, committed last.
METADATA_FILE = ".metadata.json"
# The DCP metadata version this writes (that of torch's FileSystemWriter in torch 2.13).
DCP_VERSION = "1.0.0"
# The "format" and "format_version" fields of METADATA_FILE (see docs/format.md).
FORMAT = "zerockpt.dcp"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class _Location:
    """Where one write item is stored: a file of the checkpoint and a tensor name in it."""

    file: str
    name: str


@dataclasses.dataclass(frozen=True)
class _RankFiles:
    """storage_data of a rank's SavePlan: the prefix of its files."""

    prefix: str


def _item_name(index: MetadataIndex) -> str:
    """The tensor name of an item in its rank's file: the FQN, plus the chunk offset if any."""
    if index.offset is None or not any(index.offset):
        return index.fqn
    return f"{index.fqn}@{','.join(str(o) for o in index.offset)}"


def _as_bytes_tensor(data: io.BytesIO) -> torch.Tensor:
    raw = bytearray(data.getbuffer())
    if not raw:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(raw, dtype=torch.uint8)


def _separate_shared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clones tensors that share a storage with another item but are not the same view.

    zerockpt stores identical views once and refuses overlapping different views; DCP items
    may be different views of one storage (a tensor and a slice of it), which it stores apart.
    """
    _C.check_savable(tensors)  # before storages are compared: exotic tensors have none
    by_storage: dict[int, list[str]] = defaultdict(list)
    for name, t in tensors.items():
        if t.device.type != "meta" and t.numel():
            by_storage[t.untyped_storage().data_ptr()].append(name)
    out = dict(tensors)
    for names in by_storage.values():
        first = tensors[names[0]]
        for name in names[1:]:
            t = tensors[name]
            same = (
                t.dtype == first.dtype
                and t.storage_offset() == first.storage_offset()
                and t.shape == first.shape
                and t.stride() == first.stride()
            )
            if not same:
                out[name] = t.clone()
    return out


class Writer(StorageWriter):
    """Writes DCP checkpoints as safetensors files with the zerockpt engine.

    Args:
        path: The checkpoint directory (created if missing); ``checkpoint_id`` given to
            ``dcp.save`` replaces it.
        durable: fsync every file and the directory before the metadata is committed, and the
            metadata after.
        checksums: Store each tensor's CRC-32C (``Reader(verify=True)`` checks them).
        threads: Writer threads per rank; default ``min(cpu_count, 8)``.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        durable: bool = True,
        checksums: bool = True,
        threads: int | None = None,
    ) -> None:
        super().__init__()
        self.path = Path(_args.fspath(path))
        self.durable = bool(durable)
        self.checksums = bool(checksums)
        self.threads = _args.threads(threads)
        self.save_id = uuid.uuid4().hex
        self.is_coordinator = False
        self.rank: int | None = None
        self.use_collectives = True

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Starts a new save (DCP hook): a given ``checkpoint_id`` becomes the directory."""
        if checkpoint_id:
            self.path = Path(_args.fspath(checkpoint_id))
        self.save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Records whether this rank coordinates, its rank and use of collectives (DCP hook)."""
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank")
        self.use_collectives = kwargs.get("use_collectives", True)

    def _metadata_path(self) -> Path:
        if not self.use_collectives and self.rank is not None:
            return self.path / f"__{self.rank}{METADATA_FILE}"
        return self.path / METADATA_FILE

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """Creates the directory (DCP hook).

        Without collectives, this rank also names its own file and removes its old metadata.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.use_collectives and self.rank is not None:
            # No global plan step: this rank names its own files and drops its old metadata.
            self._metadata_path().unlink(missing_ok=True)
            return dataclasses.replace(plan, storage_data=_RankFiles(f"__{self.rank}_"))
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Removes the old metadata and names each rank's file (DCP hook, on the coordinator)."""
        # Runs on the coordinator before any rank writes: from here until finish() commits the
        # new metadata, the directory is not a complete checkpoint.
        self.path.mkdir(parents=True, exist_ok=True)
        self._metadata_path().unlink(missing_ok=True)
        return [
            plan
            if plan.storage_data is not None
            else dataclasses.replace(plan, storage_data=_RankFiles(f"__{i}_"))
            for i, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Writes this rank's items as one safetensors file (DCP hook); returns a done future.

        The file, ``__<rank>_0.safetensors``, is written by the zerockpt engine: atomically,
        with checksums (if ``checksums``), fsynced (if ``durable``); tensors that are not on
        the CPU are copied out through pinned memory first.
        """
        prefix = plan.storage_data.prefix if plan.storage_data is not None else "__0_"
        file_name = f"{prefix}0.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        results: list[WriteResult] = []
        for item in plan.items:
            name = _item_name(item.index)
            # A key may itself look like "fqn@offsets": keep every name in the file unique.
            base, k = name, 0
            while name in tensors:
                k += 1
                name = f"{base}#{k}"
            data = planner.resolve_data(item)
            if isinstance(data, torch.Tensor):
                tensor = data.detach()
            elif isinstance(data, io.BytesIO):
                tensor = _as_bytes_tensor(data)
            else:
                raise TypeError(f"zerockpt.dcp: item {item.index.fqn!r} resolved to {type(data)}")
            tensors[name] = tensor
            results.append(
                WriteResult(
                    index=item.index,
                    size_in_bytes=tensor.numel() * tensor.element_size(),
                    storage_data=_Location(file_name, name),
                )
            )
        tensors = _separate_shared(tensors)
        path = str(self.path / file_name)
        own = {}  # marks the file as a DCP rank file for tools
        own["zerockpt.dcp"] = json.dumps({"save_id": self.save_id})
        options = _args.save_options(
            durable=self.durable, threads=self.threads, checksums=self.checksums
        )
        if all(t.device.type == "cpu" for t in tensors.values()):
            _C.save(tensors, path, options, own)
        else:  # through pinned host memory: the snapshot path of save_async
            _C.save_async(tensors, path, options, own).result()
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Commits the checkpoint (DCP hook, on the coordinator): writes its metadata as JSON.

        The metadata file is written atomically (temporary file + rename) and, if ``durable``,
        fsynced with its directory: the directory is a complete checkpoint from then on.
        """
        storage: dict[MetadataIndex, _Location] = {}
        for rank_results in results:
            for r in rank_results:
                storage[r.index] = r.storage_data
        metadata.storage_data = storage
        metadata.storage_meta = self.storage_meta()
        metadata.version = DCP_VERSION
        text = encode_metadata(metadata)
        # Atomic (temporary file + rename) and, when durable, fsynced with its directory.
        _C.after_commit([(str(self._metadata_path()), text)], [], self.durable)

    def storage_meta(self) -> StorageMeta | None:
        """The checkpoint directory and this save's id, for DCP's metadata (DCP hook)."""
        return StorageMeta(checkpoint_id=str(self.path), save_id=self.save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """Whether ``checkpoint_id`` is a local path, which this writer takes (DCP hook)."""
        return isinstance(checkpoint_id, str | os.PathLike) and "://" not in str(checkpoint_id)


class Reader(StorageReader):
    """Reads DCP checkpoints written by :class:`Writer`, straight into the target tensors.

    Each rank opens only the files that hold its items and copies each item from a zero-copy
    mapping of its file into the tensor the planner gives (narrowed to the requested chunk),
    so only the bytes it needs are read.

    Non-tensor items are stored pickled (by DCP's ``torch.save``), and DCP's planner unpickles
    them with ``torch.load(weights_only=False)``, which can run arbitrary code. So by default
    each one is first loaded with ``torch.load(weights_only=True)``: an item it refuses raises
    ``pickle.UnpicklingError`` naming it, and the planner is handed a fresh pickle of the value
    so loaded, never the stored bytes (bytes that are no ``torch.save`` output raise
    ``FormatError``). ``allow_pickle=True`` hands the stored bytes over as DCP's own reader
    does: only for checkpoints you trust.

    Args:
        path: The checkpoint directory; ``checkpoint_id`` given to ``dcp.load`` replaces it.
        verify: Check the CRC-32C of every file this rank reads from before copying from it.
        threads: Copy threads per rank; default ``min(cpu_count, 8)``.
        allow_pickle: Let the planner unpickle non-tensor items without restriction.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        verify: bool = False,
        threads: int | None = None,
        allow_pickle: bool = False,
    ) -> None:
        super().__init__()
        self.path = Path(_args.fspath(path))
        self.allow_pickle = bool(allow_pickle)
        self.verify = bool(verify)
        self.threads = _args.threads(threads) or _C.default_threads()
        self.storage_data: dict[MetadataIndex, _Location] = {}
        self.metadata: Metadata | None = None
        self.rank: int | None = None
        self.use_collectives = True
        self.load_id = uuid.uuid4().hex

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Starts a new load (DCP hook): a given ``checkpoint_id`` becomes the directory."""
        self.storage_data = {}
        if checkpoint_id:
            self.path = Path(_args.fspath(checkpoint_id))
        self.load_id = uuid.uuid4().hex

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Reads and validates the checkpoint's ``.metadata.json`` (DCP hook).

        A missing, non-UTF-8 or malformed metadata file, one that is not a regular file (a
        FIFO, a device) or one over 256 MiB raises ``FormatError`` naming it.
        """
        rank = kwargs.get("rank")
        name = METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}"
        path = self.path / name
        try:
            text = read_small_file(str(path), MAX_JSON_BYTES, "DCP metadata").decode("utf-8")
        except FileNotFoundError:
            if rank is None and _is_native(self.path):
                raise _C.FormatError(
                    f"{self.path}: a checkpoint in torch's native DCP format "
                    f"({_NATIVE_METADATA} and {_NATIVE_SUFFIX} files), not zerockpt.dcp's: read "
                    "it with torch's FileSystemReader, or convert it with "
                    "zerockpt.dcp.to_file(..., trusted=True) if you trust its source"
                ) from None
            raise _C.FormatError(
                f"{self.path}: no {name}: not a complete zerockpt.dcp checkpoint (the save did "
                "not finish, or another writer made it)"
            ) from None
        except UnicodeDecodeError as e:
            raise _C.FormatError(f"{path}: not UTF-8 JSON: {e}") from None
        metadata = decode_metadata(text, str(path))
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        """Keeps the checkpoint's metadata, this rank and use of collectives (DCP hook)."""
        self.storage_data = metadata.storage_data
        self.metadata = metadata
        self.rank = kwargs.get("rank")
        self.use_collectives = kwargs.get("use_collectives", True)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """Returns the plan unchanged (DCP hook)."""
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Returns the plans unchanged (DCP hook)."""
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Copies this rank's items into the planner's tensors (DCP hook); returns a done future.

        The files are opened (with ``verify``, checksummed) and every tensor item is located
        and checked against the metadata (dtype, shape, chunk bounds) before any target
        changes; then the copies run on ``threads`` threads. A mismatch raises ``FormatError``
        naming the file and the tensor.
        """
        by_file: dict[str, list[Any]] = defaultdict(list)
        for item in plan.items:
            location = self.storage_data.get(item.storage_index)
            if location is None:
                raise _C.FormatError(
                    f"{self.path}: the metadata has no storage entry for {item.storage_index}"
                )
            by_file[location.file].append(item)
        files = {name: self._open(name) for name in by_file}

        def fetch(item: Any) -> torch.Tensor:
            """The stored bytes of one read item, checked against the metadata."""
            location = self.storage_data[item.storage_index]
            fqn = item.storage_index.fqn
            where = f"{self.path / location.file}: tensor {location.name!r} (for {fqn!r})"
            try:
                stored: torch.Tensor = files[location.file].get_tensor(location.name)
            except KeyError:
                raise _C.FormatError(f"{where} is not in the file") from None
            if item.type == LoadItemType.BYTE_IO:
                if stored.dtype != torch.uint8 or stored.dim() != 1:
                    raise _C.FormatError(f"{where}: bytes must be stored as a 1-D uint8 tensor")
                return stored
            md = self.metadata.state_dict_metadata.get(fqn) if self.metadata else None
            if not isinstance(md, TensorStorageMetadata) or stored.dtype != md.properties.dtype:
                expected = md.properties.dtype if isinstance(md, TensorStorageMetadata) else None
                raise _C.FormatError(f"{where}: stored as {stored.dtype}, expected {expected}")
            offsets, lengths = list(item.storage_offsets), list(item.lengths)
            if stored.dim() != len(lengths) or any(
                o + n > size for o, n, size in zip(offsets, lengths, stored.shape, strict=True)
            ):
                raise _C.FormatError(
                    f"{where}: stored shape {list(stored.shape)} does not hold the chunk at "
                    f"{offsets} of size {lengths}"
                )
            for dim, (offset, length) in enumerate(zip(offsets, lengths, strict=True)):
                stored = stored.narrow(dim, offset, length)
            return stored

        items = [item for file_items in by_file.values() for item in file_items]
        tensors = [item for item in items if item.type != LoadItemType.BYTE_IO]
        # Everything is checked before any target changes; the planner's callbacks stay on this
        # thread, the copies (GIL released) run on several.
        sources = [fetch(item) for item in tensors]
        targets = [planner.resolve_tensor(item).detach() for item in tensors]
        for item, target in zip(tensors, targets, strict=True):
            if tuple(target.shape) != tuple(item.lengths):
                raise _C.FormatError(
                    f"{self.path}: {item.storage_index.fqn}: stored chunk has shape "
                    f"{list(item.lengths)}, the target {list(target.shape)}"
                )

        def copy(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
            pair[1].copy_(pair[0])

        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            list(pool.map(copy, zip(sources, targets, strict=True)))
        for item, target in zip(tensors, targets, strict=True):
            planner.commit_tensor(item, target)
        for item in items:
            if item.type == LoadItemType.BYTE_IO:
                raw = fetch(item).numpy().tobytes()
                if not self.allow_pickle:
                    raw = self._weights_only(raw, item)
                planner.load_bytes(item, io.BytesIO(raw))
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _weights_only(self, raw: bytes, item: Any) -> bytes:
        """A pickle of the item as ``torch.load(weights_only=True)`` loads it (see the class)."""
        location = self.storage_data[item.storage_index]
        try:
            value = torch.load(io.BytesIO(raw), weights_only=True)
        except Exception as e:  # torch.load fails in many ways: refused, or corrupt bytes
            why = _torch_load_error(e)
            where = f"{self.path / location.file}: item {item.storage_index.fqn!r}"
            # The refusal is pickle's UnpicklingError, raised again with the item named (this
            # package imports no pickle module); anything else means the bytes are corrupt.
            if not any(c.__name__ == "UnpicklingError" for c in type(e).__mro__):
                raise _C.FormatError(f"{where}: not a torch.save pickle ({why})") from e
            raise type(e)(
                f"{where}: torch.load(weights_only=True) refuses it ({why}); pass "
                "allow_pickle=True to zerockpt.dcp.Reader only if you trust this checkpoint"
            ) from e
        buffer = io.BytesIO()
        torch.save(value, buffer)
        return buffer.getvalue()

    def _open(self, name: str) -> Any:
        return _open_rank_file(self.path, name, verify=self.verify)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """Whether ``checkpoint_id`` is a local path, which this reader takes (DCP hook)."""
        return isinstance(checkpoint_id, str | os.PathLike) and "://" not in str(checkpoint_id)


def _torch_load_error(e: Exception) -> str:
    """Why ``torch.load`` failed, on one line (its refusals come with a page of advice)."""
    text = " ".join(str(e).split())
    _, refused, reason = text.partition("WeightsUnpickler error:")
    if refused:
        reason = reason.split(" Check the documentation")[0].strip().split(". ")[0]
        return f"WeightsUnpickler error: {reason}"
    return text or type(e).__name__


def _rank_file(directory: Path, name: str) -> Path:
    """The path of a file that a checkpoint's metadata names; FormatError unless a plain name."""
    if "/" in name or name in ("", ".", ".."):
        raise _C.FormatError(f"{directory}: invalid file name {name!r} in the metadata")
    return directory / name


def _open_rank_file(directory: Path, name: str, *, verify: bool = False) -> _C._File:
    """Opens (validates the header of) a file the metadata names; with ``verify``, checksums."""
    f = _C._File(str(_rank_file(directory, name)))
    if verify:
        f.verify(0, True)
    return f


# --- metadata as JSON ------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_attr(name: object, kind: type, what: str, path: str) -> Any:
    value = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(value, kind):
        raise _C.FormatError(f"{path}: {what} {name!r} is not a torch {kind.__name__}")
    return value


def encode_metadata(metadata: Metadata) -> str:
    """Encodes DCP's global metadata as the JSON of ``.metadata.json`` (see docs/format.md).

    Args:
        metadata: DCP's ``Metadata``, its ``storage_data`` mapping each item to where
            :class:`Writer` stored it. Its planner data may hold only what :func:`zerockpt.save`
            keeps as nested state without tensors: dicts, lists and tuples of str, int, float,
            bool and None.

    Returns:
        The JSON text, which :func:`decode_metadata` reads back.

    Raises:
        TypeError: The planner data holds an object that cannot be stored (the message names
            its path).
        ValueError: The planner data holds tensors, or is nested too deeply.
    """
    entries: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            entries[fqn] = {"bytes": True}
            continue
        p = md.properties
        entries[fqn] = {
            "dtype": _dtype_name(p.dtype),
            "layout": str(p.layout).removeprefix("torch."),
            "requires_grad": bool(p.requires_grad),
            "memory_format": str(p.memory_format).removeprefix("torch."),
            "pin_memory": bool(p.pin_memory),
            "size": list(md.size),
            "chunks": [[list(c.offsets), list(c.sizes)] for c in md.chunks],
        }
    storage = [
        [
            index.fqn,
            None if index.offset is None else list(index.offset),
            index.index,
            location.file,
            location.name,
        ]
        for index, location in (metadata.storage_data or {}).items()
    ]
    tensors, planner_data = flatten(metadata.planner_data)
    if tensors:
        raise ValueError("zerockpt.dcp: the planner data holds tensors, which it cannot store")
    meta = metadata.storage_meta
    return json.dumps(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "version": metadata.version,
            "state_dict_metadata": entries,
            "storage_data": storage,
            "planner_data": json.loads(planner_data),
            "storage_meta": None
            if meta is None
            else {
                "checkpoint_id": None if meta.checkpoint_id is None else str(meta.checkpoint_id),
                "save_id": meta.save_id,
                "modules": list(meta.modules),
            },
        },
        allow_nan=False,
    )


def _ints(value: object, what: str, path: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 for v in value
    ):
        raise _C.FormatError(f"{path}: {what} must be a list of non-negative int64 values")
    return value


def _str(value: object, what: str, path: str) -> str:
    if not isinstance(value, str):
        raise _C.FormatError(f"{path}: {what} must be a string")
    return value


def decode_metadata(text: str, path: str) -> Metadata:
    """Decodes :func:`encode_metadata` output back into DCP's ``Metadata``, checking every field.

    Args:
        text: The JSON text, e.g. the contents of ``.metadata.json``.
        path: Where the text was read from, for error messages.

    Returns:
        DCP's ``Metadata``, its ``storage_data`` mapping each item to the file and tensor name
        that hold it.

    Raises:
        FormatError: The text is not JSON, not zerockpt.dcp metadata of a supported
            ``format_version``, or a field is malformed (the message names ``path`` and the
            field).
    """

    def reject(token: str) -> Any:
        raise ValueError(f"{token} is not JSON")

    try:
        doc = json.loads(text, parse_constant=reject)
    except (ValueError, RecursionError) as error:
        raise _C.FormatError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _C.FormatError(f'{path}: not zerockpt.dcp metadata (no "format": "{FORMAT}")')
    if doc.get("format_version") != FORMAT_VERSION:
        raise _C.FormatError(
            f"{path}: metadata format_version {doc.get('format_version')!r} is not supported "
            f"(this zerockpt reads {FORMAT_VERSION})"
        )
    entries = doc.get("state_dict_metadata")
    if not isinstance(entries, dict):
        raise _C.FormatError(f"{path}: state_dict_metadata must be an object")
    sdm: dict[str, Any] = {}
    for fqn, e in entries.items():
        where = f"state_dict_metadata[{fqn!r}]"
        if not isinstance(e, dict):
            raise _C.FormatError(f"{path}: {where} must be an object")
        if e.get("bytes") is True:
            sdm[fqn] = BytesStorageMetadata()
            continue
        chunks = e.get("chunks")
        if not isinstance(chunks, list) or not all(
            isinstance(c, list) and len(c) == 2 for c in chunks
        ):
            raise _C.FormatError(f"{path}: {where}.chunks must be a list of [offsets, sizes]")
        props = TensorProperties(
            dtype=_torch_attr(e.get("dtype"), torch.dtype, f"{where}.dtype", path),
            layout=_torch_attr(e.get("layout"), torch.layout, f"{where}.layout", path),
            requires_grad=bool(e.get("requires_grad", False)),
            memory_format=_torch_attr(
                e.get("memory_format"), torch.memory_format, f"{where}.memory_format", path
            ),
            pin_memory=bool(e.get("pin_memory", False)),
        )
        sdm[fqn] = TensorStorageMetadata(
            properties=props,
            size=torch.Size(_ints(e.get("size"), f"{where}.size", path)),
            chunks=[
                ChunkStorageMetadata(
                    offsets=torch.Size(_ints(o, f"{where}.chunks offsets", path)),
                    sizes=torch.Size(_ints(s, f"{where}.chunks sizes", path)),
                )
                for o, s in chunks
            ],
        )
    storage_list = doc.get("storage_data")
    if not isinstance(storage_list, list):
        raise _C.FormatError(f"{path}: storage_data must be a list")
    storage: dict[MetadataIndex, _Location] = {}
    for k, entry in enumerate(storage_list):
        where = f"storage_data[{k}]"
        if not isinstance(entry, list) or len(entry) != 5:
            raise _C.FormatError(f"{path}: {where} must be [fqn, offset, index, file, name]")
        fqn, offset, index, file, name = entry
        if index is not None and (not isinstance(index, int) or isinstance(index, bool)):
            raise _C.FormatError(f"{path}: {where} index must be an int or null")
        storage[
            MetadataIndex(
                fqn=_str(fqn, f"{where} fqn", path),
                offset=None if offset is None else torch.Size(_ints(offset, where, path)),
                index=index,
            )
        ] = _Location(_str(file, f"{where} file", path), _str(name, f"{where} name", path))
    try:
        planner_data = unflatten({}, json.dumps(doc.get("planner_data")), path)
    except _C.FormatError:
        raise
    except (TypeError, ValueError, KeyError) as e:
        raise _C.FormatError(f"{path}: planner_data is not valid: {e}") from None
    meta = doc.get("storage_meta")
    storage_meta = None
    if meta is not None:
        if not isinstance(meta, dict):
            raise _C.FormatError(f"{path}: storage_meta must be an object or null")
        for key in ("checkpoint_id", "save_id"):
            if not isinstance(meta.get(key), str | None):
                raise _C.FormatError(f"{path}: storage_meta.{key} must be a string or null")
        modules = meta.get("modules", [])
        if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
            raise _C.FormatError(f"{path}: storage_meta.modules must be a list of strings")
        storage_meta = StorageMeta(
            checkpoint_id=meta.get("checkpoint_id"), save_id=meta.get("save_id"), modules=modules
        )
    version = doc.get("version")
    return Metadata(
        state_dict_metadata=sdm,
        planner_data=planner_data,
        storage_data=storage,
        storage_meta=storage_meta,
        version=version if isinstance(version, str) else None,
    )


# --- inspection and verification (zerockpt inspect / verify) --------------------------------

# Non-tensor items larger than this are not decoded by describe().
_ITEM_VALUE_MAX_BYTES = 64 << 10


def describe(checkpoint: PathLike, *, trusted: bool = False) -> dict[str, Any]:
    """Describes a DCP checkpoint: what ``zerockpt inspect --json`` prints.

    Only the metadata and the rank files' headers are read, and the bytes of small non-tensor
    items, decoded with ``torch.load(weights_only=True)``; tensor bytes are not touched. A
    checkpoint written by torch's own ``FileSystemWriter`` is read only with ``trusted=True``
    (see :func:`to_file`).

    Args:
        checkpoint: The checkpoint directory.
        trusted: Read a checkpoint in torch's native format, whose metadata is a pickle.

    Returns:
        A JSON-ready dict: ``path``, ``kind`` (``"dcp"``), ``format`` (``"zerockpt.dcp"``, or
        ``"torch.distributed.checkpoint"`` for torch's own layout), ``files`` and
        ``file_bytes`` (the rank files), ``tensors`` (name, dtype, shape, nbytes, chunks,
        files of each tensor), ``total_bytes``, ``items`` (the non-tensor values: name, file,
        nbytes, and their ``type``, ``repr`` and ``value`` when decoded), ``zerockpt``
        (``dcp_version``, ``save_id``, ``rank_files``) and ``checksums`` (``stored``;
        ``verified`` None).

    Raises:
        FormatError: The checkpoint is incomplete (no ``.metadata.json``), its metadata is
            malformed, or a rank file is not valid safetensors; or it is in torch's native
            format and ``trusted`` is false.
        OSError: A file cannot be opened or read (errno and filename set).
        TypeError: ``checkpoint`` is not a str or ``os.PathLike``.
    """
    root = _args.fspath(checkpoint)
    directory = Path(root)
    if _is_native(directory):
        return _describe_native(root, _read_native_metadata(directory, trusted))
    metadata = Reader(directory).read_metadata()
    locations: dict[str, list[_Location]] = defaultdict(list)
    for index, location in metadata.storage_data.items():
        locations[index.fqn].append(location)
    files = sorted({location.file for chunks in locations.values() for location in chunks})
    opened: dict[str, _C._File] = {}

    def open_file(name: str) -> _C._File:
        if name not in opened:
            opened[name] = _open_rank_file(directory, name)
        return opened[name]

    tensors: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    total = 0
    for fqn, md in metadata.state_dict_metadata.items():
        where = locations.get(fqn, [])
        if isinstance(md, BytesStorageMetadata):
            item: dict[str, Any] = {"name": fqn, "nbytes": None}
            if where:
                item["file"] = where[0].file
                _, _, begin, end, _ = open_file(where[0].file).info(where[0].name)
                item["nbytes"] = end - begin
                if end - begin <= _ITEM_VALUE_MAX_BYTES:
                    stored = open_file(where[0].file).get_tensor(where[0].name)
                    item.update(_decoded_item(stored.numpy().tobytes()))
            items.append(item)
            continue
        dtype = md.properties.dtype
        nbytes = math.prod(md.size) * torch.empty((), dtype=dtype).element_size()
        total += nbytes
        tensors.append(
            {
                "name": fqn,
                "dtype": _dtype_name(dtype),
                "shape": list(md.size),
                "nbytes": nbytes,
                "chunks": len(md.chunks),
                "files": sorted({location.file for location in where}),
            }
        )
    headers = [open_file(name).metadata() for name in files]
    storage_meta = metadata.storage_meta
    return {
        "path": root,
        "kind": "dcp",
        "format": FORMAT,
        "files": [os.path.join(root, name) for name in files],
        "file_bytes": sum(os.path.getsize(os.path.join(root, name)) for name in files),
        "tensors": tensors,
        "total_bytes": total,
        "metadata": {},
        "zerockpt": {
            "dcp_version": metadata.version,
            "save_id": None if storage_meta is None else storage_meta.save_id,
            "rank_files": len(files),
        },
        "items": items,
        "checksums": {
            "stored": bool(headers) and all(_C.CHECKSUM_KEY in h for h in headers),
            "verified": None,
            "failed": [],
        },
    }


def _decoded_item(raw: bytes) -> dict[str, Any]:
    """``type``, and ``repr`` and ``value`` where readable, of a non-tensor item's bytes.

    The bytes are DCP's ``torch.save`` of the value, read with ``torch.load(weights_only=True)``;
    ``value`` is given only when it is plain JSON data.
    """
    try:
        value = torch.load(io.BytesIO(raw), weights_only=True)
    except Exception:  # torch.load fails in many ways (refused, corrupt): shown as not decoded
        return {"type": "?"}
    decoded: dict[str, Any] = {"type": type(value).__name__, "repr": repr(value)}
    if _jsonable(value):
        decoded["value"] = value
    return decoded


def _jsonable(value: object) -> bool:
    if value is None or isinstance(value, bool | int | str):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple):
        return all(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _jsonable(v) for k, v in value.items())
    return False


def _listed(names: list[str], limit: int = 10) -> str:
    """``"a, b and 3 more"``: names for a message, at most ``limit`` of them."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def verify(checkpoint: PathLike, *, trusted: bool = False) -> VerifyResult:
    """Checks a DCP checkpoint: its structure, then every checksum.

    Every tensor the metadata names must be in the rank file it names; then each rank file is
    checked as :func:`zerockpt.verify` checks a file. A checkpoint in torch's own layout
    (read only with ``trusted=True``, see :func:`to_file`) stores no checksums: its structure
    is checked (every item's bytes lie in an existing file, every tensor's chunks tile it).

    Args:
        checkpoint: The checkpoint directory.
        trusted: Read a checkpoint in torch's native format, whose metadata is a pickle.

    Returns:
        A :class:`zerockpt.VerifyResult` for the whole checkpoint: ``has_checksums`` only if
        every rank file stores them; ``tensors`` and ``failed`` over all rank files.

    Raises:
        FormatError: The checkpoint is incomplete or its metadata malformed, the metadata names
            a tensor without stored data, or a rank file is malformed or lacks a tensor it
            should hold; or the checkpoint is in torch's native format and ``trusted`` is
            false.
        OSError: A file is missing or unreadable (errno and filename set).
        TypeError: ``checkpoint`` is not a str or ``os.PathLike``.
    """
    directory = Path(_args.fspath(checkpoint))
    if _is_native(directory):
        metadata = _read_native_metadata(directory, trusted)  # checks the structure
        return VerifyResult(str(directory), False, len(metadata.storage_data), ())
    metadata = Reader(directory).read_metadata()
    by_file: dict[str, list[str]] = defaultdict(list)
    for location in metadata.storage_data.values():
        by_file[location.file].append(location.name)
    stored_fqns = {index.fqn for index in metadata.storage_data}
    missing = [fqn for fqn in metadata.state_dict_metadata if fqn not in stored_fqns]
    if missing:
        raise _C.FormatError(f"{directory}: the metadata stores no data for {_listed(missing)}")
    has_checksums = True
    failed: list[str] = []
    checked = 0
    for name in sorted(by_file):
        f = _open_rank_file(directory, name)
        held = set(f.keys())
        absent = [stored for stored in by_file[name] if stored not in held]
        if absent:
            raise _C.FormatError(f"{f.path}: does not hold {_listed(absent)}")
        result = verify_file(f.path)
        has_checksums = has_checksums and result.has_checksums
        failed.extend(result.failed)
        checked += result.tensors
    return VerifyResult(str(directory), has_checksums, checked, tuple(failed))


# --- conversion to ordinary files ------------------------------------------------------------


def to_file(
    checkpoint: PathLike,
    destination: PathLike,
    *,
    max_shard_size: int | str | None = None,
    durable: bool = True,
    progress: bool = False,
    trusted: bool = False,
) -> None:
    """Converts a DCP checkpoint into one zerockpt file (or HF shards).

    The checkpoint is one written by :class:`Writer` or, with ``trusted=True``, by torch's own
    ``FileSystemWriter`` (``dcp.save(state, checkpoint_id=directory)``: a ``.metadata`` file
    and ``*.distcp`` files). Torch's metadata is a pickle, which can run arbitrary code when
    read, so such a checkpoint is read only when ``trusted`` says its source is trusted; it is
    then read by torch's own reader and planner, as ``dcp_to_torch_save`` reads it, and the
    full state is held in memory while it is written.

    The result is what :func:`zerockpt.load` returns for the full, unsharded state: the nested
    structure DCP flattened is rebuilt from its planner data, DTensor and sharded tensors are
    assembled from their chunks, and non-tensor values (which DCP stores with ``torch.save``)
    are read with ``torch.load(weights_only=True)``. Memory stays small: tensors stored whole
    are written straight from a mapping of the rank files, and sharded ones are assembled in a
    mapping of a temporary file beside ``destination`` (removed at once: only the page cache
    holds them), never in the process's own memory all at once.

    Args:
        checkpoint: The checkpoint directory.
        destination: The file to write (or a directory, with ``max_shard_size``).
        max_shard_size: Write Hugging Face-style shards of at most this size (see
            :func:`zerockpt.save`) instead of one file.
        durable: fsync what is written.
        progress: Show a progress bar of the bytes written (needs tqdm).
        trusted: Read a checkpoint in torch's native format (its pickled metadata, and its
            non-tensor values with ``torch.load(weights_only=False)``). Only for checkpoints
            from a trusted source.

    Nothing in zerockpt.dcp metadata is trusted: each tensor's chunks must have its dtype and
    rank, lie inside it, not overlap and cover it exactly (at most 16384 chunks per tensor);
    each stored tensor may serve one storage entry only; and a non-tensor item's tensors may
    not need more bytes than were stored for it. So the output never holds more bytes than the
    rank files.

    Raises:
        FormatError: The checkpoint is incomplete (no ``.metadata.json``, or no ``.metadata``
            beside ``*.distcp`` files) or malformed, a rank file does not hold what the
            metadata says, or a check above fails (the message names the tensor or file); or
            it is in torch's native format and ``trusted`` is false. Nothing is written then.
        OSError: A file cannot be read or written (errno and filename set).
        pickle.UnpicklingError: A non-tensor value of a zerockpt.dcp checkpoint needs more than
            ``torch.load`` allows with ``weights_only=True``.
        TypeError: ``checkpoint`` or ``destination`` is not a str or ``os.PathLike``,
            ``max_shard_size`` is neither an int nor a str, or a value cannot be stored (see
            :func:`zerockpt.save`).
        ValueError: ``max_shard_size`` is not a positive size.
        ImportError: ``progress=True`` and tqdm is not installed.
    """
    from zerockpt.serialization import save

    directory = Path(_args.fspath(checkpoint))
    dest = Path(_args.fspath(destination))
    native = _is_native(directory)
    metadata = (
        _read_native_metadata(directory, trusted) if native else Reader(directory).read_metadata()
    )
    scratch_dir = dest if max_shard_size is not None else dest.parent
    scratch_dir.mkdir(parents=True, exist_ok=True)
    if native:
        state = _load_native(directory, metadata)
    else:
        state = _assemble_state(directory, metadata, scratch_dir)
    if max_shard_size is None:
        save(state, dest, durable=durable, progress=progress)
    else:
        save(state, dest, durable=durable, max_shard_size=max_shard_size, progress=progress)


def _assemble_state(directory: Path, metadata: Metadata, scratch_dir: Path) -> Any:
    """The full state of a zerockpt.dcp checkpoint, checked as :func:`to_file` says."""
    from torch.distributed.checkpoint._nested_dict import unflatten_state_dict

    reader = Reader(directory)
    storage: dict[MetadataIndex, _Location] = metadata.storage_data
    by_fqn: dict[str, list[tuple[MetadataIndex, _Location]]] = defaultdict(list)
    # Each stored tensor is used once, so the output never holds more bytes than are stored.
    used: dict[tuple[str, str], MetadataIndex] = {}
    for index, location in storage.items():
        if index.fqn not in metadata.state_dict_metadata:
            continue  # never read
        first = used.setdefault((location.file, location.name), index)
        if first is not index:
            raise _C.FormatError(
                f"{reader.path}: storage entries for {first.fqn!r} and {index.fqn!r} both point "
                f"at tensor {location.name!r} of {location.file}"
            )
        by_fqn[index.fqn].append((index, location))
    files: dict[str, Any] = {}

    def stored(location: _Location) -> torch.Tensor:
        if location.file not in files:
            files[location.file] = reader._open(location.file)
        tensor: torch.Tensor = files[location.file].get_tensor(location.name)
        return tensor

    flat: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        pieces = by_fqn.get(fqn)
        if not pieces:
            raise _C.FormatError(f"{reader.path}: no stored data for {fqn!r}")
        if isinstance(md, BytesStorageMetadata):
            if len(pieces) != 1:
                raise _C.FormatError(f"{reader.path}: {len(pieces)} storage entries for {fqn!r}")
            raw = stored(pieces[0][1]).numpy().tobytes()
            value = torch.load(io.BytesIO(raw), weights_only=True)
            _check_unpickled_size(value, len(raw), f"{reader.path}: item {fqn!r}")
            flat[fqn] = value
            continue
        chunks = _check_tiling(
            fqn, md, [(index, stored(location)) for index, location in pieces], reader.path
        )
        if len(chunks) == 1 and tuple(chunks[0][1].shape) == tuple(md.size):
            flat[fqn] = chunks[0][1]  # a zero-copy view of the rank file
            continue
        flat[fqn] = _assemble(md, chunks, scratch_dir)
    mappings = metadata.planner_data
    return unflatten_state_dict(flat, mappings) if mappings else flat


# More chunks per tensor than any real checkpoint has; bounds the overlap check's cost.
_MAX_CHUNKS = 1 << 14


def _check_tiling(
    fqn: str,
    md: TensorStorageMetadata,
    pieces: list[tuple[MetadataIndex, torch.Tensor]],
    path: Path,
) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """The chunks of ``fqn`` as (offsets, stored tensor), checked to tile ``md.size`` exactly.

    Each chunk has the metadata's dtype (and :func:`_check_boxes` holds). FormatError naming
    the tensor otherwise.
    """
    where = f"{path}: tensor {fqn!r}"
    size = tuple(md.size)
    if len(pieces) > _MAX_CHUNKS:
        raise _C.FormatError(f"{where}: {len(pieces)} chunks, more than {_MAX_CHUNKS}")
    chunks: list[tuple[tuple[int, ...], torch.Tensor]] = []
    for index, chunk in pieces:
        offsets = tuple(index.offset) if index.offset is not None else (0,) * len(size)
        if chunk.dtype != md.properties.dtype:
            raise _C.FormatError(f"{where}: a chunk is {chunk.dtype}, not {md.properties.dtype}")
        chunks.append((offsets, chunk))
    _check_boxes(where, size, [(offsets, tuple(chunk.shape)) for offsets, chunk in chunks])
    return chunks


def _check_boxes(
    where: str, size: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]
) -> None:
    """The chunks ``(offsets, lengths)`` of a tensor of ``size`` tile it exactly.

    Each chunk has the tensor's rank and lies inside it; no two overlap; together they cover
    every element (at most 16384 chunks). FormatError starting with ``where`` otherwise.
    """
    if len(boxes) > _MAX_CHUNKS:
        raise _C.FormatError(f"{where}: {len(boxes)} chunks, more than {_MAX_CHUNKS}")
    for offsets, lengths in boxes:
        if (
            len(offsets) != len(size)
            or len(lengths) != len(size)
            or any(o + n > d for o, n, d in zip(offsets, lengths, size, strict=True))
        ):
            raise _C.FormatError(
                f"{where}: the chunk at {list(offsets)} of shape {list(lengths)} does not lie "
                f"inside its size {list(size)}"
            )
    covered = sum(math.prod(lengths) for _, lengths in boxes)
    numel = math.prod(size)
    if covered != numel:
        raise _C.FormatError(f"{where}: the chunks hold {covered} elements, the tensor {numel}")
    # Equal volumes and no overlap: an exact tiling. Sweep along dimension 0; each chunk is
    # compared (vectorised) with the earlier ones it may meet there.
    boxes = sorted((o, n) for o, n in boxes if math.prod(n) > 0)
    if len(size) == 0:
        return  # a scalar: one non-empty chunk, since the volumes agree
    lo = torch.tensor([o for o, _ in boxes], dtype=torch.int64).reshape(len(boxes), len(size))
    hi = lo + torch.tensor([n for _, n in boxes], dtype=torch.int64).reshape(lo.shape)
    active = torch.zeros(0, dtype=torch.int64)
    for i in range(len(boxes)):
        active = active[hi[active, 0] > lo[i, 0]]
        meets = torch.all((lo[active] < hi[i]) & (lo[i] < hi[active]), dim=1)
        if bool(meets.any()):
            j = int(active[int(torch.argmax(meets.to(torch.uint8)))])
            raise _C.FormatError(
                f"{where}: the chunks at {boxes[j][0]} and {boxes[i][0]} overlap "
                f"(sizes {boxes[j][1]} and {boxes[i][1]})"
            )
        active = torch.cat([active, torch.tensor([i])])


def _check_unpickled_size(value: Any, stored_bytes: int, where: str) -> None:
    """A non-tensor item's tensors may not need more bytes than were stored for it."""
    tensors, _ = flatten([value])
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    if needed > stored_bytes:
        raise _C.FormatError(
            f"{where}: its tensors would take {needed} bytes, from {stored_bytes} stored bytes "
            "(expanded views)"
        )


def _assemble(
    md: TensorStorageMetadata,
    chunks: list[tuple[tuple[int, ...], torch.Tensor]],
    scratch_dir: Path,
) -> torch.Tensor:
    """The full tensor from its checked chunks, in a mapping of an unlinked temporary file."""
    import tempfile

    dtype = md.properties.dtype
    numel = math.prod(md.size)
    fd, name = tempfile.mkstemp(prefix=".assemble.", suffix=".zerockpt-tmp", dir=scratch_dir)
    try:
        os.ftruncate(fd, max(1, numel) * torch.empty((), dtype=dtype).element_size())
        full = torch.from_file(name, shared=True, size=numel, dtype=dtype).view(md.size)
    finally:
        os.close(fd)
        os.unlink(name)  # the mapping stays valid; nothing is left behind
    for offsets, chunk in chunks:
        target = full
        for dim, (offset, length) in enumerate(zip(offsets, chunk.shape, strict=True)):
            target = target.narrow(dim, offset, length)
        target.copy_(chunk)
    return full


# --- torch's native DCP checkpoints (FileSystemWriter) --------------------------------------

# torch's FileSystemWriter layout: pickled global metadata, and data files of this suffix.
_NATIVE_METADATA = ".metadata"
_NATIVE_SUFFIX = ".distcp"
# describe()'s "format" of such a checkpoint.
NATIVE_FORMAT = "torch.distributed.checkpoint"


def _is_native(directory: Path) -> bool:
    """Whether ``directory`` holds torch's own DCP layout (not zerockpt.dcp's)."""
    if (directory / METADATA_FILE).exists():
        return False
    if (directory / _NATIVE_METADATA).exists():
        return True
    try:
        names = os.listdir(directory)
    except OSError:
        return False  # reading it as a zerockpt.dcp checkpoint reports the problem
    return any(name.endswith(_NATIVE_SUFFIX) for name in names)


def _read_native_metadata(directory: Path, trusted: bool) -> Metadata:
    """The unpickled ``.metadata`` of a native checkpoint, its structure checked.

    FormatError if the checkpoint is incomplete, ``trusted`` is false (the pickle is not
    read then), the metadata is not DCP's, or :func:`_check_native` fails.
    """
    path = directory / _NATIVE_METADATA
    if not path.exists():
        raise _C.FormatError(
            f"{directory}: {_NATIVE_SUFFIX} files without {_NATIVE_METADATA}: not a complete "
            "torch DCP checkpoint (the save did not finish)"
        )
    if not trusted:
        raise _C.FormatError(
            f"{directory}: a checkpoint in torch's native DCP format ({_NATIVE_METADATA} and "
            f"{_NATIVE_SUFFIX} files, written by torch.distributed.checkpoint's "
            f"FileSystemWriter); its metadata is a pickle, which can run arbitrary code when "
            "read: pass --trust (trusted=True in Python) to read it, only if you trust its "
            "source"
        )
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise _C.FormatError(f"{path}: not a regular file")
    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except OSError:
        raise
    except Exception as e:  # unpickling fails in many ways: truncated, unknown classes...
        raise _C.FormatError(
            f"{path}: not torch DCP metadata ({type(e).__name__}: {' '.join(str(e).split())})"
        ) from e
    if (
        not isinstance(metadata, Metadata)
        or not isinstance(metadata.state_dict_metadata, dict)
        or not isinstance(metadata.storage_data, dict)
    ):
        raise _C.FormatError(f"{path}: not torch DCP metadata (a {type(metadata).__name__})")
    _check_native(directory, metadata)
    return metadata


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_native(directory: Path, metadata: Metadata) -> None:
    """Every item's bytes lie in an existing file, and every tensor's chunks tile it.

    A tensor chunk stored without transforms (compression) has at least its own bytes, so
    no tensor takes more memory than its files hold. FormatError naming the file and item,
    or the tensor, otherwise; FileNotFoundError naming a missing file.
    """
    where = directory / _NATIVE_METADATA
    storage = metadata.storage_data
    sizes: dict[str, int] = {}
    for index, info in storage.items():
        fqn = getattr(index, "fqn", index)
        name = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not isinstance(name, str) or not _int(offset) or not _int(length):
            raise _C.FormatError(f"{where}: the storage entry of {fqn!r} is malformed: {info!r}")
        assert isinstance(offset, int) and isinstance(length, int)
        if name not in sizes:
            file = _rank_file(directory, name)
            mode = os.stat(file)  # FileNotFoundError names a missing file
            if not stat.S_ISREG(mode.st_mode):
                raise _C.FormatError(f"{file}: not a regular file")
            sizes[name] = mode.st_size
        if offset + length > sizes[name]:
            raise _C.FormatError(
                f"{directory / name}: {sizes[name]} bytes, but the metadata stores {fqn!r} at "
                f"bytes {offset} to {offset + length} (the file is truncated)"
            )
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            if MetadataIndex(fqn) not in storage:
                raise _C.FormatError(f"{where}: no stored data for {fqn!r}")
            continue
        if not isinstance(md, TensorStorageMetadata) or not isinstance(
            md.properties.dtype, torch.dtype
        ):
            raise _C.FormatError(f"{where}: the entry of {fqn!r} is malformed: {md!r:.200}")
        tensor = f"{where}: tensor {fqn!r}"
        _check_boxes(
            tensor, tuple(md.size), [(tuple(c.offsets), tuple(c.sizes)) for c in md.chunks]
        )
        element_size = torch.empty((), dtype=md.properties.dtype).element_size()
        for chunk in md.chunks:
            info = storage.get(MetadataIndex(fqn, chunk.offsets))
            if info is None:
                raise _C.FormatError(
                    f"{tensor}: no stored data for its chunk at {list(chunk.offsets)}"
                )
            needed = math.prod(chunk.sizes) * element_size
            if not getattr(info, "transform_descriptors", None) and info.length < needed:
                raise _C.FormatError(
                    f"{directory / info.relative_path}: {info.length} bytes stored for the chunk "
                    f"of {fqn!r} at {list(chunk.offsets)}, which needs {needed}"
                )


class _NativeReader(FileSystemReader):
    """torch's reader, one item at a time: a failure names the file, the item and its bytes."""

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            try:
                super().read_data(dataclasses.replace(plan, items=[item]), planner).wait()
            except OSError:
                raise
            except Exception as e:  # torch.load and the planner fail in many ways
                file = Path(self.path) / info.relative_path
                raise _C.FormatError(
                    f"{file}: cannot read {item.storage_index.fqn!r} (bytes {info.offset} to "
                    f"{info.offset + info.length}): {type(e).__name__}: {_torch_load_error(e)}"
                ) from e
        future: Future[None] = Future()
        future.set_result(None)
        return future


def _load_native(directory: Path, metadata: Metadata) -> Any:
    """The full state of a native checkpoint, as torch's ``dcp_to_torch_save`` loads it.

    torch's planner rebuilds the nested state from the metadata and its reader fills it; the
    steps ``dcp.load`` takes, without a process group.
    """
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

    state: dict[str, Any] = {}
    planner = _EmptyStateDictLoadPlanner()  # type: ignore[no-untyped-call]
    reader = _NativeReader(str(directory))
    planner.set_up_planner(state, metadata, True)
    reader.set_up_storage_reader(metadata, True)
    plan = reader.prepare_local_plan(planner.create_local_plan())
    plan = reader.prepare_global_plan(planner.create_global_plan([plan]))[0]
    reader.read_data(planner.finish_plan(plan), planner).wait()
    return state


def _describe_native(root: str, metadata: Metadata) -> dict[str, Any]:
    """:func:`describe` of a native checkpoint whose metadata :func:`_check_native` passed."""
    directory = Path(root)
    by_fqn: dict[str, list[Any]] = defaultdict(list)
    for index, info in metadata.storage_data.items():
        by_fqn[index.fqn].append(info)
    files = sorted({info.relative_path for info in metadata.storage_data.values()})
    tensors: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    total = 0
    for fqn, md in metadata.state_dict_metadata.items():
        where = by_fqn[fqn]
        if isinstance(md, BytesStorageMetadata):
            info = where[0]
            item: dict[str, Any] = {"name": fqn, "nbytes": info.length, "file": info.relative_path}
            if info.length <= _ITEM_VALUE_MAX_BYTES and not getattr(
                info, "transform_descriptors", None
            ):
                with open(directory / info.relative_path, "rb") as f:
                    f.seek(info.offset)
                    item.update(_decoded_item(f.read(info.length)))
            items.append(item)
            continue
        dtype = md.properties.dtype
        nbytes = math.prod(md.size) * torch.empty((), dtype=dtype).element_size()
        total += nbytes
        tensors.append(
            {
                "name": fqn,
                "dtype": _dtype_name(dtype),
                "shape": list(md.size),
                "nbytes": nbytes,
                "chunks": len(md.chunks),
                "files": sorted({info.relative_path for info in where}),
            }
        )
    storage_meta = metadata.storage_meta
    return {
        "path": root,
        "kind": "dcp",
        "format": NATIVE_FORMAT,
        "files": [os.path.join(root, name) for name in files],
        "file_bytes": sum(os.path.getsize(os.path.join(root, name)) for name in files),
        "tensors": tensors,
        "total_bytes": total,
        "metadata": {},
        "zerockpt": {
            "dcp_version": metadata.version,
            "save_id": None if storage_meta is None else storage_meta.save_id,
            "rank_files": len(files),
        },
        "items": items,
        "checksums": {"stored": False, "verified": None, "failed": []},
    }
