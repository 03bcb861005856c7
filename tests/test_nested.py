"""Nested training state: save/load of dicts, lists and tuples with tensor and JSON leaves."""

from __future__ import annotations

import json
import math
import struct
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import zerockpt
from conftest import assert_same_state
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from zerockpt import FormatError
from zerockpt._args import save_options
from zerockpt.structure import flatten, is_flat_state_dict, unflatten


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_training_state_round_trip(tmp_path: Path) -> None:
    m = model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.8, 0.99))
    m(torch.randn(4, 6)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    state = {
        "model": m.state_dict(),
        "optim": opt.state_dict(),
        "sched": sched.state_dict(),
        "step": 1000,
        "rng": torch.get_rng_state(),
    }
    path = tmp_path / "ckpt.safetensors"
    zerockpt.save(state, path)
    loaded = zerockpt.load(path)
    assert_same_state(state, loaded)
    for mmap in (True, False):
        assert_same_state(state, zerockpt.load(path, mmap=mmap, verify=True))
    # Tensors are stored under their path; the model keeps its own key inside it.
    keys = zerockpt.open(path).keys()
    assert "model/0.weight" in keys and "optim/state/0/exp_avg" in keys and "rng" in keys
    # Other readers see an ordinary safetensors file.
    assert set(safetensors.torch.load_file(path)) == set(keys)


def test_leaves_keys_and_containers(tmp_path: Path) -> None:
    t = torch.arange(6.0).view(2, 3)
    state: Any = OrderedDict(
        [
            ("none", None),
            ("bools", [True, False]),
            ("ints", (0, -1, 2**63 - 1, -(2**63), 2**63, -(2**200), 10**400)),
            ("floats", [0.5, -0.0, math.inf, -math.inf, math.nan, 1e308, 5e-324]),
            ("text", "héllo/~.\u2603\0"),
            ("empty", [{}, [], (), OrderedDict()]),
            (0, "int key"),
            ("0", "str key that reads as int"),
            ("a.b/c~d", {"x.y": t, "": torch.randn(3, 2).t()}),
            ("~2", torch.tensor(7, dtype=torch.int16)),
            ("nested", [[[[{"deep": (t,)}]]]]),
        ]
    )
    path = tmp_path / "x.safetensors"
    zerockpt.save(state, path)
    loaded = zerockpt.load(path)
    assert_same_state(state, loaded)
    # Names are unambiguous and escaped: '/' joins, '~0' is '~', '~1' is '/', '~2' marks ints.
    assert set(zerockpt.open(path).keys()) == {
        "a.b~1c~0d/x.y",
        "a.b~1c~0d/",
        "~02",
        "nested/0/0/0/0/deep/0",
    }
    # The same tensor object twice is stored once and comes back as one tensor.
    assert loaded["nested"][0][0][0][0]["deep"][0] is loaded["a.b/c~d"]["x.y"]


def test_root_list_and_tuple(tmp_path: Path) -> None:
    for obj in ([torch.ones(2), 3], (torch.zeros(1), {"k": None})):
        path = tmp_path / "r.safetensors"
        zerockpt.save(obj, path)
        assert_same_state(obj, zerockpt.load(path))


def test_plain_state_dicts_keep_their_keys(tmp_path: Path) -> None:
    sd = model().state_dict()
    path = tmp_path / "m.safetensors"
    zerockpt.save(sd, path)
    with zerockpt.open(path) as f:
        assert f.keys() == list(sd)
        assert "zerockpt.structure" not in f.metadata()
    assert_same_state(sd, zerockpt.load(path))


class Opaque:
    pass


@pytest.mark.parametrize(
    ("obj", "words"),
    [
        ({"a": Opaque()}, r"obj\['a'\] is a test_nested.Opaque"),
        ({"a": [1, {2: 3j}]}, r"obj\['a'\]\[1\]\[2\] is a builtins.complex"),
        ({"opt": {"betas": range(2)}}, r"obj\['opt'\]\['betas'\] is a builtins.range"),
        ({1.5: torch.ones(1)}, "key 1.5 of type float"),
        ({True: 1}, "key True of type bool"),
        ({"n": __import__("numpy").zeros(2, dtype=object)}, r"obj\['n'\] is a numpy array"),
        (torch.ones(1), "got Tensor"),
    ],
)
def test_unsupported_objects_name_their_path(tmp_path: Path, obj: Any, words: str) -> None:
    path = tmp_path / "bad.safetensors"
    with pytest.raises(TypeError, match=words):
        zerockpt.save(obj, path)
    assert not path.exists()


def test_too_deep(tmp_path: Path) -> None:
    obj: Any = torch.ones(1)
    for _ in range(300):
        obj = [obj]
    with pytest.raises(ValueError, match="deeper than 256"):
        zerockpt.save(obj, tmp_path / "deep.safetensors")


def rewrite_structure(path: Path, structure: str) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["zerockpt.structure"] = structure
    header["__metadata__"].pop("zerockpt.crc32c")
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + n :])


