"""zerockpt.load_state_dict against torch's nn.Module.load_state_dict, torch being the oracle.

Every test loads the same source into two identically seeded models, one with torch and one
with zerockpt, and compares the outcome (return value, or exception type and text; warnings)
and then everything about the two models' state. From a file, torch loads what
``zerockpt.load(path)`` returns (checked against the saved state dict first).
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import zerockpt
from conftest import assert_dicts_bitwise_equal, forkserver_context
from test_traversal import (
    LOAD_ZOO,
    Case,
    Dtypes,
    ExtraState,
    Strided,
    TensorExtraState,
    TiedLM,
    build,
    cpu_model_for_meta,
    meta_model,
    storage_ptr,
    tensor_props,
    zoo_params,
)
from torch import nn
from torch.nn.parameter import is_lazy

SRC_SEED, DST_SEED = 1, 2

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a call returned or raised, and the warnings it emitted."""

    result: Any
    error: tuple[type[BaseException], str] | None
    warnings: list[tuple[type[Warning], str]]


def capture(fn: Callable[[], Any]) -> Outcome:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result, error = fn(), None
        except Exception as e:
            result, error = None, (type(e), str(e))
    return Outcome(result, error, [(w.category, str(w.message)) for w in caught])


def _spaceless(error: tuple[type[BaseException], str] | None) -> Any:
    return error and (error[0], "".join(error[1].split()))


def assert_same_outcome(expected: Outcome, got: Outcome) -> None:
    # Spacing aside: torch 2.11's post-hook message lacks two spaces that later torch has.
    assert _spaceless(got.error) == _spaceless(expected.error)
    assert got.warnings == expected.warnings
    assert type(got.result) is type(expected.result)
    if expected.result is not None:
        assert type(got.result.missing_keys) is type(expected.result.missing_keys)
        assert type(got.result.unexpected_keys) is type(expected.result.unexpected_keys)
        assert got.result.missing_keys == expected.result.missing_keys
        assert got.result.unexpected_keys == expected.result.unexpected_keys
        assert got.result == expected.result


def named_state(model: nn.Module) -> dict[str, Any]:
    """Parameters and buffers (non-persistent too) under every name, and extra states."""
    out: dict[str, Any] = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        out["param " + name] = t
    for name, t in model.named_buffers(remove_duplicate=False):
        out["buffer " + name] = t
    for name, m in model.named_modules(remove_duplicate=False):
        if type(m).get_extra_state is not nn.Module.get_extra_state:
            out["extra " + name] = m.get_extra_state()
    return out


def source_storages(source: Mapping[str, Any] | None) -> dict[int, list[str]] | None:
    """Storage address -> the keys of ``source`` whose tensors live there."""
    if source is None:
        return None
    out: dict[int, list[str]] = {}
    for k, v in source.items():
        if isinstance(v, torch.Tensor) and not v.is_meta:
            out.setdefault(storage_ptr(v), []).append(k)  # type: ignore[arg-type]
    return out


def describe(
    value: Any,
    before: Any,
    before_ptr: int | None,
    storages: dict[int, list[str]] | None,
) -> Any:
    """A comparable description of one entry of a model after a load.

    ``before`` is the entry before the load: whether the object or its storage is still the
    same tells copy from assign. With a dict source, the keys whose tensors share the entry's
    storage (``storages``) tell where an assigned tensor came from.
    """
    if not isinstance(value, torch.Tensor):
        return ("value", type(value), repr(value))
    props = tensor_props(value)
    props["same_object"] = value is before
    if is_lazy(value) or value.is_meta:
        return props
    ptr = storage_ptr(value)
    props["same_storage"] = ptr == before_ptr
    if storages is not None:
        props["from_source"] = storages.get(ptr, [])  # type: ignore[arg-type]
    return props


def ties(state: dict[str, Any]) -> list[list[str]]:
    """Names grouped by object identity (tied parameters)."""
    groups: dict[int, list[str]] = {}
    for name, value in state.items():
        groups.setdefault(id(value), []).append(name)
    return sorted(g for g in groups.values() if len(g) > 1)


