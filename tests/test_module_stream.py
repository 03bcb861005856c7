"""save(module) read straight from the registries (csrc/python/module_stream.cpp), and
load_state_dict(module, path) straight into them: no Python tensor object per entry.

The oracle is the state-dict path: every file must be byte for byte the one that
``save(module.state_dict())`` writes (torch's own state dict), for modules that stream and for
those that must not (hooks, overrides, subclasses, odd registries), whose save falls back to the
state dict for the whole call.
"""

from __future__ import annotations

import io
import json
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zerockpt
from conftest import DispatchLog, run_python
from test_traversal import ZOO, Case, build, zoo_params
from torch import nn
from torch.nn.utils import parametrizations, spectral_norm
from zerockpt import _C

ModuleFactory = Callable[[], nn.Module]


def _tied() -> nn.Module:
    m = nn.Module()
    m.embed = nn.Embedding(10, 4)
    m.head = nn.Linear(4, 10, bias=False)
    m.head.weight = m.embed.weight
    return m


def _with_none_entries() -> nn.Module:
    m = nn.Linear(3, 2)
    m.register_parameter("missing", None)
    m.register_buffer("nothing", None)
    m.register_buffer("scratch", torch.ones(2), persistent=False)
    m.add_module("gone", None)
    m.register_buffer("count", torch.tensor(3))
    return m


def _shared() -> nn.Module:
    leaf = nn.Linear(2, 2)
    inner = nn.Module()
    inner.first = leaf
    inner.second = leaf
    inner.norm = nn.LayerNorm(2)
    outer = nn.Module()
    outer.x = inner
    outer.y = inner
    outer.z = nn.Sequential(leaf, inner)
    return outer


def _versions() -> nn.Module:
    class Versioned(nn.Module):
        _version = 7

        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

    m = nn.Sequential(Versioned(), Versioned(), nn.Linear(1, 1))
    m[1]._version = 3  # an instance's own version
    m[2]._version = -12
    return m


def _names() -> nn.Module:
    m = nn.Module()
    for i, name in enumerate(
        ["é", "😀", 'q"uote', "back\\slash", "tab\tnl\n", "ctl\x01\x7f", "中文"]
    ):
        child = nn.Linear(1, 1)
        child.register_buffer(f"b{name}", torch.full((1,), float(i)))
        m.add_module(name, child)
    return m


def _odd_tensors() -> nn.Module:
    m = nn.Module()
    m.register_buffer("scalar", torch.tensor(2.5))
    m.register_buffer("empty", torch.empty(0, 3))
    m.register_buffer("flags", torch.tensor([True, False]))
    m.register_buffer("bf16", torch.arange(6, dtype=torch.bfloat16).reshape(2, 3))
    m.register_buffer("cplx", torch.randn(3, dtype=torch.complex64))
    m.register_buffer("strided", torch.arange(12.0).reshape(3, 4).t())  # not contiguous
    base = torch.arange(10.0)
    m.register_buffer("whole", base)
    m.register_buffer("alias", base)  # the same view: stored once
    m.conj = nn.Parameter(torch.randn(2, dtype=torch.complex64).conj(), requires_grad=False)
    return m


STREAMING: dict[str, ModuleFactory] = {
    "linear": lambda: nn.Linear(4, 3),
    "empty": nn.Module,
    "empty tree": lambda: nn.Sequential(nn.ReLU(), nn.Sequential(nn.Dropout(), nn.Identity())),
    "norms": lambda: nn.Sequential(
        nn.LayerNorm(4),
        nn.BatchNorm1d(4),
        nn.GroupNorm(2, 4),
        nn.InstanceNorm1d(4, affine=True, track_running_stats=True),
        nn.RMSNorm(4),
    ),
    "conv": lambda: nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ConvTranspose1d(2, 2, 2)
    ),
    "recurrent": lambda: nn.ModuleDict({"lstm": nn.LSTM(3, 4, 2), "gru": nn.GRU(3, 2)}),
    "attention": lambda: nn.MultiheadAttention(4, 2, add_bias_kv=True),
    "transformer": lambda: nn.TransformerEncoderLayer(8, 2, dim_feedforward=16),
    "embedding bag": lambda: nn.ModuleList([nn.EmbeddingBag(5, 3), nn.Bilinear(2, 3, 4)]),
    "tied": _tied,
    "none entries": _with_none_entries,
    "shared modules": _shared,
    "versions": _versions,
    "names": _names,
    "odd tensors": _odd_tensors,
    "load hooks only": lambda: _with_load_hooks(nn.Linear(2, 2)),
    "parametrized": lambda: nn.Sequential(
        parametrizations.weight_norm(nn.Linear(3, 3)), parametrizations.orthogonal(nn.Linear(3, 3))
    ),
    "forward hooks": lambda: _forward_hooked(),
    "fx graph module": lambda: torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU())),
}


