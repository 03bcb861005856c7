"""Sharded checkpoints in the Hugging Face layout: a directory of safetensors shards plus an index.

A sharded checkpoint is a directory holding ``model-00001-of-00003.safetensors`` ...
``model-00003-of-00003.safetensors`` and ``model.safetensors.index.json``::

    {"metadata": {"total_size": 123456},
     "weight_map": {"embed.weight": "model-00001-of-00003.safetensors", ...}}

which is what ``transformers``' ``save_pretrained`` writes and its loaders read. Each shard is an
ordinary safetensors file. zerockpt adds, inside that layout:

- In the index's ``metadata``: ``"zerockpt.version"``, ``"zerockpt.checkpoint_id"`` (a random
  token, also stored in every shard's header, so a shard left over from another save is
  detected), and, as in a single file's header, ``"zerockpt.state_dict_metadata"`` or
  ``"zerockpt.structure"`` (JSON text) when the saved object had a ``_metadata`` or was nested
  training state.
- ``weight_map`` lists tensors in the order they were saved (transformers sorts it; readers do
  not care), tied names included: tied tensors share a shard, where the later names are
  zerockpt aliases of the first (other safetensors readers see only the stored name, as in a
  single file; transformers' own writer omits tied names instead).

This module holds the parts that do not depend on the public API: size parsing, shard planning
and writing, index parsing and validation, and reading the shards in parallel. ``save``,
``load``, ``open`` and ``load_state_dict`` call it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch

from zerockpt import _C, _args, _progress, _torchfile
from zerockpt._parallel import run_parallel, thread_budget
from zerockpt._smallfile import MAX_JSON_BYTES, read_small_file

INDEX_NAME = "model.safetensors.index.json"
"""The index file of a sharded checkpoint (transformers' ``SAFE_WEIGHTS_INDEX_NAME``)."""
SINGLE_FILE_NAME = "model.safetensors"
"""The file of an unsharded checkpoint directory (transformers' ``SAFE_WEIGHTS_NAME``)."""
CHECKPOINT_ID_KEY = "zerockpt.checkpoint_id"
INDEX_VERSION_KEY = "zerockpt.version"
# Shard files that a sharded save owns in its directory (transformers' own pattern).
SHARD_NAME_RE = re.compile(r"model-[0-9]{5,}-of-[0-9]{5,}\.safetensors")
MAX_INDEX_BYTES = MAX_JSON_BYTES


_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?:([kKmMgGtT])([iI])?)?([bB])\s*")
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def shard_name(k: int, n: int) -> str:
    """The file name of shard ``k`` (1-based) of ``n``: ``model-00001-of-00003.safetensors``."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def parse_size(size: int | str) -> int:
    """A shard size limit in bytes, parsed as transformers' ``max_shard_size`` is.

    Args:
        size: Bytes as an int, or a string: a number and a unit, ``B``, decimal ``KB``, ``MB``,
            ``GB``, ``TB`` (powers of 1000) or binary ``KiB``, ``MiB``, ``GiB``, ``TiB``
            (powers of 1024), e.g. ``"5GB"``, ``"500MB"``, ``"10GiB"``, ``"1.5 GB"``. Units are
            case-insensitive, except that a decimal unit ending in a lowercase ``b`` (``"5Gb"``,
            ``"5gb"``) is refused: transformers reads it as bits (an eighth of the bytes).

    Returns:
        The limit in bytes (rounded down), at least 1.

    Raises:
        TypeError: ``size`` is neither an int nor a str.
        ValueError: ``size`` is not positive or not in one of the forms above.
    """
    if isinstance(size, bool) or not isinstance(size, int | str):
        raise TypeError(f"max_shard_size must be an int or a str like '5GB', got {size!r}")
    if isinstance(size, int):
        if size < 1:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    match = _SIZE_RE.fullmatch(size)
    if match is None:
        raise ValueError(
            f"max_shard_size {size!r} is not a size: use an int (bytes) or a number and a unit, "
            "e.g. '5GB', '500MB', '10GiB' (KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of "
            "1024)"
        )
    number, prefix, binary, b = match.groups()
    if prefix is not None and binary is None and b == "b":
        raise ValueError(
            f"max_shard_size {size!r} ends in a lowercase 'b', which transformers reads as bits; "
            f"write {size.strip()[:-1] + 'B'!r} for bytes"
        )
    scale = 1 if prefix is None else (_BINARY if binary else _DECIMAL)[prefix.lower()]
    value = math.floor(Fraction(number) * scale)
    if value < 1:
        raise ValueError(f"max_shard_size must be at least one byte, got {size!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class ShardIndex:
    """A validated index file: which shard holds each tensor."""

    path: str
    """The index file."""
    weight_map: dict[str, str]
    """Tensor name -> shard file name, in the index's order."""
    metadata: dict[str, Any]
    """The index's ``metadata`` object (``{}`` if it has none)."""
    shards: tuple[str, ...] = field(init=False)
    """Shard file names, sorted."""
    names_by_shard: dict[str, list[str]] = field(init=False)
    """Shard file name -> the names weight_map assigns to it, in the index's order."""

    def __post_init__(self) -> None:
        by_shard: dict[str, list[str]] = {}
        for name, shard in self.weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        object.__setattr__(self, "names_by_shard", by_shard)
        object.__setattr__(self, "shards", tuple(sorted(by_shard)))

    @property
    def directory(self) -> str:
        return os.path.dirname(self.path) or "."

    def shard_path(self, shard: str) -> str:
        return os.path.join(self.directory, shard)

    def own_metadata(self) -> dict[str, str]:
        """zerockpt's ``zerockpt.*`` entries of the index metadata (all validated as str)."""
        return {k: v for k, v in self.metadata.items() if k.startswith(_C.RESERVED_PREFIX)}

    def total_size(self) -> int:
        """``metadata.total_size`` when it is a non-negative int, else 0 (unknown): an estimate
        for progress bars, as other writers' indexes are not checked against it."""
        size = self.metadata.get("total_size")
        return size if type(size) is int and size >= 0 else 0