class Snapshot:
    """A model's entries before a load, to describe the model after it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.before = named_state(model)
        self.ptrs = {
            k: storage_ptr(v) if isinstance(v, torch.Tensor) and not is_lazy(v) else None
            for k, v in self.before.items()
        }

    def after(self, source: Mapping[str, Any] | None) -> dict[str, Any]:
        state = named_state(self.model)
        storages = source_storages(source)
        out = {
            k: describe(v, self.before.get(k), self.ptrs.get(k), storages) for k, v in state.items()
        }
        out["<ties>"] = ties({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
        out["<state_dict keys>"] = list(self.model.state_dict(keep_vars=True))
        return out


def assert_same_state(expected: dict[str, Any], got: dict[str, Any]) -> None:
    assert list(got) == list(expected)
    for key in expected:
        assert got[key] == expected[key], key


def describe_source(source: Mapping[str, Any]) -> Any:
    """The source after a load (loads may change requires_grad or ``_metadata``)."""
    metadata = getattr(source, "_metadata", None)
    values = {
        k: tensor_props(v) if isinstance(v, torch.Tensor) else repr(v) for k, v in source.items()
    }
    return list(source), values, repr(metadata)


def compare_load(
    make_dst: Callable[[], nn.Module],
    source_t: Any,
    source_z: Any,
    *,
    strict: bool = True,
    assign: bool = False,
    dict_source: bool = True,
    load_t: Callable[[nn.Module, Any], Any] | None = None,
    load_z: Callable[[nn.Module, Any], Any] | None = None,
) -> tuple[nn.Module, nn.Module]:
    """Loads ``source_t`` with torch and ``source_z`` with zerockpt into two fresh models."""
    model_t, model_z = build(make_dst, DST_SEED), build(make_dst, DST_SEED)
    snap_t, snap_z = Snapshot(model_t), Snapshot(model_z)
    if load_t is None:
        out_t = capture(lambda: model_t.load_state_dict(source_t, strict=strict, assign=assign))
    else:
        out_t = capture(lambda: load_t(model_t, source_t))
    if load_z is None:
        out_z = capture(
            lambda: zerockpt.load_state_dict(model_z, source_z, strict=strict, assign=assign)
        )
    else:
        out_z = capture(lambda: load_z(model_z, source_z))
    assert_same_outcome(out_t, out_z)
    assert_same_state(
        snap_t.after(source_t if dict_source else None),
        snap_z.after(source_z if dict_source else None),
    )
    if dict_source:
        assert describe_source(source_z) == describe_source(source_t)
    return model_t, model_z


def compare_dict_load(
    make_dst: Callable[[], nn.Module], source: Mapping[str, Any], **kwargs: Any
) -> tuple[nn.Module, nn.Module]:
    """compare_load with two deep copies of ``source`` (``_metadata`` and ties kept)."""
    return compare_load(make_dst, copy.deepcopy(source), copy.deepcopy(source), **kwargs)


def compare_file_load(
    make_dst: Callable[[], nn.Module], path: Path, **kwargs: Any
) -> tuple[nn.Module, nn.Module]:
    """compare_load from a file: torch gets ``zerockpt.load(path)``, zerockpt the path."""
    return compare_load(make_dst, zerockpt.load(path), path, dict_source=False, **kwargs)


def source_state_dict(case: Case) -> OrderedDict[str, Any]:
    return build(case.source(), SRC_SEED).state_dict()


def save_source(case: Case, path: Path) -> Path:
    """``zerockpt.save(source_model, path)``; the file holds what state_dict() returns."""
    src = build(case.source(), SRC_SEED)
    zerockpt.save(src, path)
    loaded = zerockpt.load(path)
    expected = src.state_dict()
    assert_dicts_bitwise_equal(loaded, expected)
    assert loaded._metadata == expected._metadata  # type: ignore[attr-defined]
    return path


def saved(tensors: Mapping[str, Any], path: Path) -> Path:
    zerockpt.save(tensors, path)
    return path


def with_metadata(d: Mapping[str, Any], metadata: Any) -> OrderedDict[str, Any]:
    out: OrderedDict[str, Any] = OrderedDict(d)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


STRICT = pytest.mark.parametrize("strict", [True, False], ids=["strict", "lax"])
ASSIGN = pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
SOURCE = pytest.mark.parametrize("kind", ["dict", "file"])


def compare_both(
    kind: str,
    make_dst: Callable[[], nn.Module],
    source: Mapping[str, Any],
    tmp_path: Path,
    **kwargs: Any,
) -> tuple[nn.Module, nn.Module]:
    """compare_dict_load or compare_file_load (the source saved by zerockpt.save)."""
    if kind == "dict":
        return compare_dict_load(make_dst, source, **kwargs)
    return compare_file_load(make_dst, saved(source, tmp_path / "src.safetensors"), **kwargs)


# ---------------------------------------------------------------------------------------------
# The zoo
# ---------------------------------------------------------------------------------------------


@ASSIGN
@STRICT
@pytest.mark.parametrize("case", zoo_params(LOAD_ZOO))
def test_load_dict_zoo(case: Case, strict: bool, assign: bool) -> None:
    compare_dict_load(case.make, source_state_dict(case), strict=strict, assign=assign)


@ASSIGN
@STRICT
@pytest.mark.parametrize("case", zoo_params([c for c in LOAD_ZOO if c.file]))
def test_load_file_zoo(case: Case, strict: bool, assign: bool, tmp_path: Path) -> None:
    path = save_source(case, tmp_path / "src.safetensors")
    compare_file_load(case.make, path, strict=strict, assign=assign)


@pytest.mark.parametrize("case", zoo_params(LOAD_ZOO))
def test_load_keep_vars_source(case: Case) -> None:
    """A source of Parameters (keep_vars=True) with requires_grad flipped, assigned."""
    src = build(case.source(), SRC_SEED)
    for p in src.parameters():
        if not is_lazy(p):
            p.requires_grad_(not p.requires_grad)
    compare_dict_load(case.make, src.state_dict(keep_vars=True), assign=True)


@pytest.mark.parametrize("as_path", [str, Path], ids=["str", "path"])
def test_load_file_path_types(as_path: Callable[[Any], Any], tmp_path: Path) -> None:
    case = LOAD_ZOO[0]
    path = save_source(case, tmp_path / "src.safetensors")
    compare_load(case.make, zerockpt.load(path), as_path(path), dict_source=False)


# ---------------------------------------------------------------------------------------------
# Keys: missing, unexpected, size mismatch, shapes and dtypes
# ---------------------------------------------------------------------------------------------


def nested() -> nn.Module:
    """Root with a parameter, children (one registered as None) and a grandchild."""
    m = nn.Module()
    m.w = nn.Parameter(torch.randn(3))
    m.register_buffer("steps", torch.tensor(5))
    m.lin = nn.Linear(3, 2)
    m.register_module("gone", None)
    m.register_parameter("p_none", None)
    m.register_buffer("cache", torch.randn(2), persistent=False)
    m.seq = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    return m


def nested_source() -> OrderedDict[str, Any]:
    return build(nested, SRC_SEED).state_dict()


@ASSIGN
@STRICT
@SOURCE
def test_load_missing_keys(kind: str, strict: bool, assign: bool, tmp_path: Path) -> None:
    source = nested_source()
    for key in ["w", "lin.bias", "seq.1.running_var", "seq.0.weight"]:
        del source[key]
    compare_both(kind, nested, source, tmp_path, strict=strict, assign=assign)


@ASSIGN
@STRICT
@SOURCE
def test_load_unexpected_keys(kind: str, strict: bool, assign: bool, tmp_path: Path) -> None:
    source = nested_source()
    source["extra"] = torch.zeros(1)  # local
    source["lin.extra"] = torch.zeros(2)  # local to a child
    source["ghost.weight"] = torch.zeros(2)  # under an unknown child
    source["ghost.deeper.x"] = torch.zeros(1)
    source["gone.weight"] = torch.zeros(2)  # under a child registered as None: ignored
    source["seq.5.weight"] = torch.zeros(1)  # unknown grandchild
    source["seq.1.num_batches_tracked.x"] = torch.zeros(1)  # a buffer name used as a child
    source["lin._extra_state"] = torch.zeros(1)  # no set_extra_state: unexpected
    source["p_none"] = torch.zeros(1)  # a parameter registered as None
    source["cache"] = torch.zeros(2)  # a non-persistent buffer
    for odd in ["", ".", "lin.", "seq..weight", "lin..", "é", "seq.ü.x"]:
        source[odd] = torch.zeros(1)
    source.move_to_end("w")
    compare_both(kind, nested, source, tmp_path, strict=strict, assign=assign)


@ASSIGN
@STRICT
@SOURCE
def test_load_size_mismatch(kind: str, strict: bool, assign: bool, tmp_path: Path) -> None:
    source = nested_source()
    source["w"] = torch.randn(4)
    source["lin.weight"] = torch.randn(3, 2)
    source["steps"] = torch.tensor([1, 2])
    source["seq.1.running_mean"] = torch.randn(())
    source["seq.0.bias"] = torch.randn(0)
    del source["seq.0.weight"]
    source["unknown"] = torch.ones(1)
    compare_both(kind, nested, source, tmp_path, strict=strict, assign=assign)


class Scalars(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(2.0))
        self.register_buffer("b", torch.tensor(3, dtype=torch.int64))
        self.register_buffer("h", torch.tensor(1.0, dtype=torch.float16))


@ASSIGN
@SOURCE
def test_load_one_element_into_scalar(kind: str, assign: bool, tmp_path: Path) -> None:
    source = OrderedDict(
        p=torch.tensor([7.5]),
        b=torch.tensor([9], dtype=torch.int64),
        h=torch.tensor([4.0], dtype=torch.float64),  # (1,) and a dtype conversion
    )
    compare_both(kind, Scalars, source, tmp_path, assign=assign)


@ASSIGN
def test_load_one_element_parameter_into_scalar(assign: bool) -> None:
    """``input_param[0]`` of a Parameter that requires grad: a view with a grad_fn."""
    source = OrderedDict(
        p=nn.Parameter(torch.tensor([7.5])),
        b=torch.tensor([9]),
        h=nn.Parameter(torch.tensor([4.0], dtype=torch.float16)),
    )
    compare_dict_load(Scalars, source, assign=assign)


@pytest.mark.parametrize("bad", [torch.randn(2), torch.randn(1, 1), torch.randn(())])
@SOURCE
def test_load_not_one_element_into_scalar(kind: str, bad: torch.Tensor, tmp_path: Path) -> None:
    source = OrderedDict(p=bad, b=torch.tensor(1), h=torch.tensor([2.0]).half())
    compare_both(kind, Scalars, source, tmp_path)


@pytest.mark.parametrize(
    "src_dtype", [torch.float64, torch.bfloat16, torch.float16, torch.int32], ids=str
)
@ASSIGN
@SOURCE
def test_load_dtype_conversion(
    kind: str, assign: bool, src_dtype: torch.dtype, tmp_path: Path
) -> None:
    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3).bfloat16())

    source = build(make, SRC_SEED).double().state_dict()
    if src_dtype.is_floating_point:
        source["0.weight"][0, 0] = float("nan")
    metadata = source._metadata  # type: ignore[attr-defined]
    source = with_metadata({k: (v * 10).to(src_dtype) for k, v in source.items()}, metadata)
    compare_both(kind, make, source, tmp_path, assign=assign)


@ASSIGN
@SOURCE
def test_load_non_contiguous_source(kind: str, assign: bool, tmp_path: Path) -> None:
    """Transposed, sliced and channels_last source tensors (a file stores them row-major)."""

    def make() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(5, 6), nn.BatchNorm1d(6))

    source = build(make, SRC_SEED).state_dict()
    source["0.weight"] = source["0.weight"].contiguous(memory_format=torch.channels_last)
    source["1.weight"] = torch.randn(5, 6).t()
    source["1.bias"] = torch.randn(12)[::2]
    source["2.running_mean"] = torch.randn(6, 3, dtype=torch.float64)[:, 1]
    compare_both(kind, make, source, tmp_path, assign=assign)


def aliased() -> nn.Module:
    """A parameter that is a view of a buffer."""
    m = nn.Module()
    m.register_buffer("flat", torch.arange(12.0))
    m.a = nn.Parameter(m.flat[0:6])
    return m


@pytest.mark.parametrize("shift", [0, 3, 6], ids=["same", "partial", "disjoint"])
@ASSIGN
def test_load_source_aliasing_destination(shift: int, assign: bool) -> None:
    """Source tensors that are views of the model's own memory: copy_'s overlap rules."""

    def load_t(model: nn.Module, _: Any) -> Any:
        source = OrderedDict(a=model.flat[shift : shift + 6])
        return model.load_state_dict(source, strict=False, assign=assign)

    def load_z(model: nn.Module, _: Any) -> Any:
        source = OrderedDict(a=model.flat[shift : shift + 6])
        return zerockpt.load_state_dict(model, source, strict=False, assign=assign)

    compare_load(aliased, None, None, dict_source=False, load_t=load_t, load_z=load_z)


@pytest.mark.parametrize("keep_vars", [False, True], ids=["detached", "keep_vars"])
@ASSIGN
def test_load_own_state_dict(keep_vars: bool, assign: bool) -> None:
    """A model's own state dict loaded back into it (every source tensor is a parameter)."""

    def make() -> nn.Module:
        return nn.Sequential(TiedLM(), nn.BatchNorm1d(10))

    def load_t(model: nn.Module, _: Any) -> Any:
        return model.load_state_dict(model.state_dict(keep_vars=keep_vars), assign=assign)

    def load_z(model: nn.Module, _: Any) -> Any:
        return zerockpt.load_state_dict(model, model.state_dict(keep_vars=keep_vars), assign=assign)

    compare_load(make, None, None, dict_source=False, load_t=load_t, load_z=load_z)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@ASSIGN
