"""Tensors without plain dense memory: a clear TypeError/ValueError naming the key, or torch's
behaviour, on every save and load path; never a crash or an "Internal error"."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import zerockpt
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.checkpoint.api import CheckpointException
from zerockpt.dcp import Writer


def _nested() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the prototype-stage warning
        return torch.nested.nested_tensor([torch.ones(4), torch.ones(4), torch.ones(4)])


def _broken_view() -> torch.Tensor:
    """A (3, 4) view whose storage was shrunk to 4 bytes under it: torch's kernels overrun it."""
    base = torch.ones(12)
    view = base.view(3, 4)
    base.untyped_storage().resize_(4)
    return view


# name -> (tensor factory, exception type, key words of the message)
EXOTIC: dict[str, tuple[Callable[[], torch.Tensor], type[Exception], str]] = {
    "zero": (lambda: torch._efficientzerotensor(3, 4), TypeError, "is a zero tensor"),
    "nested": (_nested, TypeError, "is a nested tensor"),
    "jagged": (
        lambda: torch.nested.nested_tensor(
            [torch.ones(2, 4), torch.ones(3, 4)], layout=torch.jagged
        ),
        TypeError,
        "is a nested tensor",
    ),
    "fake": (lambda: FakeTensorMode().from_tensor(torch.ones(3, 4)), TypeError, "own dispatch"),
    "functional": (
        lambda: torch._to_functional_tensor(torch.ones(3, 4)),
        TypeError,
        "own dispatch",
    ),
    "broken_view": (_broken_view, ValueError, "views 48 bytes of a storage of only 4 bytes"),
    "sparse": (lambda: torch.eye(4).to_sparse(), TypeError, "layout Sparse"),
    "meta": (lambda: torch.empty(3, 4, device="meta"), ValueError, "is on meta"),
    "quantized": (
        lambda: torch.quantize_per_tensor(torch.ones(3, 4), 0.1, 0, torch.qint8),
        TypeError,
        "QInt8",
    ),
}


def _save_sync(state: dict[str, torch.Tensor], path: Path) -> None:
    zerockpt.save(state, path)


def _save_async(state: dict[str, torch.Tensor], path: Path) -> None:
    zerockpt.save_async(state, path).result()


def _save_sharded(state: dict[str, torch.Tensor], path: Path) -> None:
    zerockpt.save(state, path.with_suffix(""), max_shard_size=64)


def _save_checkpointer(state: dict[str, torch.Tensor], path: Path) -> None:
    zerockpt.Checkpointer(path.parent / "ckpts").save(1, state)


def _save_dcp(state: dict[str, torch.Tensor], path: Path) -> None:
    dcp.save(state, storage_writer=Writer(path.parent / "dcp"))


SAVERS = {
    "save": _save_sync,
    "save_async": _save_async,
    "sharded": _save_sharded,
    "checkpointer": _save_checkpointer,
    "dcp": _save_dcp,
}


