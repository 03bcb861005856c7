"""zerockpt.state_dict against torch's nn.Module.state_dict, torch being the oracle.

Also defines the module zoo and the comparison helpers that test_traversal_load.py shares.
state_dict() does not change a module, so both walks run on the same model: that lets the
tests check that zerockpt's values share storage and version counter with the parameters
exactly as torch's do. Tests with hooks that record calls build two identically seeded models.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import zerockpt
from conftest import random_tensor
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize, prune

# ---------------------------------------------------------------------------------------------
# The zoo
# ---------------------------------------------------------------------------------------------

ALL_DTYPES: list[torch.dtype] = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]
# Dtypes a Parameter (requires_grad=True) can have; the others are buffers only.
PARAM_DTYPES = {torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64}


@dataclass(frozen=True)
class Case:
    """One zoo entry: the model to test, and the model whose state is loaded into it."""

    name: str
    make: Callable[[], nn.Module]
    make_src: Callable[[], nn.Module] | None = None  # default: make
    file: bool = True  # the source state dict can be saved to a file
    load: bool = True  # part of the load zoo

    def source(self) -> Callable[[], nn.Module]:
        return self.make if self.make_src is None else self.make_src


def build(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``factory()`` under ``torch.manual_seed(seed)``, construction warnings silenced."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return factory()


def _seeded(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Random bytes (NaN payloads included) from a seed drawn from torch's global RNG."""
    return random_tensor(shape, dtype, seed=int(torch.randint(0, 2**31 - 1, ()).item()))


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.randn(1))


class Node(nn.Module):
    """One link of a deep chain: a parameter, a buffer, and (later) a child."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.randn(2))
        self.register_buffer("n", torch.randint(0, 100, ()))


def deep_chain(depth: int = 200) -> nn.Module:
    root = Node()
    cur = root
    for _ in range(depth - 1):
        nxt = Node()
        cur.child = nxt
        cur = nxt
    return root


class WideParams(nn.Module):
    def __init__(self, n: int = 2000) -> None:
        super().__init__()
        for i in range(n):
            self.register_parameter(f"p{i}", nn.Parameter(torch.randn(2)))


class TiedLM(nn.Module):
    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False)
        if tie:
            self.head.weight = self.embed.weight


class WithNonPersistent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("dropped", torch.randn(3), persistent=False)
        self.register_buffer("kept", torch.randn(3))
        self.lin = nn.Linear(2, 2)
        self.lin.register_buffer("cache", torch.randn(2), persistent=False)


class WithNone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_parameter("p_none", None)
        self.w = nn.Parameter(torch.randn(2, 2))
        self.register_buffer("b_none", None)
        self.register_buffer("b", torch.randn(2))
        self.register_module("c_none", None)
        self.c = nn.Linear(2, 2)


class Symmetric(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.triu() + x.triu(1).mT


def parametrized() -> nn.Module:
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    parametrize.register_parametrization(m[0], "weight", Symmetric())
    return m


class Dtypes(nn.Module):
    """Every dtype as a buffer (random bytes: NaN payloads); float dtypes as parameters too."""

    def __init__(self) -> None:
        super().__init__()
        for dt in ALL_DTYPES:
            tag = str(dt).removeprefix("torch.")
            if dt in PARAM_DTYPES:
                self.register_parameter(f"p_{tag}", nn.Parameter(_seeded(dt, (3, 4))))
            self.register_buffer(f"b_{tag}", _seeded(dt, (2, 3)))


class Shapes(nn.Module):
    """0-dim, one-element and empty parameters and buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.scalar = nn.Parameter(torch.randn(()))
        self.empty = nn.Parameter(torch.randn(0, 3))
        self.one = nn.Parameter(torch.randn(1))
        self.register_buffer("int_scalar", torch.randint(0, 9, ()))
        self.register_buffer("empty_half", torch.randn(2, 0, 4).half())
        self.register_buffer("bool_scalar", torch.tensor(bool(torch.randint(0, 2, ()))))


class Strided(nn.Module):
    """Non-contiguous parameters and buffers: transposed, channels_last, sliced, conj."""

    def __init__(self) -> None:
        super().__init__()
        self.t = nn.Parameter(torch.randn(4, 6).t())
        self.cl = nn.Parameter(
            torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
        )
        self.sliced = nn.Parameter(torch.randn(5, 8)[1:, ::2])
        self.conj = nn.Parameter(torch.randn(3, dtype=torch.complex64).conj())
        self.register_buffer("tb", torch.randn(3, 5, dtype=torch.float64).t())


