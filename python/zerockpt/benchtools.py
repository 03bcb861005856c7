"""What ``zerockpt bench`` and the pytest-benchmark suite (``benches/``) share.

GPT-2-shaped models built in memory (nothing is downloaded), tied-tensor bookkeeping, reading
every byte of loaded tensors, and the page-cache and fsync control that makes save and load
timings comparable. Imports nothing optional: matplotlib and safetensors stay with their users.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]

# GPT-2's vocabulary and context length (the Hugging Face checkpoints' shapes).
GPT2_VOCAB = 50257
GPT2_POSITIONS = 1024

# Names that are the same tensor as another name: alias -> name it shares memory with.
TIED: dict[str, str] = {"lm_head.weight": "transformer.wte.weight"}


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a GPT-2-style model (Hugging Face ``GPT2LMHeadModel`` names and layouts).

    Linear layers are GPT-2's Conv1D, whose weight is (in_features, out_features);
    ``lm_head.weight`` is tied to (the same tensor as) ``transformer.wte.weight``.
    """

    vocab: int
    n_positions: int
    d_model: int
    n_layer: int

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every state-dict name and its shape, in ``state_dict()`` order, ``lm_head.weight``
        (tied to ``transformer.wte.weight``) last."""
        d = self.d_model
        shapes: dict[str, tuple[int, ...]] = {
            "transformer.wte.weight": (self.vocab, d),
            "transformer.wpe.weight": (self.n_positions, d),
        }
        for i in range(self.n_layer):
            p = f"transformer.h.{i}."
            shapes.update(
                {
                    p + "ln_1.weight": (d,),
                    p + "ln_1.bias": (d,),
                    p + "attn.c_attn.weight": (d, 3 * d),
                    p + "attn.c_attn.bias": (3 * d,),
                    p + "attn.c_proj.weight": (d, d),
                    p + "attn.c_proj.bias": (d,),
                    p + "ln_2.weight": (d,),
                    p + "ln_2.bias": (d,),
                    p + "mlp.c_fc.weight": (d, 4 * d),
                    p + "mlp.c_fc.bias": (4 * d,),
                    p + "mlp.c_proj.weight": (4 * d, d),
                    p + "mlp.c_proj.bias": (d,),
                }
            )
        shapes["transformer.ln_f.weight"] = (d,)
        shapes["transformer.ln_f.bias"] = (d,)
        shapes["lm_head.weight"] = (self.vocab, d)
        return shapes

    @property
    def n_params(self) -> int:
        """Parameters, counting the tied ``lm_head.weight`` once (as GPT-2's 124M does)."""
        return sum(math.prod(s) for n, s in self.shapes().items() if n not in TIED)

    def describe(self) -> str:
        """One line: size and shape."""
        return (
            f"{self.n_params / 1e6:,.1f}M parameters (d_model {self.d_model}, "
            f"{self.n_layer} layers, vocab {self.vocab}, {self.n_positions} positions)"
        )


def build_state_dict(config: ModelConfig, dtype: torch.dtype, seed: int = 0) -> StateDict:
    """A state dict of ``config``'s shapes, filled with uniform random values in [-0.02, 0.02).

    Each tensor is allocated with ``torch.empty`` and filled in place from a generator seeded
    with ``seed`` (about 1 GB/s on two cores, page faults included); ``lm_head.weight`` is the
    same tensor as ``transformer.wte.weight``.

    Args:
        config: The shapes.
        dtype: A floating-point dtype.
        seed: Seed of the random values.

    Returns:
        Names to CPU tensors, in ``config.shapes()`` order.
    """
    gen = torch.Generator().manual_seed(seed)
    sd: StateDict = {}
    for name, shape in config.shapes().items():
        if name in TIED:
            sd[name] = sd[TIED[name]]
        else:
            sd[name] = torch.empty(shape, dtype=dtype).uniform_(-0.02, 0.02, generator=gen)
    return sd


def build_module(
    config: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0
) -> nn.Module:
    """A module whose ``state_dict()`` is :func:`build_state_dict` of the same arguments.

    A tree of plain ``nn.Module`` s holding the parameters (``requires_grad=False``) under the
    same names; ``lm_head.weight`` is the same Parameter as ``transformer.wte.weight``.
    """
    root = nn.Module()
    params: dict[int, nn.Parameter] = {}  # tensor id -> its Parameter, so tied names share one
    for name, tensor in build_state_dict(config, dtype, seed).items():
        *path, leaf = name.split(".")
        owner = root
        for part in path:
            child = owner._modules.get(part)
            if child is None:
                child = nn.Module()
                owner.add_module(part, child)
            owner = child
        param = params.setdefault(id(tensor), nn.Parameter(tensor, requires_grad=False))
        owner.register_parameter(leaf, param)
    return root


def unique_tensors(sd: StateDict) -> StateDict:
    """``sd`` without the later names of tensors that are the same view of one storage (what
    ``safetensors.torch.save_file``, which refuses shared memory, is given)."""
    seen: set[tuple[object, ...]] = set()
    out: StateDict = {}
    for name, t in sd.items():
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def total_nbytes(sd: StateDict) -> int:
    """Bytes of tensor data in ``sd``, tied tensors once."""
    return sum(t.numel() * t.element_size() for t in unique_tensors(sd).values())


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` as a flat uint8 tensor, for bitwise comparisons."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def read_every_byte(sd: StateDict) -> int:
    """Reads every byte of every distinct tensor (one uint8 max per tensor).

    (A uint8 ``sum`` would also read every byte, but it runs at well under 1 GB/s and would
    hide the cost of loading; ``max`` runs at memory speed.)

    Args:
        sd: The tensors (tied ones are read once).

    Returns:
        The largest byte seen, so the work cannot be skipped.
    """
    top = 0
    for t in unique_tensors(sd).values():
        if t.numel():
            top = max(top, int(t.reshape(-1).view(torch.uint8).max()))
    return top


def read_through(path: Path) -> None:
    """Reads the file once, so that its pages are in the page cache."""
    buf = bytearray(16 << 20)
    with path.open("rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def fsync_file(path: Path, *, directory: bool = False, drop: bool = False) -> None:
    """fsyncs ``path``; with ``drop``, then drops its (now clean) pages from the page cache;
    with ``directory``, then fsyncs its directory too (what ``zerockpt.save(durable=True)``
    does)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if drop:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if directory:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
