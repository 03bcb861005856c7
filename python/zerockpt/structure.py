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
loads as an ``OrderedDict``, as ``state_dict()`` returns. A ``defaultdict`` keeps its
``default_factory`` when that is None or a builtin type (``list``, ``int``, ``dict``, ``set``...).

Other values real checkpoints hold, each given back with its type: numpy arrays and scalars of
the numeric dtypes (stored as tensors; ``numpy.random.get_state()`` is a tuple holding one),
``bytes`` and ``bytearray`` (stored as uint8 tensors), ``torch.dtype``, ``torch.Size``,
``torch.device``, ``set``, ``frozenset`` and ``argparse.Namespace``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import OrderedDict, defaultdict
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


def _count_hash(counts: dict[int, int], key: object) -> int:
    """How many keys seen so far (``key`` included) have ``hash(key)``."""
    h = hash(key)  # distinct hashes are distinct keys of ``counts``: it never goes quadratic
    counts[h] = counts.get(h, 0) + 1
    return counts[h]


# defaultdict factories that are stored (by name) and restored: the builtin types.
_DEFAULT_FACTORIES: dict[str, type] = {
    t.__name__: t
    for t in (list, dict, set, frozenset, tuple, int, float, complex, str, bytes, bytearray, bool)
}
# numpy dtype kinds stored as tensors: bool, signed and unsigned ints, floats, complex.
_NUMPY_KINDS = "biufc"


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


def _numpy() -> Any:
    """The numpy module if it is imported (only then can a value be a numpy object), else None."""
    return sys.modules.get("numpy")