def _format_error(path: str, why: str) -> _C.FormatError:
    return _C.FormatError(f"{path}: not a valid safetensors index: {why}")


def _names(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def read_index(path: str) -> ShardIndex:
    """Reads and strictly validates an index file (from zerockpt, transformers or any writer).

    Args:
        path: The index file, e.g. ``model.safetensors.index.json``.

    Returns:
        The validated :class:`ShardIndex`.

    Raises:
        FormatError: The file is not UTF-8 strict JSON (duplicate keys, NaN, hostile nesting),
            ``weight_map`` is missing or not an object of str to str, a shard name is not a plain
            file name (empty, ``.``, ``..``, or holding ``/``, ``\\`` or NUL), ``metadata`` is
            not an object, ``metadata.total_size`` is not a non-negative number, or a
            ``zerockpt.*`` metadata entry is not a str; the file is not a regular file (a
            FIFO, a device), or is over 256 MiB. The message names the file.
        IsADirectoryError: The path is a directory.
        OSError: The file cannot be read (errno and filename set).
    """
    raw = read_small_file(path, MAX_INDEX_BYTES, "index")

    def reject_constant(token: str) -> Any:
        raise ValueError(f"{token} is not JSON")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key] = value
        return out

    try:
        decoded = json.loads(
            raw.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=reject_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _format_error(path, f"not JSON ({e})") from None
    if not isinstance(decoded, dict):
        raise _format_error(path, f"expected a JSON object, got {type(decoded).__name__}")
    weight_map = decoded.get("weight_map")
    if not isinstance(weight_map, dict):
        raise _format_error(path, "'weight_map' must be an object of tensor names to shard files")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise _format_error(
                path, f"weight_map[{name!r}] is {shard!r:.60}, not a shard file name"
            )
        if shard in ("", ".", "..") or any(c in shard for c in "/\\\0"):
            raise _format_error(
                path,
                f"weight_map[{name!r}] = {shard!r:.200} is not a plain file name in the index's "
                "directory",
            )
    metadata = decoded.get("metadata", {})
    if not isinstance(metadata, dict):
        raise _format_error(path, "'metadata' must be an object")
    total_size = metadata.get("total_size", 0)
    if (
        isinstance(total_size, bool)
        or not isinstance(total_size, int | float)
        or not total_size >= 0
    ):
        raise _format_error(path, f"metadata.total_size is {total_size!r:.60}, not a size")
    for key, value in metadata.items():
        if key.startswith(_C.RESERVED_PREFIX) and not isinstance(value, str):
            raise _format_error(path, f"metadata[{key!r}] must be a string")
    return ShardIndex(path, weight_map, metadata)


def resolve(path: str) -> str | ShardIndex:
    """What a path given to ``load``, ``open`` or ``load_state_dict`` names.

    Args:
        path: A safetensors file; an index file (a name ending in ``.json``); or a directory
            holding ``model.safetensors.index.json`` (preferred) or ``model.safetensors``.

    Returns:
        The safetensors file to read, or the validated index of a sharded checkpoint.

    Raises:
        IsADirectoryError: A directory holds neither file.
        FormatError: The index is not valid (see :func:`read_index`).
        OSError: The index cannot be read.
    """
    if os.path.isdir(path):
        index = os.path.join(path, INDEX_NAME)
        if os.path.exists(index):
            return read_index(index)
        single = os.path.join(path, SINGLE_FILE_NAME)
        if os.path.exists(single):
            return single
        raise IsADirectoryError(
            errno.EISDIR,
            f"cannot load a directory that holds neither {INDEX_NAME} (a sharded checkpoint) "
            f"nor {SINGLE_FILE_NAME}",
            path,
        )
    if path.endswith(".json"):
        return read_index(path)
    return path


def check_shard(index: ShardIndex, shard: str, keys: Iterable[str], own: Mapping[str, str]) -> None:
    """Checks that a shard holds exactly the tensors the index assigns to it.

    Args:
        index: The index.
        shard: The shard's file name.
        keys: Every tensor name the shard's header lists (aliases included).
        own: The shard header's metadata (its ``zerockpt.checkpoint_id`` is compared with the
            index's, when both have one).

    Raises:
        FormatError: A name the index assigns to the shard is not in it, the shard holds a
            name the index does not assign to it, or the shard was written by another save
            than the index (an interrupted save or files mixed from two checkpoints).
    """
    expected = index.names_by_shard[shard]
    present = list(keys)
    present_set = set(present)
    missing = [n for n in expected if n not in present_set]
    if missing:
        raise _C.FormatError(
            f"{index.path}: weight_map assigns {_names(missing)} to {shard}, which does not hold it"
        )
    expected_set = set(expected)
    extra = [n for n in present if n not in expected_set]
    if extra:
        elsewhere = [n for n in extra if n in index.weight_map]
        detail = f" (weight_map assigns {_names(elsewhere)} to other shards)" if elsewhere else ""
        raise _C.FormatError(
            f"{index.path}: shard {shard} holds {_names(extra)}, which weight_map does not "
            f"assign to it{detail}"
        )
    want = index.metadata.get(CHECKPOINT_ID_KEY)
    have = own.get(CHECKPOINT_ID_KEY)
    if want is not None and have is not None and want != have:
        raise _C.FormatError(
            f"{index.path}: shard {shard} was written by another save than this index (an "
            "interrupted save, or files mixed from two checkpoints)"
        )


def load_shards(
    index: ShardIndex,
    *,
    mmap: bool,
    threads: int,
    verify: bool,
    progress: _C.Progress | None = None,
    device: torch.device | None = None,
    staging_bytes: int = 0,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Loads every shard in parallel and merges their tensors in the index's order.

    Args:
        index: The validated index.
        mmap: As ``zerockpt.load``'s ``mmap``.
        threads: Total reader threads (0: the default), shared among the shards.
        verify: Check every shard's checksums.
        progress: Counts the bytes read or checked, for a progress bar; cancelled (to stop
            the other shards) when one fails or on Ctrl-C.
        device: Stage the tensors into new tensors on this device (None: the CPU mapping).
            Shards then load one after another on this thread, each with all the threads,
            so the copies go to this thread's current stream.
        staging_bytes: Pinned host memory for the device copies (0: the default).

    Returns:
        The tensors by name (tied names of one shard map to one tensor), and the paths of the
        shards that store no checksums (with ``verify``, those were not checked).

    Raises:
        ChecksumError: With ``verify``, a shard's tensor fails its checksum.
        FormatError: A shard is not valid safetensors or does not match the index.
        OSError: A shard is missing or cannot be read (errno and filename set).
    """
    workers, per_shard = thread_budget(threads, len(index.shards))
    if device is not None:
        workers, per_shard = 1, threads

    options = _args.load_options(
        mmap=mmap, threads=per_shard, verify=verify, device=device, staging_bytes=staging_bytes
    )

    def load_one(shard: str) -> tuple[dict[str, torch.Tensor], bool]:
        with _torchfile.explained(index.shard_path(shard)):
            tensors, own, has_checksums = _C.load(index.shard_path(shard), options, progress)
        check_shard(index, shard, tensors, own)
        return tensors, has_checksums

    results = run_parallel(load_one, index.shards, workers, progress)
    loaded = dict(zip(index.shards, results, strict=True))
    merged = {name: loaded[shard][0][name] for name, shard in index.weight_map.items()}
    unchecked = [index.shard_path(s) for s, (_, ok) in loaded.items() if not ok]
    return merged, unchecked


def open_shards(index: ShardIndex) -> list[_C._File]:
    """Opens (validates the header of) every shard, in parallel; in ``index.shards`` order.

    Raises:
        FormatError: A shard is not valid safetensors or does not match the index.
        OSError: A shard is missing or cannot be opened (errno and filename set).
    """
    workers, _ = thread_budget(0, len(index.shards))

    def open_one(shard: str) -> _C._File:
        with _torchfile.explained(index.shard_path(shard)):
            f = _C._File(index.shard_path(shard))
        check_shard(index, shard, f.keys(), f.metadata())
        return f

    return run_parallel(open_one, index.shards, workers)


def warn_unverified(index: ShardIndex, unchecked: Sequence[str], stacklevel: int) -> None:
    """Warns that ``verify`` checked nothing in the listed shards (no checksums stored)."""
    warnings.warn(
        f"{index.path}: {len(unchecked)} of {len(index.shards)} shards store no checksums (not "
        f"written by zerockpt, or with checksums=False) and were not verified: "
        f"{_names([os.path.basename(p) for p in unchecked], 5)}",
        UserWarning,
        stacklevel=stacklevel + 1,
    )


# ---------------------------------------------------------------------------------------------
# Writing


def plan_shards(tensors: Mapping[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Splits names into shards of at most ``limit`` stored bytes, greedily in the given order.

    Tensors whose memory overlaps in one storage (tied weights, or views that the save will
    refuse) are kept in one shard, so a shard's save sees (and keeps, or refuses) the sharing
    exactly as a single file's would. A group larger than ``limit`` gets a shard of its own.
    Each shard lists its names in the given order.

    Args:
        tensors: Names to tensors, in saved order.
        limit: The most stored bytes per shard (aliases counted once).

    Returns:
        The names of each shard; at least one (possibly empty) shard.
    """
    names = list(tensors)
    views = [tensors[name] for name in names]
    alias_of, group = _C.memory_sharing(views)
    groups: dict[int, list[int]] = {}
    for i in range(len(names)):
        groups.setdefault(group[i], []).append(i)

    shards: list[list[int]] = []
    current: list[int] = []
    size = 0
    for members in groups.values():  # ordered by each group's first name
        # Aliases are stored once.
        nbytes = sum(views[i].numel() * views[i].element_size() for i in members if alias_of[i] < 0)
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.extend(members)
        size += nbytes
    if current or not shards:
        shards.append(current)
    return [[names[i] for i in sorted(shard)] for shard in shards]


def save_sharded(
    tensors: dict[str, torch.Tensor],
    directory: str,
    max_shard_size: int | str,
    own: dict[str, str],
    options: _C.SaveOptions,
    progress: _C.Progress | None = None,
) -> None:
    """Writes ``tensors`` as a sharded checkpoint in ``directory``; see ``zerockpt.save``.

    Every shard and the index are first written (each atomically and, with ``durable``,
    fsynced) in a private staging directory inside ``directory``; a failure there leaves
    ``directory`` as it was. Then the shards are renamed into ``directory``, and the index
    last: its rename commits the checkpoint. Finally shard files of earlier saves
    (``model-*-of-*.safetensors``) that the new index does not list are removed.

    Args:
        tensors: Flat names to tensors, in saved order.
        directory: The destination directory (created, with its parents, if missing).
        max_shard_size: The most stored bytes per shard (see :func:`parse_size`).
        own: zerockpt's own entries (structure, state-dict metadata), stored in the index.
        options: How each shard is written (``_args.save_options``): its ``metadata`` (the
            caller's ``__metadata__`` entries) goes into every shard, its ``threads`` are per
            shard, and ``durable`` also fsyncs the directories.
        progress: Counts the bytes written, for a progress bar, and can stop the save.

    Raises:
        ValueError: ``directory`` is an existing file, or the save refuses a tensor or key.
        TypeError: A tensor cannot be stored.
        OSError: A file could not be written; ``directory`` keeps its previous checkpoint.
    """
    limit = parse_size(max_shard_size)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(
            f"{directory!r} is an existing file: with max_shard_size, path is the directory that "
            f"receives the shards and {INDEX_NAME} (save without max_shard_size to write one file)"
        )
    durable = options.durable
    plan = plan_shards(tensors, limit)
    _C.make_directories(directory, durable)
    files = [shard_name(k, len(plan)) for k in range(1, len(plan) + 1)]
    checkpoint_id = secrets.token_hex(16)
    shard_own = {CHECKPOINT_ID_KEY: checkpoint_id}
    shard_of = {name: file for file, names in zip(files, plan, strict=True) for name in names}
    weight_map = {name: shard_of[name] for name in tensors}  # in saved order

    staging = _C._StagingDirectory(directory, INDEX_NAME)
    try:
        total = 0
        for file, names in zip(files, plan, strict=True):
            part = {name: tensors[name] for name in names}
            staged = staging.file(file)
            try:
                _C.save(part, staged, options, shard_own, progress)
            except OSError as e:
                if e.filename != staged:
                    raise
                # Name the shard's destination, as a single file's save names its path.
                raise type(e)(e.errno, e.strerror, os.path.join(directory, file)) from None
            total += _progress.stored_bytes(_C._File(staged))
        index_metadata: dict[str, Any] = {
            "total_size": total,
            INDEX_VERSION_KEY: _C.FORMAT_VERSION,
            CHECKPOINT_ID_KEY: checkpoint_id,
            **own,
        }
        text = json.dumps({"metadata": index_metadata, "weight_map": weight_map}, indent=2)
        try:
            _C.after_commit([(staging.file(INDEX_NAME), text + "\n")], [], durable)
        except OSError as e:
            if e.filename != staging.file(INDEX_NAME):
                raise
            raise type(e)(e.errno, e.strerror, os.path.join(directory, INDEX_NAME)) from None

        # Commit: shards first, the index last. Renames need no space, so a full disk has
        # failed above, with the previous checkpoint untouched; so has a destination that a
        # save may not replace (checked for all before any is). One C++ call, so Ctrl-C waits
        # for the end: stopping among the renames would leave new shards under the old index.
        # Each keeps a replaced file's mode, owner and group, as zerockpt.save does.
        staging.commit([*files, INDEX_NAME], durable)
    finally:
        staging.close()

    written = set(files)
    for entry in os.listdir(directory):
        if SHARD_NAME_RE.fullmatch(entry) and entry not in written:
            path = os.path.join(directory, entry)
            try:
                if os.path.isfile(path):
                    os.unlink(path)
            except OSError as e:
                warnings.warn(
                    f"zerockpt.save: the checkpoint in {directory} is complete, but the shard "
                    f"{entry} of an earlier save could not be removed ({e})",
                    stacklevel=3,
                )
    if os.path.exists(os.path.join(directory, SINGLE_FILE_NAME)):
        warnings.warn(
            f"zerockpt.save: {directory} also holds {SINGLE_FILE_NAME}, which Hugging Face "
            f"loaders read instead of {INDEX_NAME} (zerockpt reads the index); remove it",
            stacklevel=3,
        )