class Overlap(nn.Module):
    """Parameters and a buffer that are overlapping views of one storage."""

    def __init__(self, shared: bool = True) -> None:
        super().__init__()
        flat = torch.randn(12)
        if shared:
            self.a = nn.Parameter(flat[0:6].view(2, 3))
            self.b = nn.Parameter(flat[3:9].view(3, 2))
            self.register_buffer("c", flat[6:12])
        else:
            self.a = nn.Parameter(flat[0:6].clone().view(2, 3))
            self.b = nn.Parameter(torch.randn(3, 2))
            self.register_buffer("c", torch.randn(6))


class Expanded(nn.Module):
    """A buffer whose elements share memory (stride 0): copying into it fails in torch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2))
        self.register_buffer("e", torch.randn(3, 1).expand(3, 4))


class Tagged(torch.Tensor):
    """A tensor subclass (torch's code handles modules holding them)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> Tagged:
        out = self.detach().clone().as_subclass(Tagged)
        memo[id(self)] = out
        return out


class WithSubclass(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 2))
        self.register_buffer("tagged", torch.randn(3).as_subclass(Tagged))


class ExtraState(nn.Module):
    """get_extra_state / set_extra_state with a non-tensor (dict) state."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.state = {"step": int(torch.randint(0, 100, ()).item()), "name": "x"}

    def get_extra_state(self) -> Any:
        return dict(self.state)

    def set_extra_state(self, state: Any) -> None:
        self.state = dict(state)


class TensorExtraState(nn.Module):
    """Extra state that is a tensor (so it can go to a file)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2))
        self.extra = torch.randn(3)

    def get_extra_state(self) -> Any:
        return self.extra

    def set_extra_state(self, state: Any) -> None:
        self.extra = state