@SOURCE
def test_load_grad_modes(mode: str, kind: str, assign: bool, tmp_path: Path) -> None:
    """Loads inside no_grad / inference_mode (from a file, torch's side reads it there too)."""
    source: Any = nested_source()
    if kind == "file":
        source = saved(source, tmp_path / "src.safetensors")

    def load_t(model: nn.Module, src: Any) -> Any:
        with getattr(torch, mode)():
            src = zerockpt.load(src) if kind == "file" else src
            return model.load_state_dict(src, assign=assign)

    def load_z(model: nn.Module, src: Any) -> Any:
        with getattr(torch, mode)():
            return zerockpt.load_state_dict(model, src, assign=assign)

    if kind == "dict":
        compare_dict_load(nested, source, load_t=load_t, load_z=load_z)
    else:
        compare_load(nested, source, source, dict_source=False, load_t=load_t, load_z=load_z)


@STRICT
def test_load_surrogate_key(strict: bool) -> None:
    """A key that is a str but not UTF-8 encodable (a lone surrogate): just unexpected."""
    source = nested_source()
    source["\ud800"] = torch.zeros(1)
    source["lin.\udc80x"] = torch.zeros(1)
    compare_dict_load(nested, source, strict=strict)


def _odd_names_tree() -> nn.Module:
    """Children at depth 1 to 3 named with non-ASCII text, lone surrogates and a surrogate
    pair written as two code points; BatchNorms below them (versioned loading)."""
    torch.manual_seed(0)
    root = nn.Module()
    for name in ["é", "\ud800", "\ud83d\ude00", "\U0001f600", "plain"]:
        mid = nn.Module()
        mid.add_module("\udc80x", nn.Linear(2, 2))
        leaf = nn.Module()
        leaf.add_module("ñ", nn.BatchNorm1d(2))
        mid.add_module("深", leaf)
        root.add_module(name, mid)
    return root


