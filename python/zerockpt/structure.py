"""Nested training state <-> flat tensors plus a JSON description of the structure.

A checkpoint such as ``{"model": model.state_dict(), "optim": opt.state_dict(), "step": 7}`` is
stored as a safetensors file whose tensors are named by their path in the structure, and whose
metadata key ``zerockpt.structure`` holds everything else: containers, key types and non-tensor
leaves (docs/format.md, "Nested state"). Nothing is pickled.

Names: path segments joined by ``/``; in a str key ``~`` is written ``~0`` and ``/`` ``~1``, and
a str key that reads as an int is prefixed by ``~2``, so names are unambiguous; int keys and
list indices are written in decimal. The one name the format reserves, ``__metadata__``, is
written ``~3__metadata__``.

Mapping subclasses (``dict`` or ``OrderedDict`` subclasses, attribute-style dicts) are stored by
their items as plain ``dict`` / ``OrderedDict``, and load back as those; of their attributes
only a state dict's ``_metadata`` (an instance attribute) is kept, and a container that has one
loads as an ``OrderedDict``, as ``state_dict()`` returns.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from zerockpt import _C

STRUCTURE_KEY = "zerockpt.structure"
STRUCTURE_VERSION = 1
# Deeper containers than any training state has; bounds recursion on save and load.
MAX_DEPTH = 256

_INT_LIKE = re.compile(r"-?[0-9]+")
_INT64 = range(-(2**63), 2**63)
# The header key the safetensors format keeps for itself: never a tensor name.
RESERVED_NAME = "__metadata__"
# Int keys sharing one hash (hash(k) is k mod 2**61 - 1) make a dict quadratic to build: more
# than this many in one dict are refused, on save and on load.
MAX_SHARED_HASH = 8


def _count_hash(counts: dict[int, int], key: int) -> int:
    """How many int keys seen so far (``key`` included) have ``hash(key)``."""
    h = hash(key)  # distinct hashes are distinct keys of ``counts``: it never goes quadratic
    counts[h] = counts.get(h, 0) + 1
    return counts[h]


def is_flat_state_dict(obj: object) -> bool:
    """A mapping of str to tensors: saved under its own keys, without a structure.

    A mapping with the key ``__metadata__`` is not: that name is the format's own, so such a
    mapping is stored as nested state, which escapes it.
    """
    if not isinstance(obj, Mapping) or RESERVED_NAME in obj:
        return False
    return all(type(k) is str and isinstance(v, torch.Tensor) for k, v in mapping_items(obj))


def instance_metadata(obj: object) -> Any:
    """A state dict's ``_metadata``: the instance attribute only, never ``__getattr__``'s answer.

    Attribute-style dicts answer any attribute from their items (or raise KeyError); reading
    ``__dict__`` directly keeps those items from being taken for module versions.
    """
    try:
        attributes = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        return None
    return attributes.get("_metadata") if isinstance(attributes, dict) else None


def encode_metadata(metadata: Any) -> Any:
    """``_metadata`` (prefix -> dict) as a JSON value; TypeError if it is not one."""
    try:
        return json.loads(
            json.dumps({str(k): dict(v) for k, v in metadata.items()}, allow_nan=False)
        )
    except (TypeError, ValueError, AttributeError, RecursionError) as e:
        raise TypeError(f"cannot be stored as JSON ({e})") from None


def mapping_items(mapping: Mapping[Any, Any]) -> Any:
    """The items of a mapping; of a dict (subclass), as stored, whatever ``items`` says."""
    if isinstance(mapping, OrderedDict):
        return OrderedDict.items(mapping)
    return dict.items(mapping) if isinstance(mapping, dict) else mapping.items()


def _segment(key: str | int) -> str:
    if isinstance(key, int):
        return str(key)
    escaped = key.replace("~", "~0").replace("/", "~1")
    return "~2" + escaped if _INT_LIKE.fullmatch(escaped) else escaped


def _where(path: tuple[str | int, ...]) -> str:
    return "obj" + "".join(f"[{k!r}]" for k in path)


def flatten(obj: object) -> tuple[dict[str, torch.Tensor], str]:
    """Tensor leaves by name, and the JSON structure; TypeError naming any unsupported leaf."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: object, path: tuple[str | int, ...]) -> Any:
        if isinstance(value, torch.Tensor):
            name = "/".join(_segment(k) for k in path)
            if name == RESERVED_NAME:
                name = "~3" + name
            tensors[name] = value
            return {"tensor": name}
        if value is None or isinstance(value, bool | str):
            return value
        if isinstance(value, int):
            value = int(value)  # IntEnum and friends: their value
            return value if value in _INT64 else {"int": hex(value)}
        if isinstance(value, float):
            return float(value) if math.isfinite(value) else {"float": repr(float(value))}
        if len(path) >= MAX_DEPTH:
            raise ValueError(f"{_where(path)}: containers nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, Mapping):
            if not isinstance(value, dict):
                raise TypeError(
                    f"{_where(path)} is a {type(value).__name__}; only dict and OrderedDict "
                    "mappings can be saved"
                )
            items = []
            counts: dict[int, int] = {}
            for k, v in mapping_items(value):
                if type(k) is not str and (type(k) is not int):
                    raise TypeError(
                        f"{_where(path)} has a key {k!r} of type {type(k).__name__}; "
                        "only str and int keys can be saved"
                    )
                if type(k) is int and _count_hash(counts, k) > MAX_SHARED_HASH:
                    raise ValueError(
                        f"{_where(path)} has more than {MAX_SHARED_HASH} int keys with the hash "
                        f"of {k!r}, which would make loading it quadratic"
                    )
                items.append([k, walk(v, (*path, k))])
            node: dict[str, Any] = {"dict": items}
            if isinstance(value, OrderedDict):
                node["ordered"] = True
            metadata = instance_metadata(value)
            if metadata is not None:
                try:
                    node["metadata"] = encode_metadata(metadata)
                except TypeError as e:
                    raise TypeError(f"{_where(path)}._metadata {e}") from None
            return node
        if type(value) in (list, tuple):
            kind = "list" if type(value) is list else "tuple"
            sequence: list[Any] | tuple[Any, ...] = value  # type: ignore[assignment]
            return {kind: [walk(v, (*path, i)) for i, v in enumerate(sequence)]}
        raise TypeError(
            f"{_where(path)} is a {type(value).__module__}.{type(value).__qualname__}, which "
            "zerockpt cannot save (supported: tensors, dict, OrderedDict, list, tuple, None, "
            "bool, int, float, str); nothing is pickled"
        )

    if not isinstance(obj, dict | list | tuple):
        raise TypeError(
            f"can only save a mapping of tensors, a module, or a dict, list or tuple of "
            f"training state, got {type(obj).__name__}"
        )
    root = walk(obj, ())
    text = json.dumps({"version": STRUCTURE_VERSION, "root": root}, allow_nan=False)
    return tensors, text


def unflatten(tensors: Mapping[str, torch.Tensor], text: str, path: str) -> Any:
    """Rebuilds what :func:`flatten` described; FormatError naming ``path`` if it is invalid."""

    def reject(token: str) -> Any:
        raise ValueError(f"{token} is not JSON")

    try:
        decoded = json.loads(text, parse_constant=reject)
    except (ValueError, RecursionError) as e:
        raise _invalid(path, str(e)) from None
    if (
        not isinstance(decoded, dict)
        or decoded.get("version") != STRUCTURE_VERSION
        or "root" not in decoded
    ):
        raise _invalid(path, f"expected {{'version': {STRUCTURE_VERSION}, 'root': ...}}")
    return _build(decoded["root"], 0, tensors, path)


def _invalid(path: str, why: str) -> Exception:
    return _C.FormatError(f"{path}: metadata {STRUCTURE_KEY!r} is not valid: {why}")


# A module-level function, not a closure that calls itself: such a closure is a reference
# cycle holding ``tensors`` (and so the file's mapping) until the garbage collector runs.
def _build(node: Any, depth: int, tensors: Mapping[str, torch.Tensor], path: str) -> Any:
    if node is None or isinstance(node, bool | str | float | int):
        return node
    if isinstance(node, list):
        raise _invalid(path, "a bare JSON list is not a node")
    if depth >= MAX_DEPTH:
        raise _invalid(path, f"nested deeper than {MAX_DEPTH} levels")
    if not isinstance(node, dict) or not node:
        raise _invalid(path, f"unexpected node {node!r:.60}")
    kind = next(iter(node))
    body = node[kind]
    if kind == "tensor" and isinstance(body, str) and len(node) == 1:
        if body not in tensors:
            raise _invalid(path, f"tensor {body!r} is not in the file")
        return tensors[body]
    if kind == "int" and isinstance(body, str) and len(node) == 1:
        try:
            return int(body, 16)
        except ValueError:
            raise _invalid(path, f"bad int {body!r:.60}") from None
    if kind == "float" and body in ("nan", "inf", "-inf") and len(node) == 1:
        return float(body)
    if kind in ("list", "tuple") and isinstance(body, list) and len(node) == 1:
        items = [_build(v, depth + 1, tensors, path) for v in body]
        return items if kind == "list" else tuple(items)
    if kind == "dict" and isinstance(body, list) and set(node) <= {"dict", "ordered", "metadata"}:
        # A container with _metadata is an OrderedDict, as state_dict() returns: a plain dict
        # cannot carry the attribute.
        ordered = node.get("ordered") is True or "metadata" in node
        out: dict[Any, Any] = OrderedDict() if ordered else {}
        counts: dict[int, int] = {}
        for item in body:
            if not isinstance(item, list) or len(item) != 2 or type(item[0]) not in (str, int):
                raise _invalid(path, f"bad dict item {item!r:.60}")
            if type(item[0]) is int and _count_hash(counts, item[0]) > MAX_SHARED_HASH:
                raise _invalid(path, f"more than {MAX_SHARED_HASH} int keys of a dict share a hash")
            out[item[0]] = _build(item[1], depth + 1, tensors, path)
        if "metadata" in node:
            meta = node["metadata"]
            if not isinstance(meta, dict) or not all(isinstance(v, dict) for v in meta.values()):
                raise _invalid(path, "a _metadata that is not an object of objects")
            out._metadata = OrderedDict(meta)  # type: ignore[attr-defined]
        return out
    raise _invalid(path, f"unexpected node {node!r:.60}")