def _numpy_storage(np: Any, value: Any, where: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """A numpy array or scalar as the tensor to store, and its node (without the name)."""
    scalar = isinstance(value, np.generic)
    array = np.asarray(value) if scalar else value
    dtype = array.dtype
    if dtype.kind not in _NUMPY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise TypeError(
            f"{where} is a numpy {'scalar' if scalar else 'array'} of dtype {dtype}, which "
            "zerockpt cannot save (supported: bool, int, uint, float and complex dtypes); "
            "nothing is pickled"
        )
    native = dtype.newbyteorder("=")
    if not (array.flags.c_contiguous and array.flags.writeable and dtype.isnative and not scalar):
        array = np.array(array, dtype=native, order="C")  # torch.from_numpy takes only these
    try:
        tensor = torch.from_numpy(array)
    except TypeError:  # a dtype torch has no equivalent for (float128, complex256)
        raise TypeError(
            f"{where} is a numpy {'scalar' if scalar else 'array'} of dtype {dtype}, which has "
            "no torch equivalent; zerockpt cannot save it"
        ) from None
    if tensor.dtype == torch.complex128:  # the format has no C128: stored as (..., 2) F64
        tensor = torch.view_as_real(tensor)
    node: dict[str, Any] = {"dtype": dtype.str, "shape": list(array.shape)}
    if scalar:
        node["scalar"] = True
    return tensor, node


def _bytes_tensor(value: bytes | bytearray) -> torch.Tensor:
    """``bytes`` / ``bytearray`` as a 1-d uint8 tensor (a copy: bytes objects are read-only)."""
    return (
        torch.frombuffer(bytearray(value), dtype=torch.uint8)
        if value
        else torch.empty(0, dtype=torch.uint8)
    )


def _default_factory(value: defaultdict[Any, Any], where: str) -> str | None:
    """The stored name of a defaultdict's factory; TypeError for one that cannot be restored."""
    factory = value.default_factory
    if factory is None:
        return None
    name = getattr(factory, "__name__", None)
    if isinstance(name, str) and _DEFAULT_FACTORIES.get(name) is factory:
        return name
    raise TypeError(
        f"{where} is a defaultdict whose default_factory is {factory!r}; zerockpt stores only "
        f"None or a builtin type ({', '.join(_DEFAULT_FACTORIES)}) as the factory (convert it "
        "with dict(...) to save its items)"
    )


def flatten(obj: object) -> tuple[dict[str, torch.Tensor], str]:
    """Tensor leaves by name, and the JSON structure; TypeError naming any unsupported leaf."""
    tensors: dict[str, torch.Tensor] = {}
    np = _numpy()

    def store(tensor: torch.Tensor, path: tuple[str | int, ...]) -> str:
        name = "/".join(_segment(k) for k in path)
        if name == RESERVED_NAME:
            name = "~3" + name
        tensors[name] = tensor
        return name

    def items_of(
        value: Mapping[Any, Any], path: tuple[str | int, ...], keys: str = "str and int"
    ) -> list[Any]:
        items = []
        counts: dict[int, int] = {}
        for k, v in mapping_items(value):
            if type(k) is not str and (type(k) is not int or keys == "str"):
                raise TypeError(
                    f"{_where(path)} has a key {k!r} of type {type(k).__name__}; "
                    f"only {keys} keys can be saved"
                )
            if type(k) is int and _count_hash(counts, k) > MAX_SHARED_HASH:
                raise ValueError(
                    f"{_where(path)} has more than {MAX_SHARED_HASH} int keys with the hash "
                    f"of {k!r}, which would make loading it quadratic"
                )
            items.append([k, walk(v, (*path, k))])
        return items

    def walk(value: object, path: tuple[str | int, ...]) -> Any:
        if isinstance(value, torch.Tensor):
            return {"tensor": store(value, path)}
        if np is not None and (
            type(value) is np.ndarray
            or (isinstance(value, np.generic) and not isinstance(value, str | bytes))
        ):  # numpy.str_ and numpy.bytes_ are stored as the str and bytes they are
            tensor, described = _numpy_storage(np, value, _where(path))
            return {"numpy": store(tensor, path), **described}
        if value is None or isinstance(value, bool | str):
            return value
        if isinstance(value, int):
            value = int(value)  # IntEnum and friends: their value
            return value if value in _INT64 else {"int": hex(value)}
        if isinstance(value, float):
            return float(value) if math.isfinite(value) else {"float": repr(float(value))}
        if isinstance(value, bytes | bytearray):
            kind = "bytearray" if isinstance(value, bytearray) else "bytes"
            return {kind: store(_bytes_tensor(value), path)}
        if isinstance(value, torch.dtype):
            return {"dtype": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"device": str(value)}
        if isinstance(value, torch.Size):
            return {"size": [int(n) for n in value]}
        if len(path) >= MAX_DEPTH:
            raise ValueError(f"{_where(path)}: containers nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, Mapping):
            if not isinstance(value, dict):
                raise TypeError(
                    f"{_where(path)} is a {type(value).__name__}; only dict, OrderedDict and "
                    "defaultdict mappings can be saved"
                )
            if isinstance(value, defaultdict):
                factory = _default_factory(value, _where(path))
                return {"dict": items_of(value, path), "default": factory}
            node: dict[str, Any] = {"dict": items_of(value, path)}
            if isinstance(value, OrderedDict):
                node["ordered"] = True
            metadata = instance_metadata(value)
            if metadata is not None:
                try:
                    node["metadata"] = encode_metadata(metadata)
                except TypeError as e:
                    raise TypeError(f"{_where(path)}._metadata {e}") from None
            return node
        if type(value) in (list, tuple, set, frozenset):
            kind = type(value).__name__
            sequence: Any = value
            return {kind: [walk(v, (*path, i)) for i, v in enumerate(sequence)]}
        if type(value) is argparse.Namespace:
            return {"namespace": items_of(vars(value), path, keys="str")}
        raise TypeError(
            f"{_where(path)} is a {type(value).__module__}.{type(value).__qualname__}, which "
            "zerockpt cannot save (supported: tensors, numpy arrays, dict, OrderedDict, "
            "defaultdict, list, tuple, set, frozenset, argparse.Namespace, None, bool, int, "
            "float, str, bytes, torch.dtype, torch.Size, torch.device); nothing is pickled"
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
    if kind in _LEAF_BUILDERS:
        return _LEAF_BUILDERS[kind](node, tensors, path)
    if kind in ("set", "frozenset") and isinstance(body, list) and len(node) == 1:
        return _build_set(kind, body, depth, tensors, path)
    if kind == "namespace" and isinstance(body, list) and len(node) == 1:
        items = _build_items(body, depth, tensors, path, {})
        if not all(type(k) is str for k in items):
            raise _invalid(path, "a namespace attribute name that is not a string")
        return argparse.Namespace(**items)
    if kind == "dict" and isinstance(body, list) and set(node) == {"dict", "default"}:
        factory = node["default"]
        if factory is not None and factory not in _DEFAULT_FACTORIES:
            raise _invalid(path, f"defaultdict factory {factory!r:.60} is not a builtin type")
        default: defaultdict[Any, Any] = defaultdict(
            None if factory is None else _DEFAULT_FACTORIES[factory]
        )
        return _build_items(body, depth, tensors, path, default)
    if kind == "dict" and isinstance(body, list) and set(node) <= {"dict", "ordered", "metadata"}:
        # A container with _metadata is an OrderedDict, as state_dict() returns: a plain dict
        # cannot carry the attribute.
        ordered = node.get("ordered") is True or "metadata" in node
        out: Any = _build_items(body, depth, tensors, path, OrderedDict() if ordered else {})
        if "metadata" in node:
            meta = node["metadata"]
            if not isinstance(meta, dict) or not all(isinstance(v, dict) for v in meta.values()):
                raise _invalid(path, "a _metadata that is not an object of objects")
            out._metadata = OrderedDict(meta)
        return out
    raise _invalid(path, f"unexpected node {node!r:.60}")


def _build_items(
    body: list[Any], depth: int, tensors: Mapping[str, torch.Tensor], path: str, out: Any
) -> Any:
    """Fills the mapping ``out`` with a dict node's ``[key, node]`` items."""
    counts: dict[int, int] = {}
    for item in body:
        if not isinstance(item, list) or len(item) != 2 or type(item[0]) not in (str, int):
            raise _invalid(path, f"bad dict item {item!r:.60}")
        if type(item[0]) is int and _count_hash(counts, item[0]) > MAX_SHARED_HASH:
            raise _invalid(path, f"more than {MAX_SHARED_HASH} int keys of a dict share a hash")
        out[item[0]] = _build(item[1], depth + 1, tensors, path)
    return out


def _build_set(
    kind: str, body: list[Any], depth: int, tensors: Mapping[str, torch.Tensor], path: str
) -> set[Any] | frozenset[Any]:
    items = [_build(v, depth + 1, tensors, path) for v in body]
    counts: dict[int, int] = {}
    try:
        for item in items:
            if _count_hash(counts, item) > MAX_SHARED_HASH:
                raise _invalid(path, f"more than {MAX_SHARED_HASH} items of a {kind} share a hash")
    except TypeError as e:  # unhashable: a crafted list or dict item
        raise _invalid(path, f"a {kind} item is not hashable ({e})") from None
    return set(items) if kind == "set" else frozenset(items)


def _stored_tensor(
    node: dict[str, Any], kind: str, tensors: Mapping[str, torch.Tensor], path: str
) -> torch.Tensor:
    name = node[kind]
    if not isinstance(name, str):
        raise _invalid(path, f"unexpected node {node!r:.60}")
    if name not in tensors:
        raise _invalid(path, f"tensor {name!r} is not in the file")
    return tensors[name].cpu()  # numpy and bytes live in host memory


def _build_bytes(
    node: dict[str, Any], tensors: Mapping[str, torch.Tensor], path: str
) -> bytes | bytearray:
    kind = next(iter(node))
    if len(node) != 1:
        raise _invalid(path, f"unexpected node {node!r:.60}")
    tensor = _stored_tensor(node, kind, tensors, path)
    if tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise _invalid(path, f"{kind} stored in a tensor that is not 1-d uint8")
    data = tensor.numpy().tobytes()
    return data if kind == "bytes" else bytearray(data)


def _build_numpy(node: dict[str, Any], tensors: Mapping[str, torch.Tensor], path: str) -> Any:
    import numpy as np  # only files that hold numpy values need it

    if not set(node) <= {"numpy", "dtype", "shape", "scalar"} or not {"dtype", "shape"} <= set(
        node
    ):
        raise _invalid(path, f"unexpected node {node!r:.60}")
    shape = node["shape"]
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise _invalid(path, f"bad numpy shape {shape!r:.60}")
    try:
        dtype = np.dtype(node["dtype"]) if isinstance(node["dtype"], str) else None
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.kind not in _NUMPY_KINDS or dtype.fields is not None:
        raise _invalid(path, f"bad numpy dtype {node['dtype']!r:.60}")
    tensor = _stored_tensor(node, "numpy", tensors, path)
    native = dtype.newbyteorder("=")
    complex128 = native == np.dtype(np.complex128)
    try:
        expected = torch.from_numpy(np.empty(0, dtype=np.float64 if complex128 else native)).dtype
    except TypeError:
        raise _invalid(path, f"numpy dtype {dtype} has no torch equivalent") from None
    stored_shape = [*shape, 2] if complex128 else shape
    if tensor.dtype != expected or list(tensor.shape) != stored_shape:
        raise _invalid(
            path,
            f"tensor {node['numpy']!r} is {tensor.dtype} {list(tensor.shape)}, not the numpy "
            f"{dtype} {shape} its node describes",
        )
    array = tensor.numpy()
    if complex128:
        array = array.view(np.complex128).reshape(shape)
    if array.dtype != dtype:  # a byte order other than the machine's
        array = array.astype(dtype)
    if node.get("scalar") is True:
        if shape:
            raise _invalid(path, "a numpy scalar with a shape")
        return array[()]
    return array


def _build_torch_value(node: dict[str, Any], tensors: Mapping[str, torch.Tensor], path: str) -> Any:
    kind = next(iter(node))
    body = node[kind]
    if len(node) == 1 and kind == "dtype" and isinstance(body, str):
        dtype = getattr(torch, body, None) if body.isidentifier() else None
        if isinstance(dtype, torch.dtype):
            return dtype
    sizes = body if kind == "size" and isinstance(body, list) else None
    if len(node) == 1 and sizes is not None and all(type(n) is int and n >= 0 for n in sizes):
        return torch.Size(sizes)
    if len(node) == 1 and kind == "device" and isinstance(body, str):
        try:
            return torch.device(body)
        except (RuntimeError, ValueError):
            pass
    raise _invalid(path, f"unexpected node {node!r:.60}")


_LEAF_BUILDERS: dict[str, Any] = {
    "numpy": _build_numpy,
    "bytes": _build_bytes,
    "bytearray": _build_bytes,
    "dtype": _build_torch_value,
    "size": _build_torch_value,
    "device": _build_torch_value,
}
