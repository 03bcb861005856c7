"""Python <-> C++ through zerockpt files, bitwise (run by ctest).

1. Python saves PyNet's state dict; the C++ program loads it into its Net (same layers) and
   runs forward: its logits equal PyNet's, bit for bit.
2. The C++ program saves its seeded Net; Python loads it into PyNet (strict), and both sides'
   forward outputs on the same tokens are equal, bit for bit.

Usage: interop_check.py PATH_TO_zerockpt_example WORK_DIR
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import zerockpt
from torch import nn


class PyNet(nn.Module):
    """The C++ NetImpl of net.h, layer for layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.fc1 = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 100)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.fc1(self.embed(tokens).mean(1))
        return self.fc2(self.norm(torch.relu(self.bn(x))))


def run(exe: str, *args: str) -> None:
    subprocess.run([exe, *args], check=True)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(-1).view(torch.int32), b.view(-1).view(torch.int32))
    )


def cpp_forward_matches(
    exe: str, work: Path, weights: str, net: PyNet, tokens: torch.Tensor
) -> bool:
    """Runs the C++ forward with `weights` on the saved tokens; bitwise equal to `net`'s?"""
    out = work / f"logits_of_{weights}"
    run(exe, "forward", str(work / weights), str(work / "tokens.safetensors"), str(out))
    with torch.no_grad():
        expected = net(tokens)
    return same_bits(zerockpt.load(out)["logits"], expected)


def main() -> int:
    exe, work = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    tokens = torch.randint(0, 100, (8, 5), generator=torch.Generator().manual_seed(3))
    zerockpt.save({"tokens": tokens}, work / "tokens.safetensors")
    failures = []

    # 1. Python writes, C++ reads.
    torch.manual_seed(1)
    net = PyNet().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    zerockpt.save(net.state_dict(), work / "py_weights.safetensors")
    if not cpp_forward_matches(exe, work, "py_weights.safetensors", net, tokens):
        failures.append("C++ forward of Python-saved weights differs")

    # 2. C++ writes, Python reads.
    run(exe, "init", str(work / "cpp_weights.safetensors"))
    state = zerockpt.load(work / "cpp_weights.safetensors")
    fresh = PyNet().eval()
    if list(state) != list(fresh.state_dict()):
        failures.append(f"key order {list(state)} != {list(fresh.state_dict())}")
    fresh.load_state_dict(state, strict=True)
    if int(state["bn.num_batches_tracked"]) != 7:
        failures.append("C++ buffer values did not arrive")
    if not cpp_forward_matches(exe, work, "cpp_weights.safetensors", fresh, tokens):
        failures.append("Python forward of C++-saved weights differs")

    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    checks = 4  # two forward comparisons, key order, buffer values
    print(f"{checks - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
