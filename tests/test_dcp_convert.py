"""zerockpt.dcp.to_file: a DCP checkpoint written by zerockpt.dcp.Writer -> one file or shards."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import zerockpt
import zerockpt.dcp

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _state() -> dict[str, object]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 16)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict(), "step": 11, "tag": "run-a"}


def _save(state: dict[str, object], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=zerockpt.dcp.Writer(path), no_dist=True)


@pytest.mark.parametrize("max_shard_size", [None, "4KB"])
def test_to_file_rebuilds_the_state(tmp_path: Path, max_shard_size: str | None) -> None:
    state = _state()
    _save(state, tmp_path / "ckpt")
    dest = tmp_path / ("out" if max_shard_size else "out.safetensors")
    zerockpt.dcp.to_file(tmp_path / "ckpt", dest, max_shard_size=max_shard_size)
    if max_shard_size:
        assert len(list(dest.glob("model-*-of-*.safetensors"))) > 1
    out = zerockpt.load(dest, verify=True)
    assert out["step"] == 11 and out["tag"] == "run-a"
    for name, tensor in state["model"].items():  # type: ignore[attr-defined]
        assert torch.equal(out["model"][name], tensor)
    # DCP's flattening keeps optimizer-state keys as strings.
    for pid, entries in state["optim"]["state"].items():  # type: ignore[index]
        for key, value in entries.items():
            assert torch.equal(out["optim"]["state"][str(pid)][key], value)
    assert out["optim"]["param_groups"][0]["lr"] == state["optim"]["param_groups"][0]["lr"]  # type: ignore[index]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".zerockpt-tmp")]


def test_to_file_refuses_an_incomplete_checkpoint(tmp_path: Path) -> None:
    _save(_state(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / zerockpt.dcp.METADATA_FILE).unlink()
    with pytest.raises(zerockpt.FormatError, match="not a complete"):
        zerockpt.dcp.to_file(tmp_path / "ckpt", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
