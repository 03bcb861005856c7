"""``safetensors.torch`` on zerockpt: ``from zerockpt.safetensors.torch import save_file``.

Same signatures, results and exceptions as safetensors 0.8's ``safetensors.torch``; see
:mod:`zerockpt.safetensors` for what differs (atomic, durable saves; zerockpt's own metadata
entries, hidden from ``safe_open.metadata()``).

Tied weights (:func:`save_model`, :func:`load_model`) follow safetensors' rules exactly, so a
file saved by either library loads into a tied model with the other: of each group of state
dict entries that share memory, the entries that cover their whole storage are candidates and
the first of them by name is stored (when loading: the first of them that the file holds).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

import zerockpt
from zerockpt import _C, _args, _fileobj, _state
from zerockpt.module_state import load_state_dict as _load_state_dict
from zerockpt.module_state import state_dict as _state_dict
from zerockpt.safetensors import (
    USER_METADATA_KEY,
    SafetensorError,
    _open_file,
    parse_device,
    safe_open,
)

__all__ = [
    "load",
    "load_file",
    "load_model",
    "save",
    "save_file",
    "save_model",
    "storage_ptr",
    "storage_size",
]


def storage_ptr(tensor: torch.Tensor) -> int:
    """Address of the start of ``tensor``'s storage (0 where it has none, e.g. meta)."""
    try:
        return int(tensor.untyped_storage().data_ptr())
    except (NotImplementedError, RuntimeError):
        return 0


def storage_size(tensor: torch.Tensor) -> int:
    """Bytes in ``tensor``'s storage (for meta tensors, the tensor's own bytes)."""
    try:
        return int(tensor.untyped_storage().nbytes())
    except (NotImplementedError, RuntimeError):
        return tensor.nelement() * tensor.element_size()


def _end_ptr(tensor: torch.Tensor) -> int:
    """One past the address of ``tensor``'s last element (its start if it is empty)."""
    if tensor.nelement() == 0:
        return int(tensor.data_ptr())
    return int(tensor.view(-1)[-1].data_ptr()) + tensor.element_size()