@STRICT
@pytest.mark.parametrize("edit", ["none", "missing", "old_versions", "no_metadata"])
def test_load_odd_child_names(edit: str, strict: bool) -> None:
    """Keys, missing keys and `_metadata` lookups under children whose names are not ASCII or
    not UTF-8 encodable are torch's, at every depth."""
    source = _odd_names_tree().state_dict()
    if edit == "missing":
        for key in [k for k in source if k.endswith(".bias")]:
            del source[key]
    elif edit == "old_versions":  # torch's BatchNorm migration runs with the module's prefix
        for key, entry in source._metadata.items():  # type: ignore[attr-defined]
            if key.endswith("ñ"):
                entry["version"] = 1
        for key in [k for k in source if k.endswith("num_batches_tracked")]:
            del source[key]
    elif edit == "no_metadata":
        del source._metadata  # type: ignore[attr-defined]
    compare_dict_load(_odd_names_tree, source, strict=strict)


class _Name(str):
    """A str subclass used as a registry key: dict membership goes by its hash and __eq__."""

    __slots__ = ()


def _children_with_odd_keys(key_kind: str) -> nn.Module:
    model = nn.Module()
    model.a = nn.Linear(2, 2)
    model.b = nn.Linear(2, 2)
    model.c = None  # a child registered as None still counts as a child name
    if key_kind == "subclass":
        model._modules[_Name("sub")] = nn.Linear(2, 1)
    return model


@STRICT
@pytest.mark.parametrize("key_kind", ["str", "subclass"])
def test_load_unexpected_keys_under_children_names(strict: bool, key_kind: str) -> None:
    """Keys under a name decide "unexpected" by `name in _modules`, as torch does, whatever
    the registry's keys are (exact strs, or a str subclass)."""
    source = OrderedDict(
        [
            ("a.weight", torch.ones(2, 2)),
            ("a.bias", torch.ones(2)),
            ("b.weight", torch.ones(2, 2)),
            ("b.bias", torch.ones(2)),
            ("c.weight", torch.ones(2)),
            ("d.weight", torch.ones(2)),
            ("sub.weight", torch.ones(1, 2)),
            ("sub.bias", torch.ones(1)),
            ("a.x.y", torch.ones(1)),
        ]
    )
    compare_dict_load(lambda: _children_with_odd_keys(key_kind), source, strict=strict)


def _wide_tree(children: int) -> nn.Module:
    """A root with `children` children (two levels), the widest with a parameter of its own."""
    torch.manual_seed(0)
    root = nn.Module()
    root.scale = nn.Parameter(torch.ones(2))
    for i in range(children):
        block = nn.Module()
        block.lin = nn.Linear(2, 2)
        block.norm = nn.LayerNorm(2)
        root.add_module(f"b{i}", block)
    return root