def _forward_hooked() -> nn.Module:
    m = nn.Linear(2, 2)
    m.register_forward_pre_hook(lambda *args: None)
    m.register_forward_hook(lambda *args: None)
    return nn.Sequential(m)


def _with_load_hooks(m: nn.Module) -> nn.Module:
    m.register_load_state_dict_pre_hook(lambda *args: None)
    m.register_load_state_dict_post_hook(lambda *args: None)
    return m


def oracle_bytes(m: nn.Module, **kwargs: Any) -> bytes:
    """What save(module) wrote before it streamed: torch's own state dict, saved."""
    return zerockpt.save_bytes(m.state_dict(), **kwargs)


@pytest.mark.parametrize("kind", list(STREAMING))
def test_streamed_save_is_the_state_dict_file(kind: str) -> None:
    m = build(STREAMING[kind], seed=0)
    assert _C.module_tensors(m) is not None, "this tree should stream"
    expected = oracle_bytes(m)
    assert zerockpt.save_bytes(m) == expected
    assert zerockpt.save_bytes(zerockpt.state_dict(m)) == expected
    assert zerockpt.save_bytes(m, metadata={"step": "7", "ünï": "cödé"}) == oracle_bytes(
        m, metadata={"step": "7", "ünï": "cödé"}
    )
    assert zerockpt.save_bytes(m, checksums=False) == oracle_bytes(m, checksums=False)


@pytest.mark.parametrize("case", zoo_params(ZOO))
def test_the_traversal_zoo_saves_as_its_state_dict(case: Case) -> None:
    """Every model of the state_dict oracle tests: streamed or not, the same file (or error)."""
    m = build(case.make, seed=0)
    try:
        expected: object = oracle_bytes(m)
    except Exception as e:  # unsavable state (meta, overlapping views): the same error
        expected = (type(e), str(e))
        assert _error_of(lambda: zerockpt.save_bytes(m)) == expected
        return
    assert zerockpt.save_bytes(m) == expected


def test_streamed_metadata_is_json_dumps_of_the_state_dict_metadata() -> None:
    for kind, make in STREAMING.items():
        m = make()
        streamed = _C.module_tensors(m)
        assert streamed is not None, kind
        metadata = m.state_dict()._metadata  # type: ignore[attr-defined]
        assert streamed.metadata == json.dumps({k: dict(v) for k, v in metadata.items()}), kind
        assert len(streamed) == len(m.state_dict()), kind


def test_streamed_entries_as_a_state_dict() -> None:
    m = _tied()
    streamed = _C.module_tensors(m)
    assert streamed is not None
    flat = streamed.state_dict()
    expected = zerockpt.state_dict(m)
    assert list(flat) == list(expected)
    for key, value in expected.items():
        assert torch.equal(flat[key], value)
        assert not flat[key].requires_grad
        assert flat[key].data_ptr() == value.data_ptr()


class _SubTensor(torch.Tensor):
    pass


class _OwnStateDict(nn.Linear):
    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        out = super().state_dict(*args, **kwargs)
        out["extra"] = torch.zeros(1)
        return out


class _OwnSave(nn.Linear):
    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "doubled"] = self.weight.detach() * 2


class _ExtraTensor(nn.Linear):
    def get_extra_state(self) -> Any:
        return torch.arange(3)

    def set_extra_state(self, state: Any) -> None:
        pass


class _ExtraDict(nn.Linear):
    def get_extra_state(self) -> Any:
        return {"step": 3, "name": "x"}

    def set_extra_state(self, state: Any) -> None:
        pass