class GetterOnly(nn.Module):
    """get_extra_state without set_extra_state: loading reports _extra_state as unexpected."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2))

    def get_extra_state(self) -> Any:
        return torch.arange(3)


def bn(cls: type[nn.Module], *args: Any, shape: tuple[int, ...], **kwargs: Any) -> nn.Module:
    """A batch norm whose running stats moved (one training forward)."""
    m = cls(*args, **kwargs)
    m.train()
    with torch.no_grad():
        m(torch.randn(shape) * 3 + 1)
    return m


def lazy(materialise: bool) -> nn.Module:
    m = nn.Sequential(nn.LazyLinear(3), nn.ReLU(), nn.Linear(3, 2))
    if materialise:
        m(torch.randn(2, 5))
    return m


def inference_model() -> nn.Module:
    with torch.inference_mode():
        return cpu_model_for_inference()


def cpu_model_for_inference() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def meta_model() -> nn.Module:
    with torch.device("meta"):
        return cpu_model_for_meta()


def cpu_model_for_meta() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 3, bias=False))


class Unicode(nn.Module):
    """Non-ASCII parameter, buffer and child names."""

    def __init__(self) -> None:
        super().__init__()
        self.register_parameter("poids_é", nn.Parameter(torch.randn(2)))
        self.register_buffer("计数", torch.randint(0, 9, (2,)))
        self.add_module("子", nn.Linear(2, 1))
        self.add_module("ü", nn.Sequential(nn.Linear(1, 1)))


def shared_child(shared: bool = True) -> nn.Module:
    """One Linear registered under two names (loaded twice by torch, listed twice)."""
    lin = nn.Linear(3, 3)
    return nn.Sequential(lin, nn.ReLU(), lin if shared else nn.Linear(3, 3))


def pruned() -> nn.Module:
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    prune.l1_unstructured(m[0], "weight", amount=0.5)
    return m


def transformer() -> nn.Module:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


ZOO: list[Case] = [
    Case("linear", lambda: nn.Linear(4, 3)),
    Case("linear_nobias", lambda: nn.Linear(4, 3, bias=False)),
    Case("conv2d", lambda: nn.Conv2d(3, 4, 3)),
    Case(
        "conv2d_channels_last",
        lambda: nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last),
        make_src=lambda: nn.Conv2d(3, 4, 3),
    ),
    Case("bn1d", lambda: bn(nn.BatchNorm1d, 4, shape=(8, 4))),
    Case("bn2d", lambda: bn(nn.BatchNorm2d, 3, shape=(4, 3, 5, 5))),
    Case("bn2d_noaffine", lambda: bn(nn.BatchNorm2d, 3, affine=False, shape=(4, 3, 2, 2))),
    Case(
        "bn2d_nostats",
        lambda: bn(nn.BatchNorm2d, 3, track_running_stats=False, shape=(4, 3, 2, 2)),
    ),
    Case("layernorm", lambda: nn.LayerNorm([3, 4])),
    Case("tied_embedding", TiedLM),
    Case("tied_dst_untied_src", TiedLM, make_src=lambda: TiedLM(tie=False)),
    Case("lstm", lambda: nn.LSTM(4, 5, num_layers=2, bidirectional=True)),
    Case("lstm_proj", lambda: nn.LSTM(4, 6, proj_size=3)),
    Case("gru", lambda: nn.GRU(4, 5, batch_first=True)),
    Case("mha", lambda: nn.MultiheadAttention(8, 2)),
    Case("mha_kdim_vdim", lambda: nn.MultiheadAttention(8, 2, kdim=4, vdim=6)),
    Case("transformer_encoder", transformer),
    Case(
        "module_list",
        lambda: nn.ModuleList([nn.Linear(3, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 2))]),
    ),
    Case("module_dict", lambda: nn.ModuleDict({"b": nn.Linear(2, 2), "a": nn.Conv1d(2, 2, 1)})),
    Case(
        "parameter_list",
        lambda: nn.ParameterList([nn.Parameter(torch.randn(2)), torch.randn(3, 3)]),
    ),
    Case(
        "parameter_dict",
        lambda: nn.ParameterDict({"z": nn.Parameter(torch.randn(2)), "a": torch.randn(1, 2)}),
    ),
    Case("non_persistent", WithNonPersistent),
    Case("none_entries", WithNone),
    Case("parametrize", parametrized),
    Case(
        "weight_norm",
        lambda: nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))),
    ),
    Case("weight_norm_old", lambda: nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 3)))),
    Case("spectral_norm_old", lambda: nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 3)))),
    Case(
        "spectral_norm",
        lambda: nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(4, 3))),
    ),
    Case("pruned", pruned),
    Case(
        "instancenorm",
        lambda: bn(nn.InstanceNorm1d, 3, track_running_stats=True, affine=True, shape=(2, 3, 5)),
    ),
    Case("groupnorm", lambda: nn.GroupNorm(2, 4)),
    Case("unicode_names", Unicode),
    Case("scripted", lambda: torch.jit.script(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))),
    Case(
        "scripted_child",
        lambda: nn.Sequential(nn.Linear(3, 3), torch.jit.script(nn.Linear(3, 2)), nn.Linear(2, 2)),
    ),
    Case("shared_child", shared_child, make_src=lambda: shared_child(shared=False)),
    Case("data_parallel", lambda: nn.DataParallel(nn.Sequential(nn.Linear(3, 2)))),
    Case("lazy", lambda: lazy(False), make_src=lambda: lazy(True)),
    Case("lazy_materialised", lambda: lazy(True)),
    Case("deep_chain_200", deep_chain),
    # 1,000 siblings: torch's load_state_dict, the oracle, is quadratic in them (each child
    # filters the whole state dict), so 2,000 cost 4x the time and checked nothing more.
    Case("wide_modules_1000", lambda: nn.ModuleList(Scale() for _ in range(1000))),
    Case("wide_params_2000", WideParams),
    Case("dtypes", Dtypes),
    Case("shapes", Shapes),
    Case("strided", Strided),
    Case("overlap", Overlap, make_src=lambda: Overlap(shared=False)),
    Case("expanded", Expanded),
    Case("tensor_subclass", WithSubclass),
    Case("inference", inference_model, make_src=cpu_model_for_inference),
    Case("meta", meta_model, make_src=cpu_model_for_meta),
    Case("extra_state", ExtraState, file=False),
    Case("extra_state_tensor", TensorExtraState),
    Case("extra_getter_only", GetterOnly),
]
LOAD_ZOO: list[Case] = [c for c in ZOO if c.load]


def zoo_params(cases: list[Case]) -> list[Any]:
    return [pytest.param(c, id=c.name) for c in cases]


# ---------------------------------------------------------------------------------------------
# Comparison helpers
# ---------------------------------------------------------------------------------------------


def tensor_bytes(t: torch.Tensor) -> bytes | None:
    """The logical bytes in row-major order (NaN payloads kept), or None without data."""
    if t.is_meta or is_lazy(t):
        return None
    if t.numel() == 0:
        return b""
    dense = torch.empty(t.shape, dtype=t.dtype)
    with torch.no_grad():
        dense.copy_(t.detach().resolve_conj().resolve_neg())
    return dense.reshape(-1).view(torch.uint8).numpy().tobytes()


def storage_bytes(t: torch.Tensor) -> bytes | None:
    """Every byte of the tensor's storage (what other views of it see)."""
    if t.is_meta or is_lazy(t) or t.is_inference():
        return None
    raw = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
    return raw.numpy().tobytes()


def storage_ptr(t: torch.Tensor) -> int | None:
    if is_lazy(t):
        return None
    return t.untyped_storage().data_ptr()


def version(t: torch.Tensor) -> int | None:
    if is_lazy(t) or t.is_inference():
        return None
    return t._version


def tensor_props(t: torch.Tensor) -> dict[str, Any]:
    """Everything about a tensor but its identity and where its bytes live."""
    props: dict[str, Any] = {
        "type": type(t),
        "dtype": t.dtype,
        "device": t.device,
        "requires_grad": t.requires_grad,
        "is_leaf": t.is_leaf,
        "grad_fn": type(t.grad_fn).__name__ if t.grad_fn is not None else None,
    }
    if is_lazy(t):
        return props
    props.update(
        shape=tuple(t.shape),
        stride=t.stride(),
        storage_offset=t.storage_offset(),
        layout=t.layout,
        is_view=t._is_view(),
        base_is_none=t._base is None,
        is_conj=t.is_conj(),
        is_neg=t.is_neg(),
        is_inference=t.is_inference(),
        version=version(t),
        bytes=tensor_bytes(t),
        storage=storage_bytes(t),
    )
    return props


def assert_same_metadata(expected: Any, got: Any) -> None:
    """``_metadata`` present in both or neither; equal type, keys, key order and values."""
    assert hasattr(got, "_metadata") == hasattr(expected, "_metadata")
    if not hasattr(expected, "_metadata"):
        return
    exp, act = expected._metadata, got._metadata
    assert type(act) is type(exp)
    assert list(act) == list(exp)
    assert act == exp
    for key in exp:
        assert type(act[key]) is type(exp[key])
        assert list(act[key].items()) == list(exp[key].items())
    assert repr(act) == repr(exp)