def _reordered(source: Mapping[str, Any], order: str) -> OrderedDict[str, Any]:
    items = list(source.items())
    if order == "reversed":
        items.reverse()
    elif order == "shuffled":
        items = [
            items[i] for i in torch.randperm(len(items), generator=torch.Generator().manual_seed(1))
        ]
    elif order == "interleaved":  # the children's keys alternate: no child's keys in one run
        half = (len(items) + 1) // 2
        first, second = items[:half], items[half:]
        items = [first[i // 2] if i % 2 == 0 else second[i // 2] for i in range(len(items))]
    out = OrderedDict(items)
    out._metadata = getattr(source, "_metadata", None)  # type: ignore[attr-defined]
    return out


@STRICT
@pytest.mark.parametrize("children", [1, 16, 17, 40])  # 16/17: either side of the hash index
@pytest.mark.parametrize("order", ["same", "reversed", "shuffled", "interleaved"])
@pytest.mark.parametrize("extra", [False, True], ids=["exact", "extra_and_missing"])
def test_load_key_order_and_width(children: int, order: str, extra: bool, strict: bool) -> None:
    """Keys in any order and modules of any width group under their children as torch's
    per-child filtering does: same values loaded, same missing and unexpected keys in the
    same order, the same errors."""
    source = _wide_tree(children).state_dict()
    if extra:
        del source[f"b{children - 1}.lin.bias"]  # missing
        source["b0.lin.other"] = torch.ones(1)  # unexpected, local to a child's child
        source[f"b{children}.lin.weight"] = torch.ones(2, 2)  # under a name that is no child
        source["b0.norm.weight"] = torch.ones(3)  # size mismatch
    compare_dict_load(lambda: _wide_tree(children), _reordered(source, order), strict=strict)


@STRICT
def test_load_parameters_into_buffers(strict: bool) -> None:
    """assign=True with Parameters for buffers: torch's setattr turns them into parameters."""
    source = OrderedDict(
        (k, nn.Parameter(v, requires_grad=v.is_floating_point()))
        for k, v in nested_source().items()
    )
    model_t, model_z = compare_dict_load(nested, source, strict=strict, assign=True)
    assert "steps" in dict(model_t.named_parameters())
    assert "steps" in dict(model_z.named_parameters())


@pytest.mark.parametrize("threads", [1, 3, 16])
@ASSIGN
def test_load_file_threads(threads: int, assign: bool, tmp_path: Path) -> None:
    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(300, 200), Strided(), Dtypes(), TiedLM())

    path = saved(build(make, SRC_SEED).state_dict(), tmp_path / "src.safetensors")
    compare_load(
        make,
        zerockpt.load(path),
        path,
        dict_source=False,
        assign=assign,
        load_z=lambda m, p: zerockpt.load_state_dict(m, p, assign=assign, threads=threads),
    )


def _instance_load_override() -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
    child = model[1]

    def load(state_dict: Any, prefix: str, *args: Any) -> None:
        if prefix + "0.w" in state_dict:
            state_dict[prefix + "0.weight"] = state_dict.pop(prefix + "0.w")
        nn.Module._load_from_state_dict(child, state_dict, prefix, *args)

    child._load_from_state_dict = load  # type: ignore[method-assign]
    return model


@ASSIGN
@SOURCE
def test_load_instance_override(kind: str, assign: bool, tmp_path: Path) -> None:
    source = build(_instance_load_override, SRC_SEED).state_dict()
    source["1.0.w"] = source.pop("1.0.weight")
    compare_both(kind, _instance_load_override, source, tmp_path, assign=assign)


@STRICT
def test_load_non_tensor_value(strict: bool) -> None:
    source = nested_source()
    source["w"] = 3
    source["lin.bias"] = [1.0, 2.0]
    source["ghost.x"] = "not a tensor"
    source["seq.0.weight"] = None
    compare_dict_load(nested, source, strict=strict)


def test_load_non_str_keys() -> None:
    source: dict[Any, Any] = dict(build(nested, SRC_SEED).state_dict())
    source[3] = torch.zeros(1)
    compare_dict_load(nested, source)


def test_load_not_a_mapping() -> None:
    src = list(nested_source().items())
    compare_load(nested, src, src, dict_source=False)


class ReadOnlyMapping(Mapping):  # type: ignore[type-arg]
    """A Mapping that is not a dict, with ``_metadata``."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)
        self._metadata = getattr(data, "_metadata", None)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


@pytest.mark.parametrize(
    "wrap",
    [dict, types.MappingProxyType, ReadOnlyMapping],
    ids=["dict", "mappingproxy", "mapping"],
)
@ASSIGN
def test_load_mapping_types(wrap: Callable[[Any], Any], assign: bool) -> None:
    source = nested_source()
    del source["lin.bias"]
    compare_load(
        nested,
        wrap(copy.deepcopy(source)),
        wrap(copy.deepcopy(source)),
        assign=assign,
        strict=False,
    )


@ASSIGN
def test_load_meta_source_into_cpu_model(assign: bool) -> None:
    """Copying from meta tensors fails inside copy_: torch's "While copying" error text."""
    with torch.device("meta"):
        source = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).state_dict()
    compare_dict_load(
        lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), source, assign=assign
    )


@SOURCE
def test_load_complex_into_real_and_back(kind: str, tmp_path: Path) -> None:
    """Real into complex parameters (complex into real warns once per process in torch)."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Parameter(torch.randn(3, dtype=torch.complex64))
            self.d = nn.Parameter(torch.randn(3, dtype=torch.complex64).conj())

    source = OrderedDict(c=torch.randn(3, dtype=torch.float64), d=torch.randn(3))
    compare_both(kind, M, source, tmp_path)


# ---------------------------------------------------------------------------------------------
# _metadata: BatchNorm versions, assign mutating the caller's metadata
# ---------------------------------------------------------------------------------------------


def bn_tree() -> nn.Module:
    return nn.Sequential(nn.BatchNorm1d(3), nn.Sequential(nn.BatchNorm2d(2)), nn.Linear(2, 2))


@pytest.mark.parametrize("bn_version", [1, 2, None], ids=["v1", "v2", "no_metadata"])
@ASSIGN
@STRICT
@SOURCE
def test_load_batchnorm_metadata(
    kind: str, strict: bool, assign: bool, bn_version: int | None, tmp_path: Path
) -> None:
    src = build(bn_tree, SRC_SEED)
    src.train()
    with torch.no_grad():
        src[0](torch.randn(4, 3))
    full = src.state_dict()
    tensors = {k: v for k, v in full.items() if not k.endswith("num_batches_tracked")}
    metadata = None
    if bn_version is not None:
        metadata = copy.deepcopy(full._metadata)  # type: ignore[attr-defined]
        for key in ("0", "1.0"):
            metadata[key]["version"] = bn_version
    source = with_metadata(tensors, metadata)
    compare_both(kind, bn_tree, source, tmp_path, strict=strict, assign=assign)


@pytest.mark.parametrize("assign", [True, False, 1], ids=["assign", "copy", "assign_int"])
def test_load_assign_mutates_caller_metadata(assign: Any) -> None:
    """torch writes ``assign_to_params_buffers`` into the caller's ``_metadata`` entries."""
    source = build(nested, SRC_SEED).state_dict()
    source._metadata["extra"] = {"version": 3}  # type: ignore[attr-defined]
    del source._metadata["lin"]  # type: ignore[attr-defined]
    source_t, source_z = copy.deepcopy(source), copy.deepcopy(source)
    compare_load(nested, source_t, source_z, assign=assign)
    assert repr(source_z._metadata) == repr(source_t._metadata)  # type: ignore[attr-defined]
    for key, entry in source_t._metadata.items():  # type: ignore[attr-defined]
        got = source_z._metadata[key]  # type: ignore[attr-defined]
        assert list(got.items()) == list(entry.items()), key
        assert [type(v) for v in got.values()] == [type(v) for v in entry.values()], key