class _VersionNone(nn.Linear):
    _version = None  # type: ignore[assignment]


class _VersionProperty(nn.Linear):
    @property
    def _version(self) -> int:  # type: ignore[override]
        return 5


class _BigVersion(nn.Linear):
    _version = 2**70


class _BoolVersion(nn.Linear):
    _version = True


def _deep(depth: int) -> nn.Module:
    root = nn.Linear(1, 1)
    node = root
    for _ in range(depth):
        child = nn.Linear(1, 1)
        node.add_module("c", child)
        node = child
    return root


def _nested(child: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.LayerNorm(2), child))


def _pre_hooked() -> nn.Module:
    m = nn.Linear(2, 2)
    m.register_state_dict_pre_hook(lambda module, prefix, keep_vars: None)
    return _nested(m)


def _post_hooked() -> nn.Module:
    m = nn.Linear(2, 2)

    def hook(module: nn.Module, state: Any, prefix: str, local_metadata: Any) -> None:
        state[prefix + "added"] = torch.ones(2)
        local_metadata["tag"] = 1

    m.register_state_dict_post_hook(hook)
    return _nested(m)


def _legacy_hooked() -> nn.Module:
    m = nn.Linear(2, 2)

    def hook(module: nn.Module, state: Any, prefix: str, local_metadata: Any) -> Any:
        out = OrderedDict((k, v) for k, v in state.items() if not k.endswith("bias"))
        out._metadata = state._metadata  # type: ignore[attr-defined]
        return out

    m._register_state_dict_hook(hook)
    return nn.Sequential(m, nn.Linear(2, 1))


def _instance_override() -> nn.Module:
    m = nn.Linear(2, 2)
    original = m.state_dict
    m.state_dict = lambda *a, **k: original(*a, **k)  # type: ignore[method-assign]
    return _nested(m)


def _instance_save_override() -> nn.Module:
    m = nn.Linear(2, 2)
    original = m._save_to_state_dict

    def save(destination: Any, prefix: str, keep_vars: bool) -> None:
        original(destination, prefix, keep_vars)
        destination[prefix + "more"] = torch.zeros(1)

    m._save_to_state_dict = save  # type: ignore[method-assign]
    return _nested(m)


def _subclass_buffer() -> nn.Module:
    m = nn.Linear(2, 2)
    m.register_buffer("sub", torch.ones(3).as_subclass(_SubTensor))
    return _nested(m)


def _subclass_parameter() -> nn.Module:
    m = nn.Linear(2, 2)
    m.weight = nn.Parameter(torch.ones(2, 2).as_subclass(_SubTensor))
    return _nested(m)


def _dotted_child() -> nn.Module:
    m = nn.Module()
    m.a = nn.Module()
    m.a.b = nn.Linear(1, 1)
    m._modules["a.b"] = nn.Linear(1, 1)  # the same keys as a.b's
    return m


def _dotted_parameter() -> nn.Module:
    m = nn.Module()
    m.a = nn.Linear(1, 1)
    m._parameters["a.weight"] = nn.Parameter(torch.full((1, 1), 9.0))
    return m


def _empty_name() -> nn.Module:
    m = nn.Module()
    m._modules[""] = nn.Linear(1, 1)
    m._parameters[""] = nn.Parameter(torch.ones(1))
    return m


def _buffer_named_as_parameter() -> nn.Module:
    m = nn.Linear(2, 2)
    m._buffers["weight"] = torch.full((2, 2), 5.0)
    return _nested(m)


def _metadata_name() -> nn.Module:
    m = nn.Linear(2, 2)
    m.register_parameter("__metadata__", nn.Parameter(torch.ones(1)))
    return m


def _str_subclass_name() -> nn.Module:
    class Name(str):
        pass

    m = nn.Module()
    m._parameters[Name("w")] = nn.Parameter(torch.ones(2))
    return m


def _ordered_registry() -> nn.Module:
    m = nn.Linear(2, 2)
    m._parameters = OrderedDict(m._parameters)
    m._parameters.move_to_end("weight")  # the dict's own order stays weight, bias
    return _nested(m)


class _SetWithoutScratch(set):  # type: ignore[type-arg]
    def __contains__(self, name: object) -> bool:
        return name != "scratch" and super().__contains__(name)


