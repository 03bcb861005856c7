"""What a checkpoint stores for a saved object, and what loading it gives back.

``save``, ``save_async`` and ``Checkpointer.save`` store an object as flat named tensors plus
zerockpt's own metadata entries (the structure of nested training state, or a state dict's
``_metadata``); ``load`` and ``load_state_dict`` rebuild the object from them.
"""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from zerockpt import _C
from zerockpt.structure import (
    STRUCTURE_KEY,
    encode_metadata,
    flatten,
    instance_metadata,
    is_flat_state_dict,
    mapping_items,
    unflatten,
)

# What save() and save_async() take.
SaveInput = Mapping[str, torch.Tensor] | nn.Module | dict[Any, Any] | list[Any] | tuple[Any, ...]
# The tensors to store, as the C++ save functions take them: a flat dict, or what
# _C.module_tensors read from a module's registries (no Python object per tensor).
Flat = dict[str, torch.Tensor] | _C._ModuleTensors


def module_state_dict(module: nn.Module) -> OrderedDict[str, Any]:
    """``module.state_dict()`` by the C++ walk (see :func:`zerockpt.state_dict`)."""
    destination: OrderedDict[str, Any] = OrderedDict()
    destination._metadata = OrderedDict()  # type: ignore[attr-defined]
    out: OrderedDict[str, Any] = _C.state_dict(module, destination, "", False)
    return out


def encode_state_dict_metadata(tensors: Mapping[str, Any]) -> str | None:
    """The ``_metadata`` of a state dict as JSON, or None if it has none or it is not JSON."""
    metadata = instance_metadata(tensors)
    if metadata is None:
        return None
    try:
        return json.dumps(encode_metadata(metadata))
    except TypeError as e:
        warnings.warn(
            f"zerockpt.save: the state dict's _metadata {e}; saving without it",
            stacklevel=4,  # the caller of save() or save_async()
        )
        return None


def decode_state_dict_metadata(text: str, path: str) -> OrderedDict[str, dict[str, Any]]:
    """The ``_metadata`` stored by :func:`save` (torch's layout: prefix -> dict)."""

    def reject(token: str) -> Any:
        raise ValueError(f"{token} is not JSON")

    try:
        decoded = json.loads(text, parse_constant=reject)
        if not isinstance(decoded, dict) or not all(isinstance(v, dict) for v in decoded.values()):
            raise ValueError("not an object of objects")
    except (ValueError, RecursionError) as e:  # RecursionError: hostile nesting depth
        raise _C.FormatError(
            f"{path}: metadata {_C.STATE_DICT_METADATA_KEY!r} is not valid: {e}"
        ) from None
    return OrderedDict(decoded)


def prepare_save(
    obj: SaveInput, metadata: Mapping[str, str] | None
) -> tuple[Flat, dict[str, str] | None, dict[str, str]]:
    """What to store for ``obj``: the flat tensors, the user's metadata, zerockpt's own.

    A module whose tree torch's ``state_dict()`` would not hand to Python code is read straight
    from its registries (csrc/python/module_stream.cpp): the same file, without a state dict.
    """
    streamed = _C.module_tensors(obj) if isinstance(obj, nn.Module) else None
    if isinstance(obj, nn.Module) and streamed is None:
        obj = module_state_dict(obj)
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a mapping of str to str, got {type(metadata)}")
        metadata = dict(metadata)
    own: dict[str, str] = {}
    if streamed is not None:  # its names are valid UTF-8, and its _metadata JSON
        own[_C.STATE_DICT_METADATA_KEY] = streamed.metadata
        _check_metadata_utf8(metadata)
        return streamed, metadata, own
    if is_flat_state_dict(obj):
        flat = obj if type(obj) is dict else dict(mapping_items(obj))  # type: ignore[arg-type]
        state_dict_metadata = encode_state_dict_metadata(obj)  # type: ignore[arg-type]
        if state_dict_metadata is not None:
            own[_C.STATE_DICT_METADATA_KEY] = state_dict_metadata
    else:
        flat, own[STRUCTURE_KEY] = flatten(obj)
        # What is committed must load: the structure goes through the loader's own decoder
        # first (the C++ writer does the same with the planned header).
        try:
            unflatten(flat, own[STRUCTURE_KEY], "the structure to save")
        except _C.FormatError as e:
            raise ValueError(f"zerockpt cannot store this state so that it loads back: {e}") from e
    # The header is UTF-8 JSON: a str holding a lone surrogate has no UTF-8 form.
    for name in flat:
        _check_utf8(name, "tensor name")
    _check_metadata_utf8(metadata)
    return flat, metadata, own


def flat_dict(flat: Flat) -> dict[str, torch.Tensor]:
    """``flat`` as the dict ``prepare_save`` gives for a state dict (for Python consumers)."""
    return flat if isinstance(flat, dict) else flat.state_dict()


def _check_metadata_utf8(metadata: Mapping[str, str] | None) -> None:
    for key, value in (metadata or {}).items():
        if isinstance(key, str) and isinstance(value, str):  # other types: the C++ side says
            _check_utf8(key, "metadata key")
            _check_utf8(value, f"metadata value for {key!r}")


def _check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} {text!r} cannot be stored: it holds a lone surrogate "
            f"({text[e.start]!r}), which has no UTF-8 form"
        ) from None


def rebuild(tensors: dict[str, torch.Tensor], own: Mapping[str, str], where: str) -> Any:
    """What :func:`load` returns for the tensors and zerockpt's own metadata of ``where``."""
    if STRUCTURE_KEY in own:
        return unflatten(tensors, own[STRUCTURE_KEY], where)
    state_dict_metadata = own.get(_C.STATE_DICT_METADATA_KEY)
    if state_dict_metadata is None:
        return tensors
    out: OrderedDict[str, torch.Tensor] = OrderedDict(tensors)
    out._metadata = decode_state_dict_metadata(state_dict_metadata, where)  # type: ignore[attr-defined]
    return out


def warn_unverified(path: str, stacklevel: int = 3) -> None:
    """Warns that ``verify`` checked nothing in ``path``; the default ``stacklevel`` names the
    caller of the function that calls this."""
    warnings.warn(
        f"{path}: the file stores no checksums (not written by zerockpt, or with "
        "checksums=False); nothing was verified",
        UserWarning,
        stacklevel=stacklevel,
    )
