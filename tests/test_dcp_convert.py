"""zerockpt.dcp.to_file: a DCP checkpoint written by zerockpt.dcp.Writer -> one file or shards."""

from __future__ import annotations

import io
import json
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


# --- to_file trusts nothing in the metadata (issue 18, point 9) ---


def _tensor_entry(size: list[int], dtype: str = "float32") -> dict[str, object]:
    return {
        "dtype": dtype,
        "layout": "strided",
        "requires_grad": False,
        "memory_format": "contiguous_format",
        "pin_memory": False,
        "size": size,
        "chunks": [],
    }


def _crafted(tmp_path: Path, tensors: dict[str, object], storage: list[list[object]]) -> Path:
    """A checkpoint of a (4,) and b (4,) whose metadata describes ``tensors`` from ``storage``."""
    ckpt = tmp_path / "ckpt"
    _save({"a": torch.arange(4.0), "b": torch.arange(4.0) + 10}, ckpt)
    meta_path = ckpt / zerockpt.dcp.METADATA_FILE
    meta = json.loads(meta_path.read_text())
    meta["state_dict_metadata"] = tensors
    meta["storage_data"] = storage
    names = ", ".join(f'["{k}", {{"tuple": ["{k}"]}}]' for k in tensors)
    meta["planner_data"] = json.loads(f'{{"version": 1, "root": {{"dict": [{names}]}}}}')
    meta_path.write_text(json.dumps(meta))
    return ckpt


RANK_FILE = "__0_0.safetensors"


@pytest.mark.parametrize(
    ("size", "chunks", "words"),
    [
        ([8], [[0], [2]], r"chunks at \(0,\) and \(2,\) overlap"),  # volumes agree, one hole
        ([12], [[0], [4]], "the chunks hold 8 elements, the tensor 12"),  # a hole
        ([6], [[0], [2]], "the chunks hold 8 elements, the tensor 6"),
        ([8], [[0], [6]], r"chunk at \[6\] of shape \[4\] does not lie inside its size \[8\]"),
        ([2, 4], [[0, 0], [1, 0]], "does not lie inside"),  # rank differs
    ],
)
def test_to_file_refuses_chunks_that_do_not_tile(
    tmp_path: Path, size: list[int], chunks: list[list[int]], words: str
) -> None:
    pairs = enumerate(zip(chunks, "ab", strict=True))
    storage: list[list[object]] = [["t", o, k, RANK_FILE, name] for k, (o, name) in pairs]
    ckpt = _crafted(tmp_path, {"t": _tensor_entry(size)}, storage)
    with pytest.raises(zerockpt.FormatError, match=words) as info:
        zerockpt.dcp.to_file(ckpt, tmp_path / "out.safetensors")
    assert "'t'" in str(info.value) and str(ckpt) in str(info.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_to_file_refuses_a_chunk_of_another_dtype(tmp_path: Path) -> None:
    storage: list[list[object]] = [["t", [0], 0, RANK_FILE, "a"]]
    ckpt = _crafted(tmp_path, {"t": _tensor_entry([4], "float64")}, storage)
    with pytest.raises(zerockpt.FormatError, match=r"is torch\.float32, not torch\.float64"):
        zerockpt.dcp.to_file(ckpt, tmp_path / "out.safetensors")


def test_to_file_uses_each_stored_tensor_once(tmp_path: Path) -> None:
    """Many entries naming one stored tensor would multiply the output."""
    tensors = {f"t{i}": _tensor_entry([4]) for i in range(64)}
    storage: list[list[object]] = [[f"t{i}", [0], 0, RANK_FILE, "a"] for i in range(64)]
    ckpt = _crafted(tmp_path, tensors, storage)
    with pytest.raises(zerockpt.FormatError, match="both point at tensor 'a'"):
        zerockpt.dcp.to_file(ckpt, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_to_file_assembles_an_exact_tiling(tmp_path: Path) -> None:
    storage: list[list[object]] = [["t", [4], 0, RANK_FILE, "a"], ["t", [0], 1, RANK_FILE, "b"]]
    ckpt = _crafted(tmp_path, {"t": _tensor_entry([8])}, storage)
    zerockpt.dcp.to_file(ckpt, tmp_path / "out.safetensors")
    out = zerockpt.load(tmp_path / "out.safetensors")
    assert torch.equal(out["t"], torch.cat([torch.arange(4.0) + 10, torch.arange(4.0)]))


def test_to_file_bounds_non_tensor_items(tmp_path: Path) -> None:
    """A pickled item whose tensors are expanded views: more bytes than were stored."""
    ckpt = tmp_path / "ckpt"
    _save({"w": torch.ones(2), "n": [1, 2]}, ckpt)
    rank = ckpt / RANK_FILE
    items = dict(zerockpt.load(rank, mmap=False))
    buffer = io.BytesIO()
    torch.save([torch.zeros(1).expand(1 << 20)], buffer)  # 4 MiB from a few hundred bytes
    items["n"] = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    zerockpt.save(items, rank)
    with pytest.raises(zerockpt.FormatError, match=r"item 'n'.*would take 4194304 bytes"):
        zerockpt.dcp.to_file(ckpt, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
