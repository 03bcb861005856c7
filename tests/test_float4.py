"""F4 <-> torch.float4_e2m1fn_x2, bitwise interoperable with safetensors (the oracle).

One torch element holds two 4-bit values; the format counts values. safetensors stores a torch
tensor of shape [..., n] as F4 with shape [..., 2n] and loads it back as [..., n]; zerockpt must
do the same on every path, with the same bytes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import safetensors.torch as st
import torch
import zerockpt
from conftest import craft, read_header
from safetensors import safe_open
from torch import nn

F4 = torch.float4_e2m1fn_x2
SHAPES = [(3, 4), (1,), (7,), (2, 3, 5), (0,), (4, 0), (0, 3), (1, 1, 1, 1)]


def fp4(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bytes as float4_e2m1fn_x2 (every nibble pattern, including the negative zero)."""
    g = torch.Generator().manual_seed(seed)
    numel = 1
    for d in shape:
        numel *= d
    return torch.randint(0, 256, (numel,), dtype=torch.uint8, generator=g).view(F4).reshape(shape)


def as_bytes(t: torch.Tensor) -> bytes:
    """Row-major bytes: torch has no comparison kernels for float4, so compare these."""
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype == F4
    assert a.shape == b.shape
    assert as_bytes(a) == as_bytes(b)


def data_region(path: Path, name: str) -> tuple[dict, bytes]:
    n, header, _ = read_header(path)
    entry = header[name]
    begin, end = entry["data_offsets"]
    raw = path.read_bytes()[8 + n + begin : 8 + n + end]
    return entry, raw


def test_torch_dtype_from_the_one_table() -> None:
    assert zerockpt._C.torch_dtype("F4") is F4
    assert zerockpt._C.torch_dtype("F32") is torch.float32
    assert zerockpt._C.torch_dtype("F8_E8M0") is torch.float8_e8m0fnu
    assert zerockpt._C.torch_dtype("F6_E2M3") is None
    assert zerockpt._C.torch_dtype("nope") is None


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_zerockpt_writes_what_safetensors_reads(tmp_path: Path, shape: tuple[int, ...]) -> None:
    t = fp4(shape)
    ours = tmp_path / "ours.safetensors"
    zerockpt.save({"w": t, "f": torch.arange(3.0)}, ours)
    theirs = tmp_path / "theirs.safetensors"
    st.save_file({"w": t, "f": torch.arange(3.0)}, theirs)
    # The header entry and the bytes are safetensors' own.
    ours_entry, ours_bytes = data_region(ours, "w")
    theirs_entry, theirs_bytes = data_region(theirs, "w")
    assert ours_entry["dtype"] == theirs_entry["dtype"] == "F4"
    assert ours_entry["shape"] == theirs_entry["shape"] == [*shape[:-1], 2 * shape[-1]]
    assert ours_bytes == theirs_bytes == as_bytes(t)
    loaded = st.load_file(ours)
    assert_same(loaded["w"], t)
    with safe_open(ours, "pt") as f:
        assert f.get_slice("w").get_shape() == theirs_entry["shape"]
        assert_same(f.get_tensor("w"), t)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mmap", [True, False])
def test_zerockpt_reads_what_safetensors_writes(
    tmp_path: Path, shape: tuple[int, ...], mmap: bool
) -> None:
    t = fp4(shape, seed=1)
    path = tmp_path / "theirs.safetensors"
    st.save_file({"w": t, "u": torch.arange(5, dtype=torch.uint8)}, path)
    expected = st.load_file(path)["w"]  # the oracle's shape
    assert_same(zerockpt.load(path, mmap=mmap)["w"], expected)
    with zerockpt.open(path) as f:
        assert_same(f.get_tensor("w", mmap=mmap), expected)
        info = f.info("w")
        assert info.dtype is F4 and info.format_dtype == "F4"
        assert list(info.shape) == [*shape[:-1], 2 * shape[-1]]  # as the header records it
        assert info.nbytes == t.numel()


def test_round_trip_through_both_libraries(tmp_path: Path) -> None:
    t = fp4((6, 10), seed=2)
    a, b, c = (tmp_path / f"{x}.safetensors" for x in "abc")
    zerockpt.save({"w": t}, a)
    st.save_file(st.load_file(a), b)  # safetensors re-saves what zerockpt wrote
    zerockpt.save(zerockpt.load(b), c)  # and zerockpt what safetensors wrote
    assert data_region(a, "w") == data_region(b, "w") == data_region(c, "w")
    assert_same(zerockpt.load(c)["w"], t)


def test_views_tied_and_strided(tmp_path: Path) -> None:
    base = fp4((8, 6), seed=3)
    tensors = {"t": base.t(), "w": base, "tied": base, "row": fp4((4,), seed=4)[1:3]}
    path = tmp_path / "v.safetensors"
    with pytest.raises(ValueError, match="overlaps"):
        zerockpt.save(tensors, path)  # a view and its base: refused, as for every dtype
    del tensors["t"]
    tensors["t"] = base.t().contiguous().t()  # strided, with memory of its own
    zerockpt.save(tensors, path)
    loaded = zerockpt.load(path)
    assert loaded["tied"] is loaded["w"]
    for name in ("t", "w", "row"):
        assert_same(loaded[name], tensors[name])
    ours = st.load_file(path)  # the alias is zerockpt's own: safetensors sees stored names
    assert_same(ours["t"], tensors["t"])