def _is_complete(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` starts at its storage's start and covers all of it."""
    return tensor.data_ptr() == storage_ptr(tensor) and (
        tensor.nelement() * tensor.element_size() == storage_size(tensor)
    )


def _split_overlapping(names: set[str], tensors: Mapping[str, torch.Tensor]) -> list[set[str]]:
    """Splits names sharing one storage into runs of overlapping byte ranges, in address order
    (a run ends where a range starts at or after the end of the range before it)."""
    if len(names) < 2:
        return [names]
    ranges = sorted((tensors[n].data_ptr(), _end_ptr(tensors[n]), n) for n in names)
    runs: list[set[str]] = []
    previous_end = None
    for start, end, name in ranges:
        if previous_end is None or start >= previous_end:
            runs.append({name})
        else:
            runs[-1].add(name)
        previous_end = end
    return runs


def _find_shared_tensors(state_dict: Mapping[str, torch.Tensor]) -> list[set[str]]:
    """Groups of names whose tensors overlap in memory (singletons for unshared ones); meta
    tensors and tensors without storage are in none."""
    by_storage: dict[tuple[torch.device, int, int], set[str]] = {}
    for name, tensor in state_dict.items():
        if tensor.device.type == "meta":
            continue
        ptr, size = storage_ptr(tensor), storage_size(tensor)
        if ptr != 0 and size != 0:
            by_storage.setdefault((tensor.device, ptr, size), set()).add(name)
    # sorted() of sets orders by inclusion, as safetensors does, so groups come out in its order.
    groups = sorted(by_storage.values())
    return [run for group in groups for run in _split_overlapping(group, state_dict)]


def _remove_duplicate_names(
    state_dict: Mapping[str, torch.Tensor],
    *,
    preferred_names: Iterable[str] | None = None,
    discard_names: Iterable[str] | None = None,
) -> dict[str, list[str]]:
    """For each group of tied names: the one to keep -> the others (sorted), as safetensors.

    The kept name covers the whole storage; among those, the first by name, preferring names
    not in ``discard_names`` and, above all, names in ``preferred_names`` (a file's names).

    Raises:
        RuntimeError: In a group no tensor covers the whole storage.
    """
    preferred = set(preferred_names or ())
    discard = set(discard_names or ())
    to_remove: dict[str, list[str]] = {}
    for group in _find_shared_tensors(state_dict):
        complete = {name for name in group if _is_complete(state_dict[name])}
        if not complete:
            raise RuntimeError(
                "Error while trying to find names to remove to save state dict, but found no "
                f"suitable name to keep for saving amongst: {group}. None is covering the entire "
                "storage. Refusing to save/load the model since you could be storing much more "
                "memory than needed."
            )
        keep = min(complete)
        if complete - discard:
            keep = min(complete - discard)
        if preferred & complete:
            keep = min(preferred & complete)
        for name in sorted(group):
            if name != keep:
                to_remove.setdefault(keep, []).append(name)
    return to_remove


def _check_savable(tensors: Any, copy_shared: bool = False) -> dict[str, torch.Tensor]:
    """Refuses what safetensors' writer refuses, with its exception types and messages.

    With ``copy_shared`` (numpy's writer, which stores arrays as given), tensors sharing memory
    are stored as copies instead of refused. Returns the tensors to store.
    """
    if not isinstance(tensors, dict):
        raise ValueError(f"Expected a dict of [str, torch.Tensor] but received {type(tensors)}")
    sparse = []
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(
                f"Key `{name}` is invalid, expected torch.Tensor but received {type(tensor)}"
            )
        if tensor.layout != torch.strided:
            sparse.append(name)
    if sparse:
        raise ValueError(
            f"You are trying to save a sparse tensors: `{sparse}` which this library does not "
            "support. You can make it a dense tensor before saving with `.to_dense()` but be "
            "aware this might make a much larger file than needed."
        )
    shared = [group for group in _find_shared_tensors(tensors) if len(group) > 1]
    if shared and copy_shared:
        tensors = dict(tensors)
        for group in shared:
            for name in sorted(group)[1:]:
                tensors[name] = tensors[name].clone()
    elif shared:
        raise RuntimeError(
            f"Some tensors share memory, this will lead to duplicate memory on disk and potential "
            f"differences when loading them again: {shared}. A potential way to correctly save "
            "your model is to use `save_model`."
        )
    for name, tensor in tensors.items():
        if not tensor.is_contiguous():
            raise ValueError(
                f"You are trying to save a non contiguous tensor: `{name}` which is not allowed. "
                "Call `.contiguous()` on it before saving."
            )
        if tensor.device.type == "meta":
            # What torch (so safetensors) raises copying out of a meta tensor.
            raise NotImplementedError(f"Cannot copy out of meta tensor `{name}`; no data!")
    out: dict[str, torch.Tensor] = tensors
    return out


def _prepare(
    tensors: Any, metadata: Mapping[str, str] | None, copy_shared: bool = False
) -> tuple[_state.Flat, dict[str, str] | None, dict[str, str]]:
    """The checked tensors in safetensors' file order, the metadata, zerockpt's own entries."""
    tensors = _check_savable(tensors, copy_shared)
    # safetensors' layout: larger elements first (alignment), then by name; so the bytes do
    # not depend on the dict's order and offset order is the same as safetensors'.
    ordered = dict(sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0])))
    flat, metadata, own = _state.prepare_save(ordered, metadata)
    own[USER_METADATA_KEY] = json.dumps(None if metadata is None else sorted(metadata))
    return flat, metadata, own


def save_file(
    tensors: dict[str, torch.Tensor],
    filename: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
) -> None:
    """Saves a dict of tensors into ``filename`` in the safetensors format.

    Atomic (temporary file + rename) and durable (fsync), as :func:`zerockpt.save`, without
    checksums (the ``__metadata__`` holds what is given, and zerockpt's format entries).

    Args:
        tensors: Names to contiguous, dense tensors that do not share memory (CPU or
            accelerator).
        filename: Destination (str or ``os.PathLike``); its directory must exist.
        metadata: Optional ``str -> str`` entries for the header.

    Raises:
        ValueError: ``tensors`` is not a dict, holds a non-tensor, a sparse or a non-contiguous
            tensor.
        RuntimeError: Tensors share memory (use :func:`save_model`); NotImplementedError (a
            RuntimeError), a tensor is on the meta device.
        TypeError: ``metadata`` is not a dict of str to str.
        OSError: The file could not be written; ``filename`` is untouched.
    """
    _save_file(tensors, filename, metadata, copy_shared=False)


def _save_file(
    tensors: Any, filename: Any, metadata: dict[str, str] | None, *, copy_shared: bool
) -> None:
    flat, metadata, own = _prepare(tensors, metadata, copy_shared)
    if not isinstance(filename, str | os.PathLike):
        raise TypeError(f"filename must be a str or os.PathLike, got {type(filename).__name__}")
    _C.save(flat, os.fspath(filename), _args.save_options(metadata=metadata, checksums=False), own)


def save(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors bytes of a dict of tensors (rules as :func:`save_file`)."""
    return _save(tensors, metadata, copy_shared=False)


def _save(tensors: Any, metadata: dict[str, str] | None, *, copy_shared: bool) -> bytes:
    flat, metadata, own = _prepare(tensors, metadata, copy_shared)
    # As save_file: no checksums, and the caller's metadata keys recorded in ``own``.
    return _fileobj.save_bytes(
        flat,
        metadata,
        own,
        threads=_args.threads(None),
        checksums=False,
        progress=False,
        staging_bytes=_args.staging_bytes(None),
    )


def _header(data: bytes) -> dict[str, Any]:
    """The JSON header of safetensors bytes that have been validated."""
    size = int.from_bytes(data[:8], "little")
    header: dict[str, Any] = json.loads(data[8 : 8 + size])
    return header


def _offset_order(header: Mapping[str, Any]) -> list[str]:
    names = [name for name in header if name != "__metadata__"]
    return sorted(names, key=lambda name: (header[name]["data_offsets"][0], name))


def load_file(
    filename: str | os.PathLike[str], device: str | int = "cpu", *, backend: str = "mmap"
) -> dict[str, torch.Tensor]:
    """Loads a safetensors file into a dict of tensors, in the order of their bytes.

    On the CPU the tensors are zero-copy views of a private mapping of the file; on an
    accelerator they are read in parallel through pinned buffers (see :func:`zerockpt.load`).

    Args:
        filename: A safetensors file (str or ``os.PathLike``).
        device: ``"cpu"``, an accelerator (``"cuda:0"``...), a device index or a
            ``torch.device``.
        backend: ``"mmap"`` or ``"pread"`` (accepted; zerockpt chooses how to read).

    Raises:
        FileNotFoundError: The file does not exist.
        SafetensorError: The file is not valid safetensors, or ``device`` is invalid.
    """
    dev = parse_device(device)
    if backend not in ("mmap", "pread"):
        raise SafetensorError(f"backend {backend} is invalid")
    handle = _open_file(filename)
    order = sorted(handle.keys(), key=lambda name: (handle.info(name)[2], name))
    tensors, _, _ = _C.load(handle.path, _args.load_options(device=_args.load_device(dev)))
    return {name: tensors[name] for name in order}


def load(data: bytes) -> dict[str, torch.Tensor]:
    """Loads safetensors bytes (e.g. from :func:`save`) into a dict of CPU tensors, in the
    order of their bytes.

    Raises:
        SafetensorError: ``data`` is not valid safetensors.
        TypeError: ``data`` is not bytes.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    try:
        tensors = zerockpt.load_bytes(data)
    except _C.FormatError as e:
        raise SafetensorError(f"Error while deserializing: {e}") from e
    return {name: tensors[name] for name in _offset_order(_header(data))}


def _deserialize(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    """What ``safetensors.deserialize`` returns: (name, dtype, shape, raw bytes) per tensor."""
    load(data)  # validates
    data = bytes(data)
    header = _header(data)
    start = 8 + int.from_bytes(data[:8], "little")
    out = []
    for name in _offset_order(header):
        entry = header[name]
        begin, end = entry["data_offsets"]
        info = {
            "dtype": entry["dtype"],
            "shape": entry["shape"],
            "data": data[start + begin : start + end],
        }
        out.append((name, info))
    return out


def save_model(
    model: nn.Module,
    filename: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
    force_contiguous: bool = True,
) -> None:
    """Saves a model's state dict, storing one name of each group of tied (shared) tensors.

    The name kept is the one safetensors keeps; each dropped name is recorded in the metadata
    as ``{dropped: kept}`` (unless ``metadata`` already has that key).

    Args:
        model: The module.
        filename: Destination file.
        metadata: Extra ``str -> str`` header entries (not modified).
        force_contiguous: Save non-contiguous tensors as contiguous copies; with False they
            raise ``ValueError``.

    Raises:
        RuntimeError: A tied group has no tensor that covers its whole storage.
        ValueError: With ``force_contiguous=False``, a tensor is not contiguous.
    """
    tensors = dict(_state_dict(model))
    metadata = None if metadata is None else dict(metadata)
    for kept, dropped in _remove_duplicate_names(tensors).items():
        for name in dropped:
            if metadata is None:
                metadata = {}
            metadata.setdefault(name, kept)
            del tensors[name]
    if force_contiguous:
        tensors = {name: t.contiguous() for name, t in tensors.items()}
    try:
        save_file(tensors, filename, metadata=metadata)
    except ValueError as e:
        raise ValueError(
            f"{e} Or use save_model(..., force_contiguous=True), read the docs for potential "
            "caveats."
        ) from e


def load_model(
    model: nn.Module,
    filename: str | os.PathLike[str],
    strict: bool = True,
    device: str | int = "cpu",
    *,
    backend: str = "mmap",
) -> tuple[set[str], list[str]]:
    """Loads a file into a model whose tied tensors the file may hold under one name only.

    The model's own tied names that the file does not hold are not missing (loading one name
    of a group loads them all); tied names the file holds twice are unexpected. Tensors are
    read straight into the model's parameters and buffers (:func:`zerockpt.load_state_dict`).

    Args:
        model: The module to load into.
        filename: A safetensors file.
        strict: Raise if names are missing or unexpected.
        device: As safetensors takes it; checked, the tensors go where the model's are.
        backend: ``"mmap"`` or ``"pread"`` (accepted).

    Returns:
        ``(missing, unexpected)``: a set of the model's names that were not loaded, and a list
        of the file's names that were not used.

    Raises:
        RuntimeError: ``strict`` and names are missing or unexpected (torch's wording), or a
            shape does not match.
        FileNotFoundError, SafetensorError: As :func:`load_file`.
    """
    parse_device(device)
    if backend not in ("mmap", "pread"):
        raise SafetensorError(f"backend {backend} is invalid")
    file_names = _open_file(filename).keys()
    tied = _remove_duplicate_names(_state_dict(model), preferred_names=file_names)
    result = _load_state_dict(model, os.fspath(filename), strict=False)
    missing = set(result.missing_keys)
    unexpected = list(result.unexpected_keys)
    for dropped in tied.values():
        for name in dropped:
            if name in missing:
                missing.remove(name)
            else:
                unexpected.append(name)
    if strict and (missing or unexpected):
        error = f"Error(s) in loading state_dict for {model.__class__.__name__}:"
        if missing:
            names = ", ".join(f'"{k}"' for k in sorted(missing))
            error += f"\n    Missing key(s) in state_dict: {names}"
        if unexpected:
            names = ", ".join(f'"{k}"' for k in sorted(unexpected))
            error += f"\n    Unexpected key(s) in state_dict: {names}"
        raise RuntimeError(error)
    return missing, unexpected


_ = safe_open  # re-exported: ``from safetensors.torch import safe_open`` works there too
