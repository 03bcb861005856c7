"""zerockpt.load_state_dict(model, path): file bytes straight into existing parameters.

torch is the oracle: loading a file must leave the model exactly as ``model.load_state_dict``
of the same tensors in memory does (values bitwise, dtype conversion as copy_, versions).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
import zerockpt
from conftest import DTYPES, craft, random_tensor, raw_bytes
from torch import nn


def _module(**tensors: torch.Tensor) -> nn.Module:
    """A module whose parameters (floating dtypes) and buffers (others) are ``tensors``."""
    m = nn.Module()
    for name, t in tensors.items():
        if t.dtype.is_floating_point or t.dtype.is_complex:
            m.register_parameter(name, nn.Parameter(t, requires_grad=False))
        else:
            m.register_buffer(name, t)
    return m


def _snapshot(m: nn.Module) -> list[tuple[str, torch.dtype, tuple[int, ...], bytes, int]]:
    return [
        (k, v.dtype, tuple(v.stride()), raw_bytes(v), v._version)
        for k, v in m.state_dict(keep_vars=True).items()
    ]


def _compare_with_torch(
    make: Callable[[], nn.Module], source: dict[str, torch.Tensor], path: Path, **kwargs: object
) -> nn.Module:
    """Loads ``path`` with zerockpt and ``source`` with torch into two fresh models."""
    expected, got = make(), make()
    assert expected.load_state_dict(source, **kwargs) == zerockpt.load_state_dict(  # type: ignore[arg-type]
        got, path, **kwargs
    )
    assert _snapshot(got) == _snapshot(expected)
    return got


def _raises_like_torch(
    expected: nn.Module, got: nn.Module, source: dict[str, torch.Tensor], path: Path
) -> str:
    """torch's load of ``source`` and zerockpt's load of ``path`` raise the same error."""
    with pytest.raises(RuntimeError) as torch_error:
        expected.load_state_dict(source)
    with pytest.raises(RuntimeError) as our_error:
        zerockpt.load_state_dict(got, path)
    assert str(our_error.value) == str(torch_error.value)
    return str(our_error.value)


CONVERSIONS = [
    (torch.float32, torch.bfloat16),
    (torch.float64, torch.float32),
    (torch.float16, torch.float64),
    (torch.bfloat16, torch.float32),
    (torch.int64, torch.float32),
    (torch.bool, torch.float16),
    (torch.float32, torch.int32),
    (torch.uint8, torch.int64),
    (torch.float8_e4m3fn, torch.float32),
]


@pytest.mark.parametrize(("stored", "target"), CONVERSIONS, ids=str)
def test_dtype_conversion_matches_copy(tmp_path: Path, stored: torch.dtype, target: torch.dtype):
    g = torch.Generator().manual_seed(0)
    if stored.is_floating_point:
        value = (torch.randn(3, 1000, generator=g) * 100).to(stored)
    else:
        value = torch.randint(0, 2 if stored == torch.bool else 100, (3, 1000), generator=g)
        value = value.to(stored)
    source = {"w": value}
    path = tmp_path / "m.safetensors"
    zerockpt.save(source, path)
    _compare_with_torch(lambda: _module(w=torch.zeros(3, 1000, dtype=target)), source, path)


def test_large_tensors_cross_staging_chunks(tmp_path: Path) -> None:
    """Conversions and strided targets bigger than one 8 MiB staging chunk, including a row
    that is larger than a chunk on its own."""
    n = 3 << 20  # 12 MiB of float32
    source = {
        "converted": torch.arange(n, dtype=torch.float32) / 7,
        "transposed": torch.arange(2 * n, dtype=torch.float32).reshape(2, n),
        "stepped": torch.arange(n, dtype=torch.float32) * 3,
    }
    path = tmp_path / "m.safetensors"
    zerockpt.save(source, path, durable=False)

    def make() -> nn.Module:
        return _module(
            converted=torch.zeros(n, dtype=torch.bfloat16),
            transposed=torch.zeros(n, 2).t(),  # shape (2, n), each row strided and > 8 MiB
            stepped=torch.zeros(n, 2)[:, 0],
        )

    got = _compare_with_torch(make, source, path)
    assert not got.transposed.is_contiguous()
    assert torch.equal(got.stepped, source["stepped"])


def test_channels_last_and_transposed_parameters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(5, 4))
    path = tmp_path / "m.safetensors"
    zerockpt.save(src, path)

    def make() -> nn.Module:
        m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(5, 4)).to(memory_format=torch.channels_last)
        m[1].weight = nn.Parameter(torch.zeros(5, 4).t())
        return m

    got = _compare_with_torch(make, src.state_dict(), path)
    assert got[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_every_dtype_bitwise(tmp_path: Path) -> None:
    source = {f"t{i}": random_tensor((7, 3), dt, seed=i) for i, dt in enumerate(DTYPES)}
    source["scalar"] = torch.tensor(2.5)
    source["empty"] = torch.empty(0, 4)
    path = tmp_path / "m.safetensors"
    zerockpt.save(source, path)
    _compare_with_torch(
        lambda: _module(**{k: torch.zeros_like(v) for k, v in source.items()}), source, path
    )


def test_one_element_value_into_zero_dim_buffer(tmp_path: Path) -> None:
    source = {"count": torch.tensor([41], dtype=torch.int64)}
    path = tmp_path / "m.safetensors"
    zerockpt.save(source, path)
    got = _compare_with_torch(lambda: _module(count=torch.tensor(0)), source, path)
    assert int(got.count) == 41 and got.count.dim() == 0


def test_tied_parameters_and_versions(tmp_path: Path) -> None:
    def make() -> nn.Module:
        torch.manual_seed(1)
        m = nn.Module()
        m.embed = nn.Embedding(10, 4)
        m.head = nn.Linear(4, 10, bias=False)
        m.head.weight = m.embed.weight
        return m

    torch.manual_seed(2)
    src = make()
    with torch.no_grad():
        src.embed.weight.mul_(3)
    path = tmp_path / "m.safetensors"
    zerockpt.save(src, path)
    got = _compare_with_torch(make, src.state_dict(), path)
    assert got.head.weight is got.embed.weight


def test_internally_overlapping_parameter_reports_like_torch(tmp_path: Path) -> None:
    source = {"w": torch.arange(6.0).reshape(2, 3)}
    path = tmp_path / "m.safetensors"
    zerockpt.save(source, path)

    def make() -> nn.Module:
        return _module(w=torch.zeros(3).expand(2, 3))

    _raises_like_torch(make(), make(), source, path)


def test_non_strict_reports_like_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    sd = src.state_dict()
    del sd["1.bias"]
    sd["extra"] = torch.ones(2)
    sd["0.unknown"] = torch.ones(1)
    path = tmp_path / "m.safetensors"
    zerockpt.save(sd, path)

    def make() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))

    _compare_with_torch(make, sd, path, strict=False)
    _raises_like_torch(make(), make(), sd, path)


def test_size_mismatch_still_loads_the_rest_like_torch(tmp_path: Path) -> None:
    sd = {"0.weight": torch.ones(3, 4), "0.bias": torch.full((3,), 2.0)}
    path = tmp_path / "m.safetensors"
    zerockpt.save(sd, path)

    def make() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(3, 3))

    expected, got = make(), make()
    assert "size mismatch for 0.weight" in _raises_like_torch(expected, got, sd, path)
    assert _snapshot(got) == _snapshot(expected)


def test_file_from_safetensors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    path = tmp_path / "st.safetensors"
    safetensors.torch.save_file(dict(src.state_dict()), path)
    _compare_with_torch(
        lambda: nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), src.state_dict(), path
    )


@pytest.mark.parametrize("threads", [1, 3])
def test_threads(tmp_path: Path, threads: int) -> None:
    source = {f"w{i}": torch.randn(1000) for i in range(50)}
    path = tmp_path / "m.safetensors"
    zerockpt.save(source, path)
    make = lambda: _module(**{k: torch.zeros(1000) for k in source})  # noqa: E731
    expected, got = make(), make()
    expected.load_state_dict(source)
    zerockpt.load_state_dict(got, path, threads=threads)
    assert _snapshot(got) == _snapshot(expected)


def test_assign_from_file_maps_the_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = nn.Linear(4, 3)
    path = tmp_path / "m.safetensors"
    zerockpt.save(src, path)
    with torch.device("meta"):
        target = nn.Linear(4, 3)
    target.weight.requires_grad_(False)
    zerockpt.load_state_dict(target, path, assign=True)
    assert type(target.weight) is nn.Parameter and not target.weight.requires_grad
    assert target.bias.requires_grad
    assert target.weight.device.type == "cpu"
    assert torch.equal(target.weight, src.weight) and torch.equal(target.bias, src.bias)
    with torch.no_grad():
        target.weight.zero_()  # a private mapping: the file is unchanged
    assert torch.equal(zerockpt.load(path)["weight"], src.weight)


# --- a bad file fails before the model is touched ---------------------------------------------


def _good_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    torch.manual_seed(5)
    path = tmp_path / "good.safetensors"
    zerockpt.save(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), path)
    return path


def _untouched_after(load: Callable[[nn.Module], object], error: type[BaseException]) -> str:
    model = _good_model()
    before = _snapshot(model)
    with pytest.raises(error) as info:
        load(model)
    assert _snapshot(model) == before
    return str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    message = _untouched_after(lambda m: zerockpt.load_state_dict(m, missing), FileNotFoundError)
    assert "nope.safetensors" in message


def test_truncated_file(good_file: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good_file.read_bytes()[:-10])
    message = _untouched_after(
        lambda m: zerockpt.load_state_dict(m, truncated), zerockpt.FormatError
    )
    assert "truncated" in message


def test_corrupt_header(good_file: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.safetensors"
    raw = bytearray(good_file.read_bytes())
    raw[10] = ord("#")
    corrupt.write_bytes(bytes(raw))
    _untouched_after(lambda m: zerockpt.load_state_dict(m, corrupt), zerockpt.FormatError)


def test_dtype_without_torch_equivalent(tmp_path: Path) -> None:
    header = {
        "0.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
        "odd": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [64, 67]},
    }
    path = craft(tmp_path / "f6.safetensors", header, bytes(67))
    message = _untouched_after(lambda m: zerockpt.load_state_dict(m, path), TypeError)
    assert "'odd'" in message and "F6_E2M3" in message


def test_directory_instead_of_file(tmp_path: Path) -> None:
    _untouched_after(lambda m: zerockpt.load_state_dict(m, tmp_path), IsADirectoryError)


def test_source_of_wrong_type() -> None:
    with pytest.raises(TypeError, match=r"Expected state_dict to be dict-like"):
        zerockpt.load_state_dict(_good_model(), 42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"module must be a torch\.nn\.Module"):
        zerockpt.load_state_dict({}, {})  # type: ignore[arg-type]


def test_model_is_deep_copyable_after_load(good_file: Path) -> None:
    model = _good_model()
    zerockpt.load_state_dict(model, good_file)
    clone = copy.deepcopy(model)
    assert _snapshot(clone) == [(k, d, s, b, 0) for k, d, s, b, _ in _snapshot(model)]
