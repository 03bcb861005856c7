"""Zero-copy in numbers: loads do not copy the file into memory, saves stage at most 64 MiB."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
import zerockpt

MiB = 1 << 20


def _rss() -> int:
    return psutil.Process().memory_info().rss


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mem") / "big.safetensors"
    zerockpt.save({"big": torch.ones(64 * MiB), "small": torch.arange(1024.0)}, path)  # 256 MiB
    return path


def test_mapped_load_does_not_grow_rss_by_file_size(big_file: Path) -> None:
    before = _rss()
    loaded = zerockpt.load(big_file)
    grown = _rss() - before
    assert grown < 16 * MiB, f"RSS grew by {grown / MiB:.1f} MiB for a 256 MiB file"
    assert loaded["big"].shape == (64 * MiB,)


def test_lazy_open_touches_only_the_tensor_asked_for(big_file: Path) -> None:
    before = _rss()
    with zerockpt.open(big_file) as f:
        small = f["small"]
        total = float(small.sum())
    grown = _rss() - before
    assert total == sum(range(1024))
    assert grown < 16 * MiB, f"RSS grew by {grown / MiB:.1f} MiB"


# Peak RSS of a child saving 256 MiB of tensors (contiguous and strided) vs its RSS before.
SAVE_CHILD = textwrap.dedent(
    """
    import resource, sys, torch, zerockpt
    path, durable, direct = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
    tensors = {f"w{i}": torch.ones(8 << 20) for i in range(6)}        # 192 MiB contiguous
    tensors["strided"] = torch.ones(4096, 4096).t()                   # 64 MiB strided
    tensors.update({f"s{i}": torch.ones(100) for i in range(1000)})   # many small
    zerockpt.save({"warm": torch.ones(16)}, path + ".warm")            # load code paths once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    zerockpt.save(tensors, path, durable=durable, direct_io=direct)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
    """
)


SAVE_MODES = {"buffered": ("0", "0"), "direct": ("1", "1")}  # (durable, direct)


@pytest.mark.parametrize("mode", list(SAVE_MODES))
def test_save_peak_extra_memory_is_bounded(children: dict[str, Child], mode: str) -> None:
    out = children[f"save-{mode}"]
    assert out.returncode == 0, out.stderr[-2000:]
    extra = int(out.stdout.strip())
    assert extra <= 64 * MiB, f"save used {extra / MiB:.1f} MiB beyond the tensors"


# Peak RSS of a child loading a 256 MiB file into an existing model, vs its RSS before: bytes
# go straight into the parameters (or through small staging chunks when converting dtypes or
# into strided parameters), never through a full-size intermediate state dict. The child only
# builds the target model and resets its peak RSS (VmHWM) just before the load.
LOAD_STATE_DICT_CHILD = textwrap.dedent(
    """
    import sys, torch, zerockpt
    from torch import nn
    path, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    target = nn.Module()
    for i in range(6):
        target.register_parameter(f"w{i}", nn.Parameter(torch.ones(8 << 20, dtype=dtype)))
    target.register_parameter("t", nn.Parameter(torch.ones(4096, 4096, dtype=dtype).t()))
    target.register_buffer("small", torch.arange(1000, dtype=dtype))
    zerockpt.load_state_dict(nn.Linear(2, 2), nn.Linear(2, 2).state_dict())  # load the code

    def status(field):  # kB
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    zerockpt.load_state_dict(target, path)
    peak = status("VmHWM")
    assert all(bool((p == 3).all()) for p in target.parameters())
    print((peak - before) * 1024)
    """
)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 256 MiB fp32 model file: six 32 MiB vectors, a 64 MiB matrix stored transposed."""
    path = tmp_path_factory.mktemp("mem") / "model.safetensors"
    tensors = {f"w{i}": torch.full((8 << 20,), 3.0) for i in range(6)}
    tensors["t"] = torch.full((4096, 4096), 3.0)
    tensors["small"] = torch.arange(1000.0)
    zerockpt.save(tensors, path, durable=False)
    return path


LOAD_DTYPES = {"same-dtype": "float32", "converting": "bfloat16"}


@dataclass
class Child:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def children(model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Child]:
    """Every child above, started at once: each measures its own peak RSS (ru_maxrss, VmHWM),
    which the others do not change, and their interpreters' start-ups overlap."""
    tmp = tmp_path_factory.mktemp("children")
    commands = {
        **{
            f"save-{mode}": [SAVE_CHILD, str(tmp / f"{mode}.safetensors"), durable, direct]
            for mode, (durable, direct) in SAVE_MODES.items()
        },
        **{
            f"load-{name}": [LOAD_STATE_DICT_CHILD, str(model_file), dtype]
            for name, dtype in LOAD_DTYPES.items()
        },
    }
    started = {
        name: subprocess.Popen(
            [sys.executable, "-c", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, argv in commands.items()
    }
    done = {}
    for name, proc in started.items():
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += "\n(killed after 300 s)"
        done[name] = Child(proc.returncode, out, err)
    return done


@pytest.mark.parametrize("dtype", list(LOAD_DTYPES))
def test_load_state_dict_from_file_peak_extra_memory_is_bounded(
    children: dict[str, Child], dtype: str
) -> None:
    out = children[f"load-{dtype}"]
    assert out.returncode == 0, out.stderr[-2000:]
    extra = int(out.stdout.strip())
    assert extra <= 64 * MiB, f"load_state_dict used {extra / MiB:.1f} MiB beyond the model"
