"""In-memory models and tensor dicts for the benchmarks and the demo (nothing is downloaded)."""

from __future__ import annotations

import torch
from torch import nn
from zerockpt import benchtools

# GPT-2 small (124M parameters): the shapes of the Hugging Face checkpoint (zerockpt.benchtools
# builds them, as `zerockpt bench` does), whose linear layers store their weight as
# (in_features, out_features).
VOCAB = benchtools.GPT2_VOCAB
N_POSITIONS = benchtools.GPT2_POSITIONS
D_MODEL = 768
N_LAYER = 12

_SMALL_SHAPES: tuple[tuple[int, ...], ...] = (
    (16,),
    (8, 8),
    (4, 4, 4),
    (32,),
    (2, 3, 5),
    (12, 4),
    (64,),
    (3, 7),
)


def gpt2_small_config(scale: float = 1.0) -> benchtools.ModelConfig:
    """GPT-2 small (fp32, ~124M parameters, ~500 MB).

    ``scale`` < 1 shrinks the vocabulary, the positions and the number of blocks (d_model stays
    768) for smoke runs: ``scale=0.01`` gives a few MB.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    vocab = max(1, round(VOCAB * scale))
    n_positions = max(1, round(N_POSITIONS * scale))
    n_layer = max(1, round(N_LAYER * scale))
    return benchtools.ModelConfig(vocab, n_positions, D_MODEL, n_layer)


def gpt2_small_module(scale: float = 1.0, seed: int = 0) -> nn.Module:
    """GPT-2 small (see :func:`gpt2_small_config`) as a module with random weights;
    ``lm_head.weight`` is the same Parameter as ``transformer.wte.weight``."""
    return benchtools.build_module(gpt2_small_config(scale), torch.float32, seed)


def gpt2_small_state_dict(scale: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of :func:`gpt2_small_module`; ``lm_head.weight`` shares
    ``transformer.wte.weight``'s memory."""
    return dict(gpt2_small_module(scale, seed).state_dict())


def many_small_tensors(n: int = 20000, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` independent small fp32 tensors of varied shapes named ``layers.{i}.param``."""
    gen = torch.Generator().manual_seed(seed)
    shapes = _SMALL_SHAPES
    return {
        f"layers.{i}.param": torch.randn(shapes[i % len(shapes)], generator=gen) for i in range(n)
    }


# --- Traversal benchmarks: many modules, tiny tensors ----------------------------------------


class LoraLinear(nn.Module):
    """A linear layer with a low-rank adapter, as parameter-efficient fine-tuning builds it:
    five modules and four tensors per projection."""

    def __init__(self, n_in: int, n_out: int, rank: int = 2) -> None:
        super().__init__()
        self.base = nn.Linear(n_in, n_out)
        self.lora_a = nn.Linear(n_in, rank, bias=False)
        self.lora_b = nn.Linear(rank, n_out, bias=False)
        self.dropout = nn.Dropout(0.0)


class TinyAttention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q = LoraLinear(d, d)
        self.k = LoraLinear(d, d)
        self.v = LoraLinear(d, d)
        self.o = LoraLinear(d, d)
        self.q_norm = nn.LayerNorm(d)
        self.k_norm = nn.LayerNorm(d)
        self.attn_dropout = nn.Dropout(0.0)
        self.register_buffer("rotary", torch.zeros(d), persistent=False)


class TinyMLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.gate = LoraLinear(d, 2 * d)
        self.up = LoraLinear(d, 2 * d)
        self.down = LoraLinear(2 * d, d)
        self.act = nn.SiLU()


class TinyBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(d)
        self.attn = TinyAttention(d)
        self.norm_2 = nn.LayerNorm(d)
        self.mlp = TinyMLP(d)
        self.dropout = nn.Dropout(0.0)


class TinyTransformer(nn.Module):
    """A transformer-like stack of tiny blocks: 44 modules and 39 tensors per block."""

    def __init__(self, n_layer: int = 48, d: int = 8, vocab: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(TinyBlock(d) for _ in range(n_layer))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)


class Expert(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d, hidden)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)


class MoELayer(nn.Module):
    def __init__(self, d: int, hidden: int, n_experts: int) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(d)
        self.attn = nn.ModuleDict({n: nn.Linear(d, d) for n in ("q", "k", "v", "o")})
        self.norm_2 = nn.LayerNorm(d)
        self.router = nn.Linear(d, n_experts, bias=False)
        self.experts = nn.ModuleList(Expert(d, hidden) for _ in range(n_experts))


class TinyMoE(nn.Module):
    """An MoE-shaped model: ``n_layer`` layers of ``n_experts`` three-linear experts."""

    def __init__(self, n_layer: int = 32, n_experts: int = 150, d: int = 4, hidden: int = 4):
        super().__init__()
        self.embed = nn.Embedding(32, d)
        self.layers = nn.ModuleList(MoELayer(d, hidden, n_experts) for _ in range(n_layer))
        self.norm = nn.LayerNorm(d)


def count_modules_and_tensors(model: nn.Module) -> tuple[int, int]:
    """(modules, state-dict entries) of ``model``."""
    return sum(1 for _ in model.modules()), len(model.state_dict())


# --- Traversal benchmarks, held-out shapes: norm layers with versions, and a wide MoE ---------


class Adapter(nn.Module):
    """A bottleneck adapter: down, activation, up, and a LayerNorm."""

    def __init__(self, d: int, rank: int = 2) -> None:
        super().__init__()
        self.down = nn.Linear(d, rank)
        self.act = nn.GELU()
        self.up = nn.Linear(rank, d)
        self.norm = nn.LayerNorm(d)


class Gate(nn.Module):
    """A gated projection: a Linear and a per-feature scale Parameter."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.scale = nn.Parameter(torch.ones(d))


class NormBlock(nn.Module):
    """LayerNorms, BatchNorms (versioned ``_load_from_state_dict``), adapters and gates."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.ModuleDict({n: nn.Linear(d, d) for n in ("q", "k", "v", "o")})
        self.ln_2 = nn.LayerNorm(d)
        self.fc_1 = nn.Linear(d, 2 * d)
        self.fc_2 = nn.Linear(2 * d, d)
        self.bns = nn.ModuleList(nn.BatchNorm1d(d) for _ in range(4))
        self.adapters = nn.ModuleList(Adapter(d) for _ in range(5))
        self.gates = nn.ModuleList(Gate(d) for _ in range(4))


class NormStack(nn.Module):
    """A 48-block stack of :class:`NormBlock`: about 2,300 modules and 3,800 tensors."""

    def __init__(self, n_layer: int = 48, d: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, d)
        self.blocks = nn.ModuleList(NormBlock(d) for _ in range(n_layer))
        self.norm = nn.LayerNorm(d)


class BareExpert(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)


class WideMoELayer(nn.Module):
    def __init__(self, d: int, n_experts: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.router = nn.Linear(d, n_experts, bias=False)
        self.experts = nn.ModuleList(BareExpert(d, d) for _ in range(n_experts))


class WideMoE(nn.Module):
    """48 layers x 208 bias-free experts: about 40,000 modules and 30,000 tensors."""

    def __init__(self, n_layer: int = 48, n_experts: int = 208, d: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, d)
        self.layers = nn.ModuleList(WideMoELayer(d, n_experts) for _ in range(n_layer))
        self.norm = nn.LayerNorm(d)