def owned_tensors(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` under each of its names (ties included)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.named_parameters(prefix=prefix[:-1], remove_duplicate=False):
        out[name] = t
    for name, t in model.named_buffers(prefix=prefix[:-1], remove_duplicate=False):
        out[name] = t
    return out


def assert_same_state_dict(
    expected: Any,
    got: Any,
    *,
    keep_vars: bool = False,
    model: nn.Module | None = None,
    prefix: str = "",
) -> None:
    """zerockpt's state dict ``got`` against torch's ``expected``.

    If both came from one ``model``, a value that is (keep_vars) or shares storage with one of
    its parameters or buffers in torch's result must be or share it in zerockpt's as well.
    """
    assert type(got) is type(expected)
    assert list(got) == list(expected)
    assert_same_metadata(expected, got)
    owned = {} if model is None else owned_tensors(model, prefix)
    for key, exp in expected.items():
        act = got[key]
        assert type(act) is type(exp), key
        if not isinstance(exp, torch.Tensor):
            assert act == exp, key
            continue
        assert tensor_props(act) == tensor_props(exp), key
        param = owned.get(key)
        if param is None or is_lazy(exp):
            continue
        assert (act is param) == (exp is param), key
        if exp is param:
            continue
        if storage_ptr(exp) == storage_ptr(param) and not param.is_meta:
            assert act.data_ptr() == exp.data_ptr(), key
            assert storage_ptr(act) == storage_ptr(exp), key
            assert act is not exp, key
            if not keep_vars:
                assert not act.requires_grad and act.grad_fn is None, key


def bump_versions(model: nn.Module) -> None:
    """An in-place no-op write (``t.copy_(t)``) into every parameter and buffer that has data."""
    with torch.no_grad():
        for t in model.state_dict(keep_vars=True).values():
            if not isinstance(t, torch.Tensor) or is_lazy(t) or t.is_inference():
                continue
            t.copy_(t)


def assert_versions_follow(model: nn.Module, expected: Any, got: Any, prefix: str = "") -> None:
    """Both results share the parameters' version counters: a write shows in both."""
    owned = owned_tensors(model, prefix)
    keys = [k for k in got if k in owned and version(owned[k]) is not None]
    before = {k: version(got[k]) for k in keys}
    bump_versions(model)
    for key in keys:
        assert version(got[key]) == version(expected[key]) == version(owned[key]), key
        assert version(got[key]) != before[key], key


# ---------------------------------------------------------------------------------------------
# state_dict on the zoo
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "model."], ids=["root", "prefix"])
@pytest.mark.parametrize("case", zoo_params(ZOO))
def test_state_dict_zoo(case: Case, prefix: str) -> None:
    model = build(case.make, 0)
    expected = model.state_dict(prefix=prefix)
    got = zerockpt.state_dict(model, prefix=prefix)
    assert_same_state_dict(expected, got, model=model, prefix=prefix)
    # A fresh, identically seeded model gives the same state dict (values and all).
    other = zerockpt.state_dict(build(case.make, 0), prefix=prefix)
    assert_same_state_dict(expected, other)
    assert_versions_follow(model, expected, got, prefix)


@pytest.mark.parametrize("case", zoo_params(ZOO))
def test_state_dict_keep_vars_zoo(case: Case) -> None:
    model = build(case.make, 0)
    expected = model.state_dict(keep_vars=True)
    got = zerockpt.state_dict(model, keep_vars=True)
    assert_same_state_dict(expected, got, keep_vars=True, model=model)
    for key, value in owned_tensors(model).items():
        if key in expected:
            assert got[key] is value, key


def test_state_dict_tied_listed_under_every_name() -> None:
    model = build(TiedLM, 0)
    got = zerockpt.state_dict(model)
    assert list(got) == list(model.state_dict())
    assert "embed.weight" in got and "head.weight" in got
    assert got["embed.weight"] is not got["head.weight"]
    assert got["embed.weight"].data_ptr() == got["head.weight"].data_ptr()
    kept = zerockpt.state_dict(model, keep_vars=True)
    assert kept["embed.weight"] is kept["head.weight"] is model.embed.weight


def test_state_dict_skips_non_persistent_and_none() -> None:
    got = zerockpt.state_dict(build(WithNonPersistent, 0))
    assert list(got) == ["kept", "lin.weight", "lin.bias"]
    got = zerockpt.state_dict(build(WithNone, 0))
    assert list(got) == ["w", "b", "c.weight", "c.bias"]
    assert list(got._metadata) == ["", "c"]


class Recorder(dict):  # type: ignore[type-arg]
    """A dict subclass destination that records writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def __setitem__(self, key: str, value: Any) -> None:
        self.writes.append(key)
        super().__setitem__(key, value)


class MappingDestination(MutableMapping):  # type: ignore[type-arg]
    """A MutableMapping (not a dict) with a ``_metadata`` attribute."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self._metadata: OrderedDict[str, Any] = OrderedDict()

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def __delitem__(self, key: str) -> None:
        del self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


def _with_metadata() -> OrderedDict[str, Any]:
    d: OrderedDict[str, Any] = OrderedDict(existing=torch.zeros(1))
    d._metadata = OrderedDict(old={"version": 7})  # type: ignore[attr-defined]
    return d


@pytest.mark.parametrize(
    "make_destination",
    [dict, OrderedDict, _with_metadata, Recorder, MappingDestination],
    ids=["dict", "ordered_dict", "ordered_dict_metadata", "dict_subclass", "mutable_mapping"],
)
@pytest.mark.parametrize("prefix", ["", "model."], ids=["root", "prefix"])
def test_state_dict_destination(make_destination: Callable[[], Any], prefix: str) -> None:
    model = build(TiedLM, 0)
    dest_t, dest_z = make_destination(), make_destination()
    expected = model.state_dict(destination=dest_t, prefix=prefix)
    got = zerockpt.state_dict(model, destination=dest_z, prefix=prefix)
    assert expected is dest_t
    assert got is dest_z
    assert list(got.keys()) == list(expected.keys())
    for key in expected:
        if isinstance(expected[key], torch.Tensor):
            assert tensor_props(got[key]) == tensor_props(expected[key]), key
    assert_same_metadata(expected, got)
    if isinstance(dest_t, Recorder):
        assert dest_z.writes == dest_t.writes


@pytest.mark.parametrize(
    "args",
    [
        (None,),
        (None, "p."),
        (None, "p.", True),
        (None, "", False),
        ("dict", "x."),
    ],
    ids=["destination", "prefix", "keep_vars", "falsy", "dict"],
)
def test_state_dict_positional_args(args: tuple[Any, ...]) -> None:
    model = build(lambda: nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), 0)

    def real(a: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple({} if x == "dict" else x for x in a)

    with pytest.warns(FutureWarning) as rec_t:
        expected = model.state_dict(*real(args))
    with pytest.warns(FutureWarning) as rec_z:
        got = zerockpt.state_dict(model, *real(args))
    assert [str(w.message) for w in rec_z] == [str(w.message) for w in rec_t]
    assert [w.category for w in rec_z] == [w.category for w in rec_t]
    assert [w.filename for w in rec_z] == [w.filename for w in rec_t] == [__file__]
    keep_vars = len(args) > 2 and bool(args[2])
    prefix = args[1] if len(args) > 1 else ""
    assert_same_state_dict(expected, got, keep_vars=keep_vars, model=model, prefix=prefix)
    # Keyword arguments win over positional ones where torch lets them.
    with pytest.warns(FutureWarning):
        expected = model.state_dict(None, "a.", destination=None, prefix="b.", keep_vars=True)
    with pytest.warns(FutureWarning):
        got = zerockpt.state_dict(model, None, "a.", destination=None, prefix="b.", keep_vars=True)
    assert_same_state_dict(expected, got, keep_vars=True, model=model, prefix="b.")


# ---------------------------------------------------------------------------------------------
# state_dict hooks and overrides
# ---------------------------------------------------------------------------------------------


class HookedTree(nn.Module):
    """Root -> (a: Linear, b: Sequential(Linear)), with recording hooks at every level."""

    def __init__(self, log: list[Any]) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
        for name, m in [("root", self), ("a", self.a), ("b", self.b), ("b0", self.b[0])]:
            m.register_state_dict_pre_hook(self._pre(log, name))
            m.register_state_dict_post_hook(self._post(log, name))
            m.register_state_dict_pre_hook(self._pre(log, name + "#2"))

    @staticmethod
    def _pre(log: list[Any], name: str) -> Callable[..., None]:
        def hook(module: nn.Module, prefix: str, keep_vars: bool) -> None:
            log.append(("pre", name, type(module).__name__, prefix, repr(keep_vars)))

        return hook

    @staticmethod
    def _post(log: list[Any], name: str) -> Callable[..., None]:
        def hook(module: nn.Module, sd: Any, prefix: str, local_metadata: Any) -> None:
            log.append(("post", name, prefix, list(sd), dict(local_metadata)))
            sd[prefix + "post_" + name] = torch.tensor(len(sd))

        return hook


@pytest.mark.parametrize("keep_vars", [False, True, 1], ids=["detach", "keep", "keep_int"])
@pytest.mark.parametrize("prefix", ["", "m."], ids=["root", "prefix"])
def test_state_dict_hook_order(keep_vars: Any, prefix: str) -> None:
    log_t: list[Any] = []
    log_z: list[Any] = []
    model_t = build(lambda: HookedTree(log_t), 0)
    model_z = build(lambda: HookedTree(log_z), 0)
    expected = model_t.state_dict(prefix=prefix, keep_vars=keep_vars)
    got = zerockpt.state_dict(model_z, prefix=prefix, keep_vars=keep_vars)
    assert log_z == log_t
    assert_same_state_dict(expected, got, keep_vars=bool(keep_vars))


def _registers_post_hook(log: list[str]) -> nn.Module:
    """A pre-hook that registers a post-hook on its own module (torch then runs it)."""
    model = nn.Sequential(nn.Linear(2, 2))

    def post(module: nn.Module, sd: Any, prefix: str, local_metadata: Any) -> None:
        log.append("post " + prefix)
        sd[prefix + "from_post"] = torch.zeros(1)

    def pre(module: nn.Module, prefix: str, keep_vars: bool) -> None:
        log.append("pre " + prefix)
        if not module._state_dict_hooks:
            module.register_state_dict_post_hook(post)

    model.register_state_dict_pre_hook(pre)
    model[0].register_state_dict_pre_hook(pre)
    return model


def test_state_dict_pre_hook_registers_post_hook() -> None:
    log_t: list[str] = []
    log_z: list[str] = []
    expected = build(lambda: _registers_post_hook(log_t), 0).state_dict()
    got = zerockpt.state_dict(build(lambda: _registers_post_hook(log_z), 0))
    assert log_z == log_t
    assert_same_state_dict(expected, got)


@pytest.mark.parametrize("mode", ["no_grad", "enable_grad", "inference_mode"])
def test_state_dict_grad_modes(mode: str) -> None:
    model = build(lambda: nn.Sequential(TiedLM(), nn.BatchNorm1d(10), Strided()), 0)
    with getattr(torch, mode)():
        expected = model.state_dict()
        got = zerockpt.state_dict(model)
    assert_same_state_dict(expected, got, model=model)
    assert_versions_follow(model, expected, got)


def test_state_dict_post_hook_must_return_none() -> None:
    def bad(module: nn.Module, sd: Any, prefix: str, local_metadata: Any) -> Any:
        return {}

    errors = []
    for fn in (lambda m: m.state_dict(), zerockpt.state_dict):
        model = build(lambda: nn.Sequential(nn.Linear(2, 2)), 0)
        model[0].register_state_dict_post_hook(bad)
        with pytest.raises(RuntimeError) as info:
            fn(model)
        errors.append((type(info.value), str(info.value)))
    assert errors[1] == errors[0]


def _private_hook(module: nn.Module, sd: Any, prefix: str, local_metadata: Any) -> Any:
    """A legacy private post-hook: returns a new dict (with a marker entry)."""
    out: OrderedDict[str, Any] = OrderedDict((k + "_renamed", v) for k, v in sd.items())
    out[prefix + "marker"] = torch.tensor(1.0)
    out._metadata = OrderedDict(private={"prefix": prefix})  # type: ignore[attr-defined]
    return out


@pytest.mark.parametrize("where", ["root", "child", "both"])
def test_state_dict_private_hook_new_dict(where: str) -> None:
    results = []
    for fn in (lambda m: m.state_dict(), zerockpt.state_dict):
        model = build(lambda: nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 1))), 0)
        if where in ("root", "both"):
            model._register_state_dict_hook(_private_hook)
        if where in ("child", "both"):
            model[1]._register_state_dict_hook(_private_hook)
        results.append(fn(model))
    assert_same_state_dict(results[0], results[1])


class ScaledSave(nn.Linear):
    """Overrides _save_to_state_dict: saves the weight doubled and an extra entry."""

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight.detach() * 2
        destination[prefix + "note"] = torch.tensor(3)


class CustomStateDict(nn.Module):
    """Overrides state_dict itself (a child of the root)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def state_dict(
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> Any:
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        out[prefix + "custom"] = torch.tensor([len(out)])
        return out


def _instance_override() -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    child = model[1]
    original = child.state_dict

    def state_dict(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        out[kwargs.get("prefix", "") + "instance"] = torch.ones(1)
        return out

    child.state_dict = state_dict  # type: ignore[method-assign]
    return model


def _instance_save_override() -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    child = model[0]

    def save(destination: Any, prefix: str, keep_vars: bool) -> None:
        nn.Module._save_to_state_dict(child, destination, prefix, keep_vars)
        destination[prefix + "saved_by_instance"] = torch.zeros(1)

    child._save_to_state_dict = save  # type: ignore[method-assign]
    # get_extra_state on the instance (not the class): torch ignores it.
    model[1].get_extra_state = lambda: torch.ones(1)  # type: ignore[method-assign]
    return model


OVERRIDES: dict[str, Callable[[], nn.Module]] = {
    "save_to_state_dict_instance": _instance_save_override,
    "save_to_state_dict": lambda: nn.Sequential(ScaledSave(2, 2), nn.ReLU(), ScaledSave(2, 1)),
    "state_dict_child": lambda: nn.Sequential(nn.Linear(2, 2), CustomStateDict()),
    "state_dict_root": CustomStateDict,
    "state_dict_instance": _instance_override,
    "extra_state": lambda: nn.Sequential(ExtraState(), nn.Sequential(ExtraState())),
    "tensor_extra_state": lambda: nn.Sequential(TensorExtraState(), GetterOnly()),
}


@pytest.mark.parametrize("keep_vars", [False, True], ids=["detach", "keep"])
@pytest.mark.parametrize("make", list(OVERRIDES.values()), ids=list(OVERRIDES))
def test_state_dict_overrides(make: Callable[[], nn.Module], keep_vars: bool) -> None:
    model_t, model_z = build(make, 0), build(make, 0)
    expected = model_t.state_dict(prefix="p.", keep_vars=keep_vars)
    got = zerockpt.state_dict(model_z, prefix="p.", keep_vars=keep_vars)
    assert_same_state_dict(expected, got, keep_vars=keep_vars)
    # And on one model (storage sharing, identity with keep_vars).
    model = build(make, 0)
    assert_same_state_dict(
        model.state_dict(keep_vars=keep_vars),
        zerockpt.state_dict(model, keep_vars=keep_vars),
        keep_vars=keep_vars,
        model=model,
    )


def test_state_dict_extra_state_values() -> None:
    model = build(lambda: nn.Sequential(ExtraState(), nn.Linear(2, 2)), 0)
    got = zerockpt.state_dict(model)
    assert list(got) == list(model.state_dict())
    assert got["0._extra_state"] == model[0].state
    assert got["0._extra_state"] is not model[0].state


def test_state_dict_leaves_the_gc_as_it_found_it_and_on_for_python_code() -> None:
    """The walk pauses the cyclic GC only while C++ alone allocates: hooks, overrides and a
    custom destination see it as the caller left it, and it is restored afterwards."""
    import gc

    seen: list[bool] = []

    class Extra(nn.Module):
        def get_extra_state(self) -> int:
            seen.append(gc.isenabled())
            return 1

    class Dest(OrderedDict):  # type: ignore[type-arg]
        def __setitem__(self, key: Any, value: Any) -> None:
            seen.append(gc.isenabled())
            super().__setitem__(key, value)

    class Saver(nn.Linear):
        def _save_to_state_dict(self, *args: Any) -> None:
            seen.append(gc.isenabled())
            super()._save_to_state_dict(*args)

    class Described(nn.Linear):
        @property
        def _version(self) -> int:  # type: ignore[override]
            seen.append(gc.isenabled())
            return 3

    class Sub(torch.Tensor):
        def detach(self) -> torch.Tensor:
            seen.append(gc.isenabled())
            return super().detach()

    def post_hook(*args: Any) -> None:
        seen.append(gc.isenabled())

    model = nn.Sequential(nn.Linear(2, 2), Extra(), Saver(2, 2), Described(2, 2), nn.Linear(2, 2))
    model[4].register_buffer("sub", torch.zeros(2).as_subclass(Sub))
    model[0].register_state_dict_pre_hook(lambda *args: seen.append(gc.isenabled()))
    model[4].register_state_dict_post_hook(post_hook)
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            seen.clear()
            assert list(zerockpt.state_dict(model)) == list(model.state_dict())
            # zerockpt's walk and torch's each ran all six: pre-hook, get_extra_state,
            # _save_to_state_dict, _version, the subclass's detach, post-hook.
            assert len(seen) == 12
            assert list(zerockpt.state_dict(model, destination=Dest())) == list(model.state_dict())
            assert gc.isenabled() is enabled
            assert seen and all(s is enabled for s in seen)
        finally:
            gc.enable()


def test_state_dict_metadata_version_from_instance_class_or_descriptor() -> None:
    """``_version`` is read as Python reads it: an instance attribute, a class int, a
    property (which wins over the instance dict), or Module's default."""

    class Versioned(nn.Linear):
        _version = 5

    class Described(nn.Linear):
        @property
        def _version(self) -> int:  # type: ignore[override]
            return 9

    own = nn.Linear(1, 1)
    own._version = 3
    described = Described(1, 1)
    described.__dict__["_version"] = 4  # a data descriptor in the class wins
    model = nn.ModuleDict({"own": own, "cls": Versioned(1, 1), "prop": described})
    model.plain = nn.Linear(1, 1)
    ours = zerockpt.state_dict(model)._metadata
    assert ours == model.state_dict()._metadata
    assert [ours[k]["version"] for k in ("own", "cls", "prop", "plain")] == [3, 5, 9, 1]