@pytest.mark.parametrize("saver", SAVERS)
@pytest.mark.parametrize("kind", EXOTIC)
def test_save_refuses_exotic_tensors_naming_the_key(tmp_path: Path, kind: str, saver: str) -> None:
    make, error, words = EXOTIC[kind]
    if saver == "dcp" and kind in ("nested", "jagged"):
        pytest.skip("torch's DCP planner fails on these before any storage writer runs")
    if saver == "dcp":
        error = CheckpointException  # DCP wraps each rank's error, message included
    state = {"ok": torch.arange(100.0), "odd.key": make()}
    with pytest.raises(error, match=words) as info:
        SAVERS[saver](state, tmp_path / "x.safetensors")
    assert "'odd.key'" in str(info.value)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_state_dict_traversal_then_save_of_a_zero_parameter(tmp_path: Path) -> None:
    model = nn.Linear(4, 3)
    model.weight.data = torch._efficientzerotensor(3, 4)
    sd = zerockpt.state_dict(model)  # traversal hands the tensor over as torch does
    assert sd["weight"]._is_zerotensor()
    with pytest.raises(TypeError, match="'weight' is a zero tensor"):
        zerockpt.save(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


class _CustomLinear(nn.Linear):
    """Loads through torch's own code (an overridden _load_from_state_dict)."""

    def _load_from_state_dict(self, *args: object) -> None:  # type: ignore[override]
        super()._load_from_state_dict(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", [nn.Linear, _CustomLinear])
def test_zero_tensor_values_load_as_zeros_like_torch(cls: type[nn.Linear]) -> None:
    ours, theirs = cls(4, 3), cls(4, 3)
    theirs.load_state_dict({"weight": torch._efficientzerotensor(3, 4), "bias": torch.ones(3)})
    result = zerockpt.load_state_dict(
        ours, {"weight": torch._efficientzerotensor(3, 4), "bias": torch.ones(3)}
    )
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    torch.testing.assert_close(ours.weight, theirs.weight)
    assert torch.count_nonzero(ours.weight) == 0


@pytest.mark.parametrize("source", ["dict", "file"])
def test_loading_into_a_zero_parameter_fails_as_in_torch(tmp_path: Path, source: str) -> None:
    path = tmp_path / "m.safetensors"
    state = {"weight": torch.ones(300, 400), "bias": torch.ones(300)}
    zerockpt.save(state, path)
    model = nn.Linear(400, 300)
    model.weight.data = torch._efficientzerotensor(300, 400)
    with pytest.raises(RuntimeError, match="ZeroTensors are immutable") as ours:
        zerockpt.load_state_dict(model, state if source == "dict" else path)
    model.weight.data = torch._efficientzerotensor(300, 400)
    with pytest.raises(RuntimeError) as theirs:
        model.load_state_dict(state)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("cls", [nn.Linear, _CustomLinear])
@pytest.mark.parametrize("source", ["dict", "file"])
def test_load_refuses_a_parameter_larger_than_its_storage(
    tmp_path: Path, cls: type[nn.Linear], source: str
) -> None:
    path = tmp_path / "m.safetensors"
    state = {"weight": torch.ones(3, 4), "bias": torch.ones(3)}
    zerockpt.save(state, path)
    model = cls(4, 3)
    model.weight.data = _broken_view()
    with pytest.raises(ValueError, match="model's tensor for key 'weight' views 48 bytes"):
        zerockpt.load_state_dict(model, state if source == "dict" else path)


@pytest.mark.parametrize("cls", [nn.Linear, _CustomLinear])
@pytest.mark.parametrize(
    ("make", "error", "words"),
    [(_broken_view, ValueError, "views 48 bytes"), (_nested, TypeError, "is a nested tensor")],
)
def test_load_refuses_broken_and_nested_values_naming_the_key(
    cls: type[nn.Linear],
    make: Callable[[], torch.Tensor],
    error: type[Exception],
    words: str,
) -> None:
    model = cls(4, 3)
    before = model.weight.detach().clone()
    with pytest.raises(error, match=f"value for key 'weight' {words}"):
        zerockpt.load_state_dict(model, {"weight": make(), "bias": torch.ones(3)})
    torch.testing.assert_close(model.weight.detach(), before)


def test_unused_exotic_values_are_unexpected_keys_as_in_torch() -> None:
    model = nn.Linear(4, 3)
    state = {"weight": torch.ones(3, 4), "bias": torch.ones(3), "extra": _nested()}
    result = zerockpt.load_state_dict(model, state, strict=False)
    assert list(result.unexpected_keys) == ["extra"]


def test_dtensor_on_one_rank_is_refused_naming_the_key(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = distribute_tensor(torch.arange(8.0), mesh, [Shard(0)])
        for save in (_save_sync, _save_async):
            with pytest.raises(TypeError, match=r"'d' is a tensor subclass .*\.full_tensor\(\)"):
                save({"d": sharded}, tmp_path / "d.safetensors")
        assert list(tmp_path.iterdir()) == []
        zerockpt.save({"d": sharded.full_tensor()}, tmp_path / "d.safetensors")
        torch.testing.assert_close(
            zerockpt.load(tmp_path / "d.safetensors")["d"], torch.arange(8.0)
        )
    finally:
        dist.destroy_process_group()