@pytest.mark.parametrize(
    ("structure", "words"),
    [
        ("not json", "Expecting value"),
        ('{"version": 2, "root": null}', "expected {'version': 1"),
        ('{"version": 1, "root": {"tensor": "missing"}}', "tensor 'missing' is not in the file"),
        ('{"version": 1, "root": {"dict": [[1.5, 2]]}}', "bad dict item"),
        ('{"version": 1, "root": {"dict": [], "x": 1}}', "unexpected node"),
        ('{"version": 1, "root": {"int": "zz"}}', "bad int"),
        ('{"version": 1, "root": {"float": "NaN"}}', "unexpected node"),
        ('{"version": 1, "root": [1]}', "bare JSON list"),
        ('{"version": 1, "root": NaN}', "NaN is not JSON"),
        ('{"version": 1, "root": ' + '{"list": [' * 300 + "]}" * 300 + "}", "deeper than 256"),
        ("[" * 100000, "recursion"),
    ],
)
def test_crafted_structure_is_a_format_error(tmp_path: Path, structure: str, words: str) -> None:
    path = tmp_path / "s.safetensors"
    zerockpt.save({"a": [torch.ones(2)]}, path)
    rewrite_structure(path, structure)
    with pytest.raises(FormatError, match=words) as info:
        zerockpt.load(path)
    assert str(path) in str(info.value)


def train(
    make_opt: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    steps: int,
    resume_at: int | None,
    path: Path,
) -> list[torch.Tensor]:
    """Trains `steps` steps; with resume_at, checkpoints there and continues from the file in a
    fresh model and optimizer. Returns the final parameters."""
    m = model()
    opt = make_opt(list(m.parameters()))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
    data = torch.Generator().manual_seed(1)
    for step in range(steps):
        if step == resume_at:
            zerockpt.save(
                {"model": m.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict()},
                path,
            )
            state = zerockpt.load(path)
            m = model()
            opt = make_opt(list(m.parameters()))
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
            m.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
            sched.load_state_dict(state["sched"])
        x = torch.randn(8, 6, generator=data)
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()
        sched.step()
    return [p.detach().clone() for p in m.parameters()]


OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resume_is_bitwise_identical(tmp_path: Path, name: str) -> None:
    straight = train(OPTIMIZERS[name], 8, None, tmp_path / "unused")
    resumed = train(OPTIMIZERS[name], 8, 5, tmp_path / "ckpt.safetensors")
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)


# --- Whatever save commits loads back (issue 18, point 1) ---


class AttrDict(dict[Any, Any]):
    """An attribute-style dict: every attribute is an item (KeyError when missing)."""

    def __getattr__(self, key: str) -> Any:
        return self[key]


class PlainSubclass(dict[Any, Any]):
    pass


class OrderedSubclass(OrderedDict[Any, Any]):
    def items(self) -> Any:  # a lying override: what is stored is the real contents
        return iter(())


def test_reserved_header_name_is_escaped(tmp_path: Path) -> None:
    t = torch.arange(4.0)
    path = tmp_path / "m.safetensors"
    for state in ({"__metadata__": t}, {"__metadata__": t, "x.y": t + 1}, [{"__metadata__": t}]):
        zerockpt.save(state, path)
        assert_same_state(state, zerockpt.load(path))
    zerockpt.save({"__metadata__": t}, path)
    assert zerockpt.open(path).keys() == ["~3__metadata__"]
    assert set(safetensors.torch.load_file(path)) == {"~3__metadata__"}


def test_writer_refuses_the_reserved_name_itself(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match=r"'__metadata__'.*reserved"):
        options = save_options(durable=False)
        zerockpt._C.save({"__metadata__": torch.ones(1)}, str(path), options)
    assert not path.exists()


def test_mapping_subclasses_are_stored_as_plain_dicts(tmp_path: Path) -> None:
    t = torch.ones(2)
    attr = AttrDict(w=t, _metadata={"x": {"version": 2}})  # an item, not module versions
    plain = PlainSubclass(w=t)
    plain._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    ordered = OrderedSubclass([("b", 1), ("a", t)])
    path = tmp_path / "s.safetensors"
    for save in (zerockpt.save, lambda obj, p: zerockpt.save_async(obj, p).result()):
        save({"attr": attr, "plain": plain, "ordered": ordered, "flat": AttrDict(w=t)}, path)
        loaded = zerockpt.load(path)
        assert_same_state({"w": t, "_metadata": {"x": {"version": 2}}}, loaded["attr"])
        assert not hasattr(loaded["attr"], "_metadata")
        # A container with _metadata loads as an OrderedDict, as state_dict() returns.
        assert type(loaded["plain"]) is OrderedDict
        assert loaded["plain"]._metadata == {"": {"version": 1}}
        assert torch.equal(loaded["plain"]["w"], t)
        assert_same_state(OrderedDict([("b", 1), ("a", t)]), loaded["ordered"])
        assert_same_state({"w": t}, loaded["flat"])
    # A flat attribute-style state dict: no _metadata is read through __getattr__.
    zerockpt.save(AttrDict(w=t), path)
    assert_same_state({"w": t}, zerockpt.load(path))