def test_zero_dim_is_refused_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    with pytest.raises(TypeError, match=r"'s' is a 0-dim float4_e2m1fn_x2"):
        zerockpt.save({"ok": fp4((2,)), "s": torch.empty((), dtype=F4)}, path)
    assert not path.exists()
    with pytest.raises(Exception, match="byte boundary"):  # the oracle refuses it too
        st.save_file({"s": torch.empty((), dtype=F4)}, tmp_path / "st.safetensors")


@pytest.mark.parametrize("shape", [[2, 3], [6, 1], [4, 2, 3]])
def test_odd_last_dimension_has_no_torch_shape(tmp_path: Path, shape: list[int]) -> None:
    nbytes = 1
    for d in shape:
        nbytes *= d
    nbytes //= 2
    path = craft(
        tmp_path / "odd.safetensors",
        {"a": {"dtype": "F4", "shape": shape, "data_offsets": [0, nbytes]}},
        b"\x11" * nbytes,
    )
    with pytest.raises(Exception, match="divisible by 2"):  # safetensors refuses it as well
        st.load_file(path)
    with zerockpt.open(path) as f:  # a valid header: it can be inspected
        assert f.info("a").shape == tuple(shape) and f.info("a").dtype is F4
        with pytest.raises(TypeError, match=r"'a' has dtype F4 and shape .* last dimension"):
            f["a"]
    for mmap in (True, False):
        with pytest.raises(TypeError, match=r"'a' has dtype F4 and shape"):
            zerockpt.load(path, mmap=mmap)
    m = nn.Module()
    m.register_buffer("a", torch.empty([*shape[:-1], shape[-1] // 2 or 1], dtype=F4))
    before = as_bytes(m.a)
    with pytest.raises(TypeError, match=r"'a' has dtype F4 and shape"):
        zerockpt.load_state_dict(m, path)
    assert as_bytes(m.a) == before  # nothing loaded


class Packed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("codes", torch.zeros(4, 8, dtype=torch.uint8).view(F4))
        self.register_buffer("strided", torch.zeros(6, 4, dtype=torch.uint8).view(F4).t())


@pytest.mark.parametrize("writer", ["zerockpt", "safetensors"])
def test_load_state_dict_matches_torch(tmp_path: Path, writer: str) -> None:
    src = Packed()
    src.codes.copy_(fp4((4, 8), seed=5))
    src.strided.copy_(fp4((4, 6), seed=6))
    path = tmp_path / "m.safetensors"
    if writer == "zerockpt":
        zerockpt.save(src, path)
    else:
        st.save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    ours, oracle = Packed(), Packed()
    result = zerockpt.load_state_dict(ours, path)
    expected = oracle.load_state_dict(st.load_file(path))  # torch's own copy_, the oracle
    assert (result.missing_keys, result.unexpected_keys) == (
        expected.missing_keys,
        expected.unexpected_keys,
    )
    for name, t in oracle.state_dict().items():
        if t.dtype == F4:
            assert_same(ours.state_dict()[name], t)
            assert_same(t, src.state_dict()[name])
    assert ours.strided.stride() == oracle.strided.stride()  # copied into, not replaced


def test_load_state_dict_size_mismatch_as_torch(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    zerockpt.save({"codes": fp4((4, 3))}, path)
    m = nn.Module()
    m.register_buffer("codes", torch.zeros(4, 6, dtype=torch.uint8).view(F4))
    with pytest.raises(RuntimeError) as ours:
        zerockpt.load_state_dict(m, path)
    with pytest.raises(RuntimeError) as torchs:
        m.load_state_dict(st.load_file(path))
    assert str(ours.value) == str(torchs.value)
    assert "torch.Size([4, 3])" in str(ours.value)


def test_sharded_and_async(tmp_path: Path) -> None:
    tensors = {f"w{i}": fp4((16, 32), seed=i) for i in range(4)}
    directory = tmp_path / "sharded"
    zerockpt.save(tensors, directory, max_shard_size=1024)
    loaded = zerockpt.load(directory)
    assert len(list(directory.glob("model-*.safetensors"))) > 1
    for name, t in tensors.items():
        assert_same(loaded[name], t)
    path = tmp_path / "async.safetensors"
    zerockpt.save_async(tensors, path).result()
    for name, t in st.load_file(path).items():
        assert_same(t, tensors[name])


def test_header_is_what_safetensors_writes(tmp_path: Path) -> None:
    t = fp4((2, 5))
    path = tmp_path / "h.safetensors"
    zerockpt.save({"w": t}, path)
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8 : 8 + n])
    assert header["w"] == {"dtype": "F4", "shape": [2, 10], "data_offsets": [0, 10]}