def _set_subclass() -> nn.Module:
    m = nn.Linear(2, 2)
    m.register_buffer("scratch", torch.ones(2), persistent=False)
    m.register_buffer("other", torch.zeros(2), persistent=False)
    m._non_persistent_buffers_set = _SetWithoutScratch(m._non_persistent_buffers_set)
    return _nested(m)


def _nested_buffer() -> nn.Module:
    m = nn.Linear(2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "prototype stage"
        nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    m.register_buffer("nested", nested)
    return m


FALLBACK: dict[str, ModuleFactory] = {
    "state_dict pre-hook": _pre_hooked,
    "state_dict post-hook": _post_hooked,
    "legacy state_dict hook": _legacy_hooked,
    "overridden state_dict": lambda: _nested(_OwnStateDict(2, 2)),
    "overridden _save_to_state_dict": lambda: _nested(_OwnSave(2, 2)),
    "extra state tensor": lambda: _nested(_ExtraTensor(2, 2)),
    "extra state dict": lambda: _nested(_ExtraDict(2, 2)),
    "instance state_dict": _instance_override,
    "instance _save_to_state_dict": _instance_save_override,
    "subclass buffer": _subclass_buffer,
    "subclass parameter": _subclass_parameter,
    "version None": lambda: _nested(_VersionNone(2, 2)),
    "version property": lambda: _nested(_VersionProperty(2, 2)),
    "version too big": lambda: _nested(_BigVersion(2, 2)),
    "version bool": lambda: _nested(_BoolVersion(2, 2)),
    "dotted child": _dotted_child,
    "dotted parameter": _dotted_parameter,
    "empty name": _empty_name,
    "buffer named as parameter": _buffer_named_as_parameter,
    "root __metadata__": _metadata_name,
    "str subclass name": _str_subclass_name,
    "deep tree": lambda: _deep(300),
    "OrderedDict registry": _ordered_registry,
    "set subclass registry": _set_subclass,
    "spectral norm (state_dict hook)": lambda: _nested(spectral_norm(nn.Linear(3, 3))),
    "scripted": lambda: torch.jit.script(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))),
    "lazy (uninitialized parameter)": lambda: _nested(nn.LazyLinear(3)),
}


@pytest.mark.parametrize("kind", list(FALLBACK))
def test_trees_with_python_customisation_save_their_state_dict(kind: str) -> None:
    m = build(FALLBACK[kind], seed=0)
    assert _C.module_tensors(m) is None, "this tree must take the state-dict path"
    assert zerockpt.save_bytes(m) == oracle_bytes(m)


def _error_of(fn: Callable[[], object]) -> tuple[type[BaseException], str]:
    with pytest.raises(Exception) as info:
        fn()
    return info.type, str(info.value)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Linear(2, 2, device="meta"),
        _nested_buffer,
        lambda: _overlapping(),
        lambda: _lone_surrogate(),
    ],
    ids=["meta", "nested tensor", "overlapping views", "lone surrogate"],
)
def test_unsavable_modules_raise_what_the_state_dict_path_raises(make: ModuleFactory) -> None:
    m = make()
    expected = _error_of(lambda: zerockpt.save_bytes(m.state_dict()))
    assert _error_of(lambda: zerockpt.save_bytes(m)) == expected


def _overlapping() -> nn.Module:
    base = torch.arange(8.0)
    m = nn.Module()
    m.register_buffer("low", base[:5])
    m.register_buffer("high", base[3:])
    return m


def _lone_surrogate() -> nn.Module:
    m = nn.Module()
    m.add_module("odd\ud800", nn.Linear(1, 1))
    return m


def test_non_str_names_raise_what_torch_raises() -> None:
    m = nn.Module()
    m._parameters[3] = nn.Parameter(torch.ones(1))  # type: ignore[index]
    assert _C.module_tensors(m) is None
    assert _error_of(lambda: zerockpt.save_bytes(m)) == _error_of(m.state_dict)