# ---------------------------------------------------------------------------------------------
# Meta-device models
# ---------------------------------------------------------------------------------------------


@STRICT
@SOURCE
def test_load_meta_model_assign(kind: str, strict: bool, tmp_path: Path) -> None:
    source = build(cpu_model_for_meta, SRC_SEED).state_dict()
    _, model_z = compare_both(kind, meta_model, source, tmp_path, strict=strict, assign=True)
    assert not any(t.is_meta for t in model_z.state_dict().values())
    for p in model_z.parameters():
        assert type(p) is nn.Parameter and p.requires_grad


@SOURCE
def test_load_meta_model_warns(kind: str, tmp_path: Path) -> None:
    source = build(cpu_model_for_meta, SRC_SEED).state_dict()
    results = []
    for load in ("torch", "zerockpt"):
        model = build(meta_model, DST_SEED)
        src: Any = copy.deepcopy(source)
        if kind == "file":
            src = saved(source, tmp_path / f"{load}.safetensors")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if load == "torch":
                model.load_state_dict(src if kind == "dict" else zerockpt.load(src))
            else:
                zerockpt.load_state_dict(model, src)
        results.append([(w.category, str(w.message)) for w in caught])
        assert all(t.is_meta for t in model.state_dict().values())
    assert results[1] == results[0]
    assert len(results[0]) == len(source)
    assert all(c is UserWarning and "copying from a non-meta parameter" in m for c, m in results[0])


# ---------------------------------------------------------------------------------------------
# swap_tensors mode (torch.__future__)
# ---------------------------------------------------------------------------------------------


@ASSIGN
@SOURCE
def test_load_swap_module_params(kind: str, assign: bool, tmp_path: Path) -> None:
    source = nested_source()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        compare_both(kind, nested, source, tmp_path, assign=assign)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


# ---------------------------------------------------------------------------------------------
# Hooks and overrides
# ---------------------------------------------------------------------------------------------


class Logged(nn.Module):
    """A tree with load pre/post hooks and a recording _load_from_state_dict at each level."""

    def __init__(self, log: list[Any]) -> None:
        super().__init__()
        self.log = log
        self.w = nn.Parameter(torch.randn(2))
        self.a = nn.Linear(2, 2)
        self.b = nn.Sequential(LoggedLeaf(log), nn.Linear(2, 1))
        for name, m in [("root", self), ("a", self.a), ("b", self.b), ("b.1", self.b[1])]:
            m.register_load_state_dict_pre_hook(self._pre(log, name))
            m.register_load_state_dict_post_hook(self._post(log, name))
            m.register_load_state_dict_pre_hook(self._pre(log, name + "#2"))

    @staticmethod
    def _pre(log: list[Any], name: str) -> Callable[..., None]:
        def hook(
            module: nn.Module,
            sd: Any,
            prefix: str,
            local_metadata: Any,
            strict: bool,
            missing: list[str],
            unexpected: list[str],
            errors: list[str],
        ) -> None:
            log.append(
                (
                    "pre",
                    name,
                    type(sd).__name__,
                    list(sd),
                    prefix,
                    dict(local_metadata),
                    strict,
                    list(missing),
                    list(unexpected),
                    list(errors),
                )
            )

        return hook

    @staticmethod
    def _post(log: list[Any], name: str) -> Callable[..., None]:
        def hook(module: nn.Module, incompatible: Any) -> None:
            log.append(
                (
                    "post",
                    name,
                    type(incompatible).__name__,
                    list(incompatible.missing_keys),
                    list(incompatible.unexpected_keys),
                )
            )

        return hook


class LoggedLeaf(nn.Linear):
    def __init__(self, log: list[Any]) -> None:
        super().__init__(2, 2)
        self.log = log

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing: list[str],
        unexpected: list[str],
        errors: list[str],
    ) -> None:
        self.log.append(
            (
                "load",
                type(state_dict).__name__,
                list(state_dict),
                prefix,
                dict(local_metadata),
                strict,
            )
        )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing, unexpected, errors
        )


def logged_source() -> OrderedDict[str, Any]:
    source = build(lambda: Logged([]), SRC_SEED).state_dict()
    del source["a.bias"]
    source["b.0.extra"] = torch.zeros(1)
    source["zzz"] = torch.zeros(1)
    return source


@ASSIGN
@STRICT
@SOURCE
def test_load_hook_order(kind: str, strict: bool, assign: bool, tmp_path: Path) -> None:
    log_t: list[Any] = []
    log_z: list[Any] = []
    logs = iter([log_t, log_z])
    source = logged_source()
    compare_both(kind, lambda: Logged(next(logs)), source, tmp_path, strict=strict, assign=assign)
    assert log_z == log_t
    assert len(log_t) > 10


def _rename_hook(old: str, new: str) -> Callable[..., None]:
    def hook(module: nn.Module, sd: Any, prefix: str, *args: Any) -> None:
        if prefix + old in sd:
            sd[prefix + new] = sd.pop(prefix + old)

    return hook


def renamed_model(where: str) -> nn.Module:
    m = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)))
    if where == "root":
        m.register_load_state_dict_pre_hook(_rename_hook("1.old.weight", "1.0.weight"))
        m.register_load_state_dict_pre_hook(_rename_hook("legacy", "0.bias"))
    elif where == "child":
        m[1].register_load_state_dict_pre_hook(_rename_hook("old.weight", "0.weight"))
    else:
        m[1][0].register_load_state_dict_pre_hook(_rename_hook("w", "weight"))
    return m


