"""save -> load gives back exactly what was saved: every dtype, shape, stride and alias."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
import zerockpt
from conftest import (
    DTYPES,
    assert_bitwise_equal,
    assert_dicts_bitwise_equal,
    random_tensor,
    temp_leftovers,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_every_dtype_round_trips_bitwise(tmp_path: Path, dtype: torch.dtype, mmap: bool) -> None:
    tensors = {
        "matrix": random_tensor((7, 3), dtype, seed=1),
        "scalar": random_tensor((), dtype, seed=2),
        "empty": random_tensor((0, 4), dtype),
        "cube": random_tensor((2, 3, 4), dtype, seed=3),
    }
    path = tmp_path / "t.safetensors"
    zerockpt.save(tensors, path)
    loaded = zerockpt.load(path, mmap=mmap)
    assert_dicts_bitwise_equal(loaded, tensors)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch warns making these dtypes
def test_unsupported_dtype_is_type_error_naming_key(tmp_path: Path) -> None:
    for dtype in (torch.complex128, torch.complex32, torch.quint8):
        t = torch.zeros(2, dtype=torch.float32)
        t = torch.quantize_per_tensor(t, 0.1, 0, dtype) if dtype == torch.quint8 else t.to(dtype)
        with pytest.raises(TypeError, match="'bad'"):
            zerockpt.save({"ok": torch.zeros(1), "bad": t}, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_order_and_metadata_are_kept(tmp_path: Path, sample: dict) -> None:
    reordered = dict(reversed(list(sample.items())))
    path = tmp_path / "o.safetensors"
    zerockpt.save(reordered, path, metadata={"b": "2", "a": "1"})
    assert list(zerockpt.load(path)) == list(reordered)
    meta = zerockpt.open(path).metadata()
    assert meta["a"] == "1" and meta["b"] == "2"


NON_CONTIGUOUS = {
    "transposed": lambda: torch.randn(33, 17).t(),
    "stepped": lambda: torch.randn(40, 30)[::3, 1::2],
    "expanded": lambda: torch.randn(1, 9).expand(12, 9),
    "permuted": lambda: torch.randn(3, 4, 5, 6).permute(2, 0, 3, 1),
    "offset_view": lambda: torch.randn(100)[37:61],
    "conj": lambda: torch.randn(5, 4, dtype=torch.complex64).conj(),
    "neg_bit": lambda: torch.randn(5, 4, dtype=torch.complex64).conj().imag,
    "channels_last": lambda: torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("durable", [False, True])
def test_non_contiguous_tensors_are_written_contiguously(tmp_path: Path, durable: bool) -> None:
    tensors = {k: make() for k, make in NON_CONTIGUOUS.items()}
    path = tmp_path / "nc.safetensors"
    zerockpt.save(tensors, path, durable=durable)
    loaded = zerockpt.load(path)
    assert_dicts_bitwise_equal(loaded, tensors)
    for t in loaded.values():
        assert t.is_contiguous()


@pytest.mark.parametrize("direct_io", [False, True])
def test_large_strided_tensor_spans_many_staging_chunks(tmp_path: Path, direct_io: bool) -> None:
    # 40 MB transposed and a 24 MB row-stepped view: several 8 MiB staging chunks each,
    # with chunk boundaries falling inside rows.
    tensors = {
        "small": torch.arange(3, dtype=torch.int16),
        "t": torch.randn(2500, 4001).t(),
        "rows": torch.randn(1200, 10001, dtype=torch.float64)[::4, 3:-2],
    }
    path = tmp_path / "big.safetensors"
    zerockpt.save(tensors, path, durable=True, direct_io=direct_io)
    assert_dicts_bitwise_equal(zerockpt.load(path), tensors)


@pytest.mark.parametrize("direct_io", [False, True])
@pytest.mark.parametrize("threads", [1, 3])
def test_direct_and_buffered_paths_agree(tmp_path: Path, direct_io: bool, threads: int) -> None:
    tensors = {f"p{i}": random_tensor((1000 + 37 * i,), torch.float32, seed=i) for i in range(50)}
    tensors["big"] = random_tensor((5_000_003,), torch.uint8, seed=99)
    path = tmp_path / "d.safetensors"
    zerockpt.save(tensors, path, direct_io=direct_io, threads=threads)
    with zerockpt.open(path) as f:  # odd sizes are truncated to the exact length
        assert path.stat().st_size == f._handle().data_start + sum(f.info(k).nbytes for k in f)
    assert_dicts_bitwise_equal(zerockpt.load(path, threads=threads), tensors)
    assert_dicts_bitwise_equal(zerockpt.load(path, mmap=False, threads=threads), tensors)


def test_tied_tensors_written_once_and_restored_as_one(tmp_path: Path) -> None:
    w = torch.randn(64, 8)
    tensors = {"wte": w, "h.0": torch.ones(3), "lm_head": w, "also": w.detach()}
    path = tmp_path / "tied.safetensors"
    zerockpt.save(tensors, path)
    # Stored once: the file holds one 64x8 float tensor plus the 3 floats.
    with zerockpt.open(path) as f:
        assert f.info("lm_head").alias_of == "wte"
        assert f.info("also").alias_of == "wte"
        assert f.info("wte").alias_of is None
        data = sum(f.info(k).nbytes for k in ("wte", "h.0"))
        assert path.stat().st_size == f._handle().data_start + data
    loaded = zerockpt.load(path)
    assert list(loaded) == list(tensors)  # aliases at their saved positions
    assert loaded["lm_head"] is loaded["wte"] and loaded["also"] is loaded["wte"]
    assert_bitwise_equal(loaded["wte"], w)
    eager = zerockpt.load(path, mmap=False)
    assert eager["lm_head"] is eager["wte"]


def test_disjoint_views_of_one_storage_are_independent(tmp_path: Path) -> None:
    base = torch.randn(10, 4)
    tensors = {"q": base[:5], "k": base[5:]}
    path = tmp_path / "v.safetensors"
    zerockpt.save(tensors, path)
    loaded = zerockpt.load(path)
    assert_dicts_bitwise_equal(loaded, tensors)
    assert loaded["q"].untyped_storage().data_ptr() != loaded["k"].untyped_storage().data_ptr()


@pytest.mark.parametrize(
    "make",
    [
        lambda x: {"a": x, "b": x[1:]},
        lambda x: {"a": x, "b": x.t()},
        lambda x: {"a": x[:, :2], "b": x[:, 1:]},
        lambda x: {"a": x, "b": x.view(torch.int32)},
    ],
    ids=["prefix", "transpose", "columns", "reinterpret"],
)
def test_overlapping_different_views_are_rejected(tmp_path: Path, make) -> None:
    tensors = make(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"'a' and 'b'.*overlaps.*clone"):
        zerockpt.save(tensors, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []


def test_mapping_is_private_copy_on_write(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    zerockpt.save({"a": torch.zeros(1000)}, path)
    before = path.read_bytes()
    loaded = zerockpt.load(path)
    loaded["a"].add_(5)
    assert path.read_bytes() == before
    assert torch.equal(zerockpt.load(path)["a"], torch.zeros(1000))
    assert torch.equal(loaded["a"], torch.full((1000,), 5.0))


def test_replacing_the_file_leaves_loaded_tensors_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    zerockpt.save({"a": torch.arange(50_000.0)}, path)
    loaded = zerockpt.load(path)
    zerockpt.save({"a": torch.zeros(50_000)}, path)  # rename over the mapped file
    other = tmp_path / "other.safetensors"
    zerockpt.save({"a": torch.ones(50_000)}, other)
    os.replace(other, path)
    assert torch.equal(loaded["a"], torch.arange(50_000.0))
    assert torch.equal(zerockpt.load(path)["a"], torch.ones(50_000))


def _mapped(path: Path) -> list[tuple[int, int]]:
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(str(path)):
                lo, hi = line.split()[0].split("-")
                spans.append((int(lo, 16), int(hi, 16)))
    return spans


def test_tensors_are_views_into_the_mapping_which_lives_while_they_do(tmp_path: Path) -> None:
    path = tmp_path / "life.safetensors"
    zerockpt.save({"a": torch.randn(3000), "b": torch.randn(5000)}, path)
    loaded = zerockpt.load(path)
    spans = _mapped(path)
    assert spans, "file is not mapped"
    assert all(any(lo <= t.data_ptr() < hi for lo, hi in spans) for t in loaded.values())
    b = loaded["b"]
    del loaded
    gc.collect()
    assert _mapped(path), "mapping released while a tensor still uses it"
    expected = b.clone()
    del b
    gc.collect()
    assert _mapped(path) == [], "mapping not released after the last tensor died"
    assert expected.numel() == 5000


def test_eager_load_does_not_map(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    zerockpt.save({"a": torch.randn(3000)}, path)
    loaded = zerockpt.load(path, mmap=False)
    assert _mapped(path) == []
    loaded["a"].resize_(10)  # an ordinary, resizable tensor


def test_open_gives_lazy_access(tmp_path: Path, sample: dict) -> None:
    path = tmp_path / "lazy.safetensors"
    zerockpt.save(sample, path, metadata={"m": "x"})
    with zerockpt.open(path) as f:
        assert f.keys() == list(sample)
        assert list(f) == list(sample) and len(f) == len(sample)
        assert "steps" in f and "nope" not in f and 3 not in f
        info = f.info("embed.weight")
        assert (info.dtype, info.shape, info.format_dtype) == (torch.float32, (50, 16), "F32")
        assert info.nbytes == 50 * 16 * 4
        assert f.metadata()["m"] == "x"
        assert_bitwise_equal(f["block.0.w"], sample["block.0.w"])
        assert_bitwise_equal(f.get_tensor("mask", mmap=False), sample["mask"])
        with pytest.raises(KeyError):
            f.get_tensor("nope")
        kept = f["embed.weight"]
    with pytest.raises(ValueError, match="closed"):
        f.get_tensor("steps")
    assert_bitwise_equal(kept, sample["embed.weight"])


def test_paths_accept_pathlike_and_str(tmp_path: Path) -> None:
    zerockpt.save({"a": torch.ones(2)}, str(tmp_path / "s.safetensors"))
    assert torch.equal(zerockpt.load(str(tmp_path / "s.safetensors"))["a"], torch.ones(2))
    with pytest.raises(TypeError, match="path"):
        zerockpt.save({"a": torch.ones(2)}, 42)  # type: ignore[arg-type]


def test_save_accepts_any_mapping_and_parameters(tmp_path: Path) -> None:
    from collections import OrderedDict

    lin = torch.nn.Linear(3, 2)
    tensors = OrderedDict(lin.named_parameters())
    path = tmp_path / "p.safetensors"
    zerockpt.save(tensors, path)
    loaded = zerockpt.load(path)
    assert_bitwise_equal(loaded["weight"], lin.weight.detach())
    assert not loaded["weight"].requires_grad


def test_overwrite_keeps_permissions_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    zerockpt.save({"a": torch.ones(2)}, path)
    os.chmod(path, 0o640)
    zerockpt.save({"a": torch.zeros(2)}, path)
    assert path.stat().st_mode & 0o777 == 0o640
    assert temp_leftovers(tmp_path) == []


@st.composite
def tensor_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    n = draw(st.integers(1, 6))
    out = {}
    for i in range(n):
        dtype = draw(st.sampled_from(list(DTYPES)))
        shape = tuple(draw(st.lists(st.integers(0, 6), max_size=4)))
        t = random_tensor(shape, dtype, seed=draw(st.integers(0, 2**16)))
        if t.dim() >= 2 and draw(st.booleans()):
            t = t.transpose(0, t.dim() - 1)
        if t.dim() >= 1 and t.size(0) > 1 and draw(st.booleans()):
            t = t[::2]
        name = draw(st.text(min_size=1, max_size=12)) + f"#{i}"
        out[name] = t
    return out


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tensors=tensor_dicts(), durable=st.booleans(), mmap=st.booleans())
def test_property_round_trip(tmp_path: Path, tensors: dict, durable: bool, mmap: bool) -> None:
    path = tmp_path / "h.safetensors"
    zerockpt.save(tensors, path, durable=durable)
    assert_dicts_bitwise_equal(zerockpt.load(path, mmap=mmap), tensors)


@pytest.mark.parametrize("mmap", [True, False])
def test_loaded_empty_tensors_can_be_torch_saved(tmp_path: Path, mmap: bool) -> None:
    """An empty tensor stored at the offset of a tensor of another dtype loads with a storage of
    its own: torch.save of the loaded state would otherwise refuse the same address viewed as
    two dtypes."""
    state = {"half": torch.ones(4, dtype=torch.bfloat16), "empty": torch.empty(0, 3)}
    path = tmp_path / "e.safetensors"
    zerockpt.save(state, path)
    with zerockpt.open(path) as f:  # the layout this test is about
        assert f.info("empty").data_offsets[0] == f.info("half").data_offsets[0]
        from_open = {name: f.get_tensor(name, mmap=mmap) for name in f}
    for loaded in (zerockpt.load(path, mmap=mmap), from_open):
        assert_dicts_bitwise_equal(loaded, state)
        torch.save(loaded, tmp_path / "e.pt")
        assert_dicts_bitwise_equal(torch.load(tmp_path / "e.pt", weights_only=True), state)