_CYCLE = """
import torch, zerockpt
from torch import nn
m = nn.Sequential(nn.Linear(1, 1))
m[0].add_module("loop", m)  # a cycle: torch's recursion ends in RecursionError
for name, call in [
    ("torch state_dict", m.state_dict),
    ("torch load_state_dict", lambda: m.load_state_dict({})),
    ("state_dict", lambda: zerockpt.state_dict(m)),
    ("save", lambda: zerockpt.save_bytes(m)),
    ("load_state_dict", lambda: zerockpt.load_state_dict(m, {})),
]:
    try:
        call()
    except RecursionError as e:
        print(name, e)
"""


def test_cyclic_modules_raise_recursion_error_as_torch_does() -> None:
    result = run_python(_CYCLE)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert [line.split(" maximum")[0] for line in lines] == [
        "torch state_dict",
        "torch load_state_dict",
        "state_dict",
        "save",
        "load_state_dict",
    ]
    assert len({line.split(" maximum")[1] for line in lines}) == 1  # the same message


def test_deep_trees_below_the_recursion_limit(tmp_path: Path) -> None:
    m = _deep(500)
    assert _C.module_tensors(m) is None  # deeper than the walk streams
    assert zerockpt.save_bytes(m) == oracle_bytes(m)
    zerockpt.save(m, tmp_path / "m.safetensors")
    target = _deep(500)
    zerockpt.load_state_dict(target, tmp_path / "m.safetensors")
    assert zerockpt.save_bytes(target) == oracle_bytes(m)


def test_modes_take_the_state_dict_path() -> None:
    m = _shared()
    expected = oracle_bytes(m)
    with torch.inference_mode():
        assert _C.module_tensors(m) is None
        assert zerockpt.save_bytes(m) == expected
    with DispatchLog() as mode:
        assert _C.module_tensors(m) is None
        zerockpt.state_dict(m)
        seen = list(mode.ops)
        mode.ops.clear()
        zerockpt.save(m, io.BytesIO())
        assert mode.ops[: len(seen)] == seen  # the mode sees the state dict's detach calls


# --- Every entry point that takes a module ---------------------------------------------------


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(_shared(), _tied(), nn.BatchNorm1d(2), _names())
    assert _C.module_tensors(m) is not None
    return m


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_save_to_a_path(model: nn.Module, tmp_path: Path) -> None:
    zerockpt.save(model, tmp_path / "a.safetensors")
    zerockpt.save(model.state_dict(), tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    loaded = zerockpt.load(tmp_path / "a.safetensors")
    assert loaded._metadata == model.state_dict()._metadata  # type: ignore[attr-defined]


def test_save_to_file_objects(model: nn.Module, tmp_path: Path) -> None:
    expected = oracle_bytes(model)
    buffer = io.BytesIO(b"head")
    buffer.seek(4)
    zerockpt.save(model, buffer)
    assert buffer.getvalue() == b"head" + expected
    with open(tmp_path / "f", "wb") as f:
        zerockpt.save(model, f)
    assert (tmp_path / "f").read_bytes() == expected

    class WriteOnly(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b: Any) -> int:
            self.data += bytes(b)
            return len(b)

    sink = WriteOnly()
    zerockpt.save(model, sink)
    assert bytes(sink.data) == expected


def test_save_async(model: nn.Module, tmp_path: Path) -> None:
    zerockpt.save_async(model, tmp_path / "a.safetensors").result()
    assert (tmp_path / "a.safetensors").read_bytes() == oracle_bytes(model)


def test_checkpointer(model: nn.Module, tmp_path: Path) -> None:
    for async_save in (False, True):
        streamed = zerockpt.Checkpointer(tmp_path / f"s{async_save}")
        oracle = zerockpt.Checkpointer(tmp_path / f"o{async_save}")
        streamed.save(1, model, async_save=async_save).result()
        oracle.save(1, model.state_dict(), async_save=async_save).result()
        assert _files(tmp_path / f"s{async_save}") == _files(tmp_path / f"o{async_save}")


def test_sharded_save(model: nn.Module, tmp_path: Path) -> None:
    zerockpt.save(model, tmp_path / "a", max_shard_size=200)
    zerockpt.save(model.state_dict(), tmp_path / "b", max_shard_size=200)
    streamed, expected = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(streamed) > 2

    def checkpoint_id(files: dict[str, bytes]) -> bytes:
        index = json.loads(files["model.safetensors.index.json"])
        return str(index["metadata"]["zerockpt.checkpoint_id"]).encode()

    # Each sharded save has an id of its own; everything else is the same.
    ids = checkpoint_id(streamed), checkpoint_id(expected)
    assert {k: v.replace(*ids) for k, v in streamed.items()} == expected


def test_staged_save(model: nn.Module) -> None:
    _C._stage_host_tensors(True)  # the device pipeline, with CPU tensors
    try:
        assert zerockpt.save_bytes(model) == oracle_bytes(model)
    finally:
        _C._stage_host_tensors(False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_module(model: nn.Module, tmp_path: Path) -> None:
    model.cuda()
    assert _C.module_tensors(model) is not None
    assert zerockpt.save_bytes(model) == oracle_bytes(model)
    zerockpt.save_async(model, tmp_path / "a.safetensors").result()
    assert (tmp_path / "a.safetensors").read_bytes() == oracle_bytes(model)


# --- No Python tensor object per entry -------------------------------------------------------


def _experts(n: int = 64) -> nn.Module:
    """Many modules and tensors, as an MoE has."""
    layer = nn.Module()
    layer.norm = nn.LayerNorm(4)
    layer.experts = nn.ModuleList(
        nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)) for _ in range(n)
    )
    return nn.Sequential(layer, nn.BatchNorm1d(4))