@pytest.mark.parametrize("where", ["root", "child", "leaf"])
@ASSIGN
@SOURCE
def test_load_pre_hook_renames_keys(where: str, kind: str, assign: bool, tmp_path: Path) -> None:
    source = build(lambda: renamed_model("leaf"), SRC_SEED).state_dict()
    if where in ("root", "child"):
        source["1.old.weight"] = source.pop("1.0.weight")
    if where == "root":
        source["legacy"] = source.pop("0.bias")
    else:
        source["1.0.w"] = source.pop("1.0.weight") if where == "leaf" else torch.zeros(1)
    compare_both(kind, lambda: renamed_model(where), source, tmp_path, assign=assign)


def _clear_missing(module: nn.Module, incompatible: Any) -> None:
    incompatible.missing_keys.clear()


def _returns_value(module: nn.Module, incompatible: Any) -> Any:
    return incompatible


@pytest.mark.parametrize("where", ["root", "child"])
@pytest.mark.parametrize("hook", [_clear_missing, _returns_value], ids=["clear", "returns"])
@SOURCE
def test_load_post_hooks(where: str, hook: Callable[..., Any], kind: str, tmp_path: Path) -> None:
    def make() -> nn.Module:
        m = nested()
        (m if where == "root" else m.seq).register_load_state_dict_post_hook(hook)
        return m

    source = nested_source()
    del source["seq.0.bias"]
    del source["w"]
    compare_both(kind, make, source, tmp_path)


class LegacyRename(nn.Linear):
    """Overrides _load_from_state_dict: version-1 checkpoints call the weight "w"."""

    _version = 2

    def _load_from_state_dict(
        self, state_dict: Any, prefix: str, local_metadata: Any, *args: Any
    ) -> None:
        if local_metadata.get("version", 1) < 2 and prefix + "w" in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(prefix + "w") * 2
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


@pytest.mark.parametrize("legacy", [True, False], ids=["v1", "v2"])
@ASSIGN
@SOURCE
def test_load_overridden_load_from_state_dict(
    legacy: bool, kind: str, assign: bool, tmp_path: Path
) -> None:
    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(2, 2), LegacyRename(2, 3), nn.Sequential(LegacyRename(3, 1)))

    source = build(make, SRC_SEED).state_dict()
    if legacy:
        source["1.w"] = source.pop("1.weight")
        source["2.0.w"] = source.pop("2.0.weight")
        source._metadata["1"]["version"] = 1  # type: ignore[attr-defined]
        source._metadata["2.0"]["version"] = 1  # type: ignore[attr-defined]
    compare_both(kind, make, source, tmp_path, assign=assign)


class CustomLoad(nn.Module):
    """Overrides load_state_dict on the root."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


@ASSIGN
@SOURCE
def test_load_overridden_load_state_dict(kind: str, assign: bool, tmp_path: Path) -> None:
    source = build(CustomLoad, SRC_SEED).state_dict(prefix="model.")
    compare_both(kind, CustomLoad, source, tmp_path, assign=assign)


@ASSIGN
@STRICT
def test_load_extra_state(strict: bool, assign: bool) -> None:
    def make() -> nn.Module:
        return nn.Sequential(ExtraState(), nn.Sequential(ExtraState(), TensorExtraState()))

    source = build(make, SRC_SEED).state_dict()
    del source["1.0._extra_state"]
    compare_dict_load(make, source, strict=strict, assign=assign)
    model_t, model_z = compare_dict_load(make, build(make, SRC_SEED).state_dict())
    assert model_z[0].state == model_t[0].state == build(make, SRC_SEED)[0].state


def test_load_extra_state_tensor_from_file(tmp_path: Path) -> None:
    def make() -> nn.Module:
        return nn.Sequential(TensorExtraState(), nn.Linear(2, 2))

    path = saved(build(make, SRC_SEED).state_dict(), tmp_path / "src.safetensors")
    model_t, model_z = compare_file_load(make, path)
    assert torch.equal(model_z[0].extra, model_t[0].extra)


# ---------------------------------------------------------------------------------------------
# Warnings as torch emits them: category, text, origin (file, line, module), once per event
# (issue 18, point 13)
# ---------------------------------------------------------------------------------------------


def recorded(call: Callable[[], Any]) -> list[tuple[type[Warning], str, str, int]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [(w.category, str(w.message), w.filename, w.lineno) for w in caught]


@SOURCE
def test_meta_warnings_come_from_where_torch_warns(kind: str, tmp_path: Path) -> None:
    source = build(cpu_model_for_meta, SRC_SEED).state_dict()
    src: Any = saved(source, tmp_path / "m.safetensors") if kind == "file" else source
    expected = recorded(lambda: build(meta_model, DST_SEED).load_state_dict(source))
    got = recorded(lambda: zerockpt.load_state_dict(build(meta_model, DST_SEED), src))
    assert got == expected and len(got) == len(source)
    assert nn.modules.module.__file__ in {w[2] for w in got}  # not zerockpt's files

    # Filters written for torch's warnings apply to zerockpt's as to torch's.
    def filtered(call: Callable[[], Any]) -> list[tuple[type[Warning], str]]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", module=r"torch\.nn\.modules\.module")
            call()
        return [(w.category, str(w.message)) for w in caught]

    kept = filtered(lambda: build(meta_model, DST_SEED).load_state_dict(source))
    assert filtered(lambda: zerockpt.load_state_dict(build(meta_model, DST_SEED), src)) == kept
    assert len(kept) < len(expected)
    message = next(w[1] for w in expected if w[2] == nn.modules.module.__file__)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=re.escape(message))
        with pytest.raises(UserWarning, match="copying from a non-meta parameter"):
            zerockpt.load_state_dict(build(meta_model, DST_SEED), src)


# Complex into real warns once per process (TORCH_WARN_ONCE), so each way runs in a process of
# its own (forked from a server that never cast complex to real), loading into every target
# dtype in turn.
def cast_warnings(how: str) -> list[Any]:
    out: list[Any] = []
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.float8_e4m3fn)
    if how == "error":
        warnings.filterwarnings("error", category=UserWarning, module=r"torch\.nn\.modules\.module")
        m = nn.Linear(2, 2)
        sd = {k: torch.randn(v.shape, dtype=torch.complex64) for k, v in m.state_dict().items()}
        try:
            zerockpt.load_state_dict(m, sd)
        except UserWarning as e:
            return [str(e)]
        return []
    for dtype in dtypes:
        m = nn.Module()
        m.register_buffer("s", torch.zeros((), dtype=dtype))
        m.register_buffer("v", torch.zeros(5, dtype=dtype))
        m.w = nn.Parameter(torch.zeros(3, 4, dtype=dtype), requires_grad=False)
        sd = {k: torch.randn(v.shape, dtype=torch.complex64) for k, v in m.state_dict().items()}
        path = os.path.join(tempfile.mkdtemp(), "c.safetensors")
        zerockpt.save(sd, path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if how == "torch":
                m.load_state_dict(sd)
            elif how == "dict":
                zerockpt.load_state_dict(m, sd)
            else:
                zerockpt.load_state_dict(m, path)
        out += [(str(dtype), w.category, str(w.message), w.filename, w.lineno) for w in caught]
    return out


def test_complex_to_real_warnings_match_torch() -> None:
    ctx = forkserver_context("test_traversal_load")
    with ctx.Pool(4, maxtasksperchild=1) as pool:
        expected, from_dict, from_file, error = pool.map(
            cast_warnings, ["torch", "dict", "file", "error"]
        )
    assert expected and all("Casting complex values to real" in w[2] for w in expected)
    assert all(w[3] == nn.modules.module.__file__ for w in expected)
    assert from_dict == expected
    assert from_file == expected
    # A filter that makes torch's warning an error makes zerockpt's one.
    assert error and error[0].startswith("Casting complex values to real")


# ---------------------------------------------------------------------------------------------
# torch's norm layers: version migrations handled in C++ when the stored version is current
# ---------------------------------------------------------------------------------------------


def _python_calls(fn: Callable[[], Any]) -> list[str]:
    """Qualified names of the Python functions outside zerockpt and this file that ``fn``
    calls."""
    import sys

    calls: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        name = frame.f_code.co_filename
        if event == "call" and "zerockpt" not in name and name != __file__:
            calls.append(frame.f_code.co_qualname)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


class _LoadMixin(nn.Module):
    seen = 0

    def _load_from_state_dict(self, *args: Any) -> None:
        _LoadMixin.seen += 1
        super()._load_from_state_dict(*args)


class _MixedInstanceNorm(nn.InstanceNorm1d, _LoadMixin):
    """An override further along the MRO than torch's norm layers: super() reaches it."""


