"""The file is byte-for-byte safetensors, and interoperates with the real package both ways."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import safetensors
import safetensors.torch as st
import torch
import zerockpt
from conftest import (
    DTYPES,
    assert_bitwise_equal,
    craft,
    random_tensor,
    read_header,
    torch_load_reads_safetensors,
)

# Dtypes the safetensors package itself maps to torch (it has no F8_E8M0).
ST_DTYPES = [d for d, name in DTYPES.items() if name != "F8_E8M0"]


def test_header_is_padded_to_4096_and_json(tmp_path: Path, sample: dict) -> None:
    path = tmp_path / "m.safetensors"
    zerockpt.save(sample, path, metadata={"note": "hi"})
    n, header, body = read_header(path)
    assert (8 + n) % 4096 == 0
    assert body == body.rstrip() + b" " * (len(body) - len(body.rstrip()))  # spaces only
    meta = header.pop("__metadata__")
    assert meta["note"] == "hi"
    assert meta["format"] == "pt"
    assert meta["zerockpt.version"] == zerockpt._C.FORMAT_VERSION
    # Keys keep the saved order in the JSON.
    assert list(header) == list(sample)
    for name, entry in header.items():
        assert entry["dtype"] == DTYPES[sample[name].dtype]
        assert entry["shape"] == list(sample[name].shape)


def test_tensors_packed_without_holes_and_aligned(tmp_path: Path) -> None:
    tensors = {
        "u8": torch.arange(3, dtype=torch.uint8),
        "f64": torch.randn(5, dtype=torch.float64),
        "f16": torch.randn(7).half(),
        "i32": torch.arange(3, dtype=torch.int32),
        "c64": torch.randn(2, dtype=torch.complex64),
    }
    path = tmp_path / "a.safetensors"
    zerockpt.save(tensors, path)
    n, header, _ = read_header(path)
    header.pop("__metadata__")
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], k) for k, e in header.items())
    cursor = 0
    for begin, end, name in spans:
        assert begin == cursor  # no holes
        item = tensors[name].element_size()
        assert (8 + n + begin) % item == 0  # aligned to its element size in the file
        cursor = end
    assert cursor == path.stat().st_size - 8 - n


@pytest.mark.parametrize("dtype", ST_DTYPES, ids=str)
def test_safetensors_reads_ours(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = {"x": random_tensor((3, 5), dtype, seed=2), "s": random_tensor((), dtype, seed=3)}
    path = tmp_path / "z.safetensors"
    zerockpt.save(tensors, path)
    loaded = st.load_file(path)
    assert set(loaded) == set(tensors)
    for k in tensors:
        assert_bitwise_equal(loaded[k], tensors[k])


@pytest.mark.parametrize("dtype", ST_DTYPES, ids=str)
def test_we_read_safetensors(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = {"x": random_tensor((4, 3), dtype, seed=4), "e": random_tensor((0,), dtype)}
    path = tmp_path / "s.safetensors"
    st.save_file(tensors, path, metadata={"k": "v"})
    loaded = zerockpt.load(path)
    for k in tensors:
        assert_bitwise_equal(loaded[k], tensors[k])
    assert zerockpt.open(path).metadata() == {"k": "v"}
    assert_bitwise_equal(zerockpt.load(path, mmap=False)["x"], tensors["x"])


def test_torch_load_hands_our_files_to_safetensors(tmp_path: Path, sample: dict) -> None:
    if not torch_load_reads_safetensors(tmp_path):
        pytest.skip(f"torch {torch.__version__}'s torch.load does not read safetensors files")
    path = tmp_path / "model.safetensors"
    zerockpt.save(sample, path)
    loaded = torch.load(path)
    for k in sample:
        assert_bitwise_equal(loaded[k], sample[k])


def test_safe_open_reads_metadata_and_slices(tmp_path: Path, sample: dict) -> None:
    path = tmp_path / "m.safetensors"
    zerockpt.save(sample, path, metadata={"epoch": "3"})
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert f.metadata()["epoch"] == "3"
        assert_bitwise_equal(f.get_slice("embed.weight")[2:5], sample["embed.weight"][2:5])


def test_tied_weights_other_readers_see_one_name(tmp_path: Path) -> None:
    w = torch.randn(10, 4)
    path = tmp_path / "tied.safetensors"
    zerockpt.save({"wte": w, "lm_head": w, "b": torch.zeros(2)}, path)
    loaded = st.load_file(path)
    assert sorted(loaded) == ["b", "wte"]
    assert_bitwise_equal(loaded["wte"], w)


def test_safetensors_file_with_unpadded_header_loads(tmp_path: Path) -> None:
    # Other writers pad to 8 bytes; tensors then start at arbitrary offsets.
    path = tmp_path / "s.safetensors"
    st.save_file({"a": torch.arange(5, dtype=torch.int16), "b": torch.ones(3)}, path)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + n) % 4096 != 0
    loaded = zerockpt.load(path)
    assert torch.equal(loaded["a"], torch.arange(5, dtype=torch.int16))
    assert torch.equal(loaded["b"], torch.ones(3))


def test_misaligned_foreign_tensor_is_copied_not_misread(tmp_path: Path) -> None:
    # A 3-byte U8 tensor first puts the F32 tensor at an odd address in the mapping.
    data = bytes([1, 2, 3]) + struct.pack("<2f", 1.5, -2.0)
    body = (
        b'{"a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]},'
        b'"b":{"dtype":"F32","shape":[2],"data_offsets":[3,11]}}'
    )
    body += b" " * (-(8 + len(body)) % 8)  # data region starts 8-aligned, so b is misaligned
    path = craft(tmp_path / "odd.safetensors", None, data, raw_header=body)
    loaded = zerockpt.load(path)
    assert loaded["b"].tolist() == [1.5, -2.0]
    assert loaded["a"].tolist() == [1, 2, 3]