def _count(fn: Callable[[], object]) -> int:
    _, count = _C._count_tensor_objects(fn)
    return int(count)


@pytest.fixture
def experts() -> Iterator[tuple[nn.Module, int]]:
    m = _experts()
    yield m, len(m.state_dict())


def test_the_counter_sees_tensor_objects(experts: tuple[nn.Module, int]) -> None:
    m, n = experts
    assert _count(lambda: zerockpt.state_dict(m)) >= n
    assert _count(lambda: zerockpt.save_bytes(m.state_dict())) >= n
    hooked = _experts()
    hooked.register_state_dict_pre_hook(lambda *args: None)
    assert _count(lambda: zerockpt.save_bytes(hooked)) >= n  # the fallback makes them


def test_save_module_makes_no_tensor_object_per_entry(
    experts: tuple[nn.Module, int], tmp_path: Path
) -> None:
    m, n = experts
    assert n > 100
    calls: dict[str, Callable[[], object]] = {
        "save": lambda: zerockpt.save(m, tmp_path / "a.safetensors"),
        "save_bytes": lambda: zerockpt.save_bytes(m),
        "BytesIO": lambda: zerockpt.save(m, io.BytesIO()),
        "save_async": lambda: zerockpt.save_async(m, tmp_path / "b.safetensors").result(),
        "Checkpointer": lambda: zerockpt.Checkpointer(tmp_path / "c").save(1, m),
    }
    for name, call in calls.items():
        call()  # first calls may create objects once (imports, caches)
        assert _count(call) == 0, name


def test_load_state_dict_from_a_file_makes_no_tensor_object_per_entry(
    experts: tuple[nn.Module, int], tmp_path: Path
) -> None:
    m, n = experts
    path = tmp_path / "m.safetensors"
    zerockpt.save(m, path)
    target = _experts()
    for p in target.parameters():
        p.data.zero_()
    zerockpt.load_state_dict(target, path)
    assert _count(lambda: zerockpt.load_state_dict(target, path)) == 0
    assert _count(lambda: zerockpt.load_state_dict(target, path, strict=False)) == 0
    for key, value in m.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    assert _count(lambda: zerockpt.load_state_dict(target, zerockpt.load(path))) >= n


@pytest.mark.parametrize("make", [_ordered_registry, _set_subclass], ids=["OrderedDict", "set"])
def test_registries_of_other_types_load_as_torch_loads(make: ModuleFactory) -> None:
    """Registries are read through their own methods (items(), `in`), as torch reads them."""
    source = build(make, seed=1).state_dict()
    source["1.1.scratch"] = torch.full((2,), 7.0)
    ours, theirs = build(make, seed=0), build(make, seed=0)
    got = zerockpt.load_state_dict(ours, source, strict=False)
    expected = theirs.load_state_dict(source, strict=False)
    assert got == expected
    assert zerockpt.save_bytes(ours) == oracle_bytes(theirs)