def norm_tree() -> nn.Module:
    return nn.Sequential(
        nn.BatchNorm1d(3),
        nn.Sequential(nn.BatchNorm2d(2), nn.BatchNorm1d(2, track_running_stats=False)),
        nn.InstanceNorm1d(3),
        nn.InstanceNorm1d(3, affine=True, track_running_stats=True),
        nn.SyncBatchNorm(2),
        _MixedInstanceNorm(3, track_running_stats=True),
    )


NORM_VERSIONS = [None, 1, 2, 3, True, "2", 2**70, "absent"]


@pytest.mark.parametrize("version", NORM_VERSIONS, ids=[repr(v) for v in NORM_VERSIONS])
@pytest.mark.parametrize("drop", [(), ("num_batches_tracked",), ("running_mean",)])
@STRICT
def test_load_norm_layer_versions(strict: bool, drop: tuple[str, ...], version: Any) -> None:
    """Every stored version, with and without the keys the migrations add or reject: the same
    outcome as torch's, whichever path zerockpt takes."""
    src = build(norm_tree, SRC_SEED)
    full = src.state_dict()
    tensors = OrderedDict((k, v) for k, v in full.items() if k.rsplit(".", 1)[-1] not in drop)
    metadata = copy.deepcopy(full._metadata)  # type: ignore[attr-defined]
    for key in ("0", "1.0", "1.1", "2", "3", "4", "5"):
        if version == "absent":
            del metadata[key]["version"]
        else:
            metadata[key]["version"] = version
    compare_dict_load(norm_tree, with_metadata(tensors, metadata), strict=strict)


def test_load_norm_layers_stay_in_cpp_at_the_current_version() -> None:
    """At the stored version torch writes (2), torch's norm layers' overrides only call
    Module's: no Python runs; an older version runs torch's migration; a mixin along the MRO
    is always called."""
    model = nn.Sequential(nn.BatchNorm1d(3), nn.InstanceNorm1d(3, track_running_stats=True))
    source = model.state_dict()
    calls = _python_calls(lambda: zerockpt.load_state_dict(model, source))
    assert not [c for c in calls if "_load_from_state_dict" in c], calls
    old = copy.deepcopy(source)
    old._metadata["0"]["version"] = 1  # type: ignore[attr-defined]
    calls = _python_calls(lambda: zerockpt.load_state_dict(model, old))
    assert "_NormBase._load_from_state_dict" in calls
    mixed = nn.Sequential(_MixedInstanceNorm(3, track_running_stats=True))
    before = _LoadMixin.seen
    zerockpt.load_state_dict(mixed, mixed.state_dict())
    assert _LoadMixin.seen == before + 1


def test_state_dict_of_plain_modules_runs_no_python() -> None:
    """Modules whose classes override nothing relevant never take a Python path."""
    model = nn.Sequential(
        nn.Linear(2, 2),
        nn.BatchNorm1d(2),
        nn.LayerNorm(2),
        nn.ModuleDict({"e": nn.Embedding(3, 2)}),
    )
    for keep_vars in (False, True):
        calls = _python_calls(lambda k=keep_vars: zerockpt.state_dict(model, keep_vars=k))
        assert calls == [], calls