def test_crafted_metadata_on_an_unordered_dict_loads(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    zerockpt.save({"a": [torch.ones(2)]}, path)
    rewrite_structure(path, '{"version": 1, "root": {"dict": [["k", 1]], "metadata": {"": {}}}}')
    loaded = zerockpt.load(path)
    assert type(loaded) is OrderedDict and loaded._metadata == {"": {}}


_KEYS = st.one_of(
    st.sampled_from(["__metadata__", "", "~", "~0", "~1", "~2", "~3", "/", "a/b", "1", "-1", "01"]),
    st.text(max_size=6),
    st.integers(min_value=-(2**70), max_value=2**70),
)
_SHARED = torch.arange(3, dtype=torch.int16)
_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.builds(torch.randn, st.integers(0, 3)),
    st.just(_SHARED),
)
_CONTAINERS = {
    "dict": dict,
    "ordered": OrderedDict,
    "attr": AttrDict,
    "plain": PlainSubclass,
    "lying": OrderedSubclass,
}


def _mapping(kind: str, items: list[tuple[Any, Any]], versions: bool) -> Any:
    out = _CONTAINERS[kind](items)
    if versions and kind != "dict":  # a plain dict takes no attributes
        out._metadata = OrderedDict({"": {"version": 1}})
    return out


def _nested(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.builds(
            _mapping,
            st.sampled_from(list(_CONTAINERS)),
            st.lists(st.tuples(_KEYS, children), max_size=4),
            st.booleans(),
        ),
    )


_STATES = _nested(st.recursive(_LEAVES, lambda children: _nested(children), max_leaves=12))


def _as_loaded(obj: Any) -> Any:
    """What load gives back for ``obj``: the documented rule for mapping subclasses."""
    if isinstance(obj, dict):
        versions = obj.__dict__.get("_metadata") if hasattr(obj, "__dict__") else None
        ordered = isinstance(obj, OrderedDict) or versions is not None
        out: Any = (OrderedDict if ordered else dict)(
            (k, _as_loaded(v)) for k, v in dict.items(obj)
        )
        if versions is not None:
            out._metadata = versions
        return out
    if isinstance(obj, list | tuple):
        return type(obj)(_as_loaded(v) for v in obj)
    return obj


@settings(max_examples=120, deadline=None)
@given(state=_STATES)
def test_planned_structure_always_decodes(state: Any) -> None:
    """The planned structure decodes through the loader's own code, for any nested state."""
    tensors, text = flatten(state)
    assert "__metadata__" not in tensors
    assert_same_state(_as_loaded(state), unflatten(tensors, text, "planned"))


@settings(max_examples=40, deadline=None)
@given(state=_STATES)
def test_what_save_commits_loads_back(tmp_path_factory: pytest.TempPathFactory, state: Any) -> None:
    path = tmp_path_factory.mktemp("prop") / "s.safetensors"
    zerockpt.save(state, path, durable=False)
    expected = _as_loaded(state)
    if is_flat_state_dict(state) and not hasattr(expected, "_metadata"):
        expected = dict(expected)  # a flat state dict loads as a dict of its tensors
    assert_same_state(expected, zerockpt.load(path))


@pytest.mark.parametrize(
    ("state", "metadata", "words"),
    [
        ({"\ud800": torch.ones(1)}, None, r"tensor name '\\ud800' cannot be stored"),
        ({"a": {"b\udfff": torch.ones(1)}}, None, r"tensor name 'a/b\\udfff' cannot be stored"),
        ({"t": torch.ones(1)}, {"k": "\ud800"}, r"metadata value for 'k' '\\ud800' cannot"),
        ({"t": torch.ones(1)}, {"\ud800": "v"}, r"metadata key '\\ud800' cannot be stored"),
    ],
)
def test_strings_without_utf8_form_are_refused_before_saving(
    tmp_path: Path, state: Any, metadata: dict[str, str] | None, words: str
) -> None:
    path = tmp_path / "s.safetensors"
    with pytest.raises(ValueError, match=words):
        zerockpt.save(state, path, metadata=metadata)
    with pytest.raises(ValueError, match=words):
        zerockpt.save_async(state, path, metadata=metadata)
    assert not path.exists()
    # Non-tensor leaves and keys go through JSON's escapes, which keep them.
    zerockpt.save({"x\ud800": "\udfff"}, path)
    assert zerockpt.load(path) == {"x\ud800": "\udfff"}
