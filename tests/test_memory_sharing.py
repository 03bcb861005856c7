"""The one "which tensors share memory" computation (``_C.memory_sharing``), which save, the
sharded planner, the DCP writer and the progress total all use, against a brute-force oracle."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import zerockpt
from zerockpt import _progress, sharded


def extent(t: torch.Tensor) -> tuple[int, int]:
    begin = t.storage_offset() * t.element_size()
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return begin, begin + (last + 1) * t.element_size()


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.is_conj() == b.is_conj()
        and a.is_neg() == b.is_neg()
    )


def oracle(tensors: list[torch.Tensor]) -> tuple[list[int], list[int]]:
    """Pairwise: views of one storage whose byte extents intersect are linked; a view is the
    alias of the first earlier entry that is the very same view."""
    n = len(tensors)
    group = list(range(n))

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    alias_of = [-1] * n
    for j in range(n):
        for i in range(j):
            a, b = tensors[i], tensors[j]
            if not a.numel() or not b.numel():
                continue
            if a.untyped_storage()._cdata != b.untyped_storage()._cdata:
                continue
            (ab, ae), (bb, be) = extent(a), extent(b)
            if ab < be and bb < ae:
                ra, rb = root(i), root(j)
                group[max(ra, rb)] = min(ra, rb)
                if alias_of[j] < 0 and same_view(a, b):
                    alias_of[j] = i if alias_of[i] < 0 else alias_of[i]
    return alias_of, [min(k for k in range(n) if root(k) == root(i)) for i in range(n)]


def random_view(base: torch.Tensor, rng: random.Random) -> torch.Tensor:
    t = base
    for _ in range(rng.randrange(3)):
        kind = rng.randrange(5)
        if kind == 0 and t.dim() and t.shape[0] > 1:
            start = rng.randrange(t.shape[0])
            t = t.narrow(0, start, rng.randrange(1, t.shape[0] - start + 1))
        elif kind == 1 and t.dim() > 1:
            t = t.t()
        elif kind == 2 and t.dim() and t.shape[-1] > 1:
            t = t[..., :: rng.choice([1, 2])]
        elif kind == 3 and t.is_complex():
            t = t.conj()
        elif kind == 4 and t.dim() > 1 and t.shape[0] > 1:
            t = t.select(0, rng.randrange(t.shape[0]))
    return t


@pytest.mark.parametrize("seed", range(40))
def test_matches_the_oracle(seed: int) -> None:
    rng = random.Random(seed)
    bases = [torch.zeros(6, 4), torch.zeros(3, 4, dtype=torch.complex64), torch.zeros(5)]
    tensors: list[torch.Tensor] = []
    for _ in range(rng.randrange(2, 9)):
        if tensors and rng.random() < 0.2:
            tensors.append(rng.choice(tensors))  # the very same tensor again (tied)
        else:
            tensors.append(random_view(rng.choice(bases), rng))
    assert zerockpt._C.memory_sharing(tensors) == tuple(map(list, oracle(tensors)))


def test_what_shares_nothing() -> None:
    a = torch.zeros(4)
    tensors = [
        a,
        torch.zeros(0),
        a[:0],  # no elements
        torch.empty(4, device="meta"),  # no memory
        torch.frombuffer(bytearray(16), dtype=torch.float32),  # another storage
        torch.zeros(4).to_sparse(),
    ]
    alias_of, group = zerockpt._C.memory_sharing(tensors)
    assert alias_of == [-1] * len(tensors)
    assert group == list(range(len(tensors)))


def test_same_bytes_read_differently_are_not_aliases() -> None:
    c = torch.zeros(3, dtype=torch.complex64)
    a = torch.zeros(8)
    views = [c, c.conj(), a, a.view(torch.int32), a.view(2, 4), a.neg().neg(), a._neg_view()]
    alias_of, group = zerockpt._C.memory_sharing(views)
    assert alias_of == [-1, -1, -1, -1, -1, -1, -1]
    assert group == [0, 0, 2, 2, 2, 5, 2]


def test_users_agree(tmp_path: Path) -> None:
    w = torch.randn(8, 4)
    tensors = {"w": w, "tied": w, "row": w[1], "other": torch.randn(3)}
    # Progress counts the tied weight once (and the overlapping row, which save refuses).
    assert _progress.unique_nbytes(tensors.values()) == (32 + 4 + 3) * 4
    # The sharded planner keeps a group in one shard and counts an alias once.
    assert sharded.plan_shards(tensors, 1) == [["w", "tied", "row"], ["other"]]
    del tensors["row"]
    assert sharded.plan_shards(tensors, 32 * 4 + 12) == [["w", "tied", "other"]]
    with pytest.raises(ValueError, match=r"'w' and 'row'"):
        zerockpt.save({"w": w, "row": w[1]}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []
