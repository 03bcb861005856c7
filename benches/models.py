"""In-memory models and tensor dicts for the benchmarks and the demo (nothing is downloaded)."""

from __future__ import annotations

import torch
from torch import nn

# GPT-2 small (124M parameters): the shapes of the Hugging Face checkpoint, whose linear layers
# are Conv1D modules storing their weight as (in_features, out_features).
VOCAB = 50257
N_POSITIONS = 1024
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


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Conv1D(nn.Module):
    """GPT-2's linear layer: ``weight`` is (in_features, out_features)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = _param(n_in, n_out)
        self.bias = _param(n_out)


class LayerNorm(nn.Module):
    """Just the parameters of a layer norm (the benchmarks never run the model)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = _param(n)
        self.bias = _param(n)


class Attention(nn.Module):
    """Self-attention parameters: fused qkv projection and output projection."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_attn = Conv1D(d, 3 * d)
        self.c_proj = Conv1D(d, d)


class MLP(nn.Module):
    """Feed-forward parameters (4x expansion)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_fc = Conv1D(d, 4 * d)
        self.c_proj = Conv1D(4 * d, d)


class Block(nn.Module):
    """One transformer block."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(d)
        self.attn = Attention(d)
        self.ln_2 = LayerNorm(d)
        self.mlp = MLP(d)


class GPT2(nn.Module):
    """GPT-2-shaped parameters; ``lm_head.weight`` is the same Parameter as ``wte.weight``."""

    def __init__(self, vocab: int, n_positions: int, d: int, n_layer: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d, _weight=torch.empty(vocab, d))
        self.wpe = nn.Embedding(n_positions, d, _weight=torch.empty(n_positions, d))
        self.h = nn.ModuleList(Block(d) for _ in range(n_layer))
        self.ln_f = LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False, device="meta")
        self.lm_head.weight = self.wte.weight  # tied


def gpt2_small_module(scale: float = 1.0, seed: int = 0) -> GPT2:
    """GPT-2 small (fp32, ~124M parameters, ~500 MB) with random weights.

    ``scale`` < 1 shrinks the vocabulary, the positions and the number of blocks (d_model stays
    768) for smoke runs: ``scale=0.01`` gives a few MB.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    vocab = max(1, round(VOCAB * scale))
    n_positions = max(1, round(N_POSITIONS * scale))
    n_layer = max(1, round(N_LAYER * scale))
    model = GPT2(vocab, n_positions, D_MODEL, n_layer)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # tied parameters are yielded once
            p.normal_(0.0, 0.02, generator=gen)
    return model


def gpt2_small_state_dict(scale: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of :func:`gpt2_small_module`; ``lm_head.weight`` shares ``wte.weight``."""
    return dict(gpt2_small_module(scale, seed).state_dict())


def many_small_tensors(n: int = 20000, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` independent small fp32 tensors of varied shapes named ``layers.{i}.param``."""
    gen = torch.Generator().manual_seed(seed)
    shapes = _SMALL_SHAPES
    return {
        f"layers.{i}.param": torch.randn(shapes[i % len(shapes)], generator=gen) for i in range(n)
    }


def _view_key(t: torch.Tensor) -> tuple[object, ...]:
    return (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride())


def safetensors_view(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` without the later names of tied tensors (same view of one storage).

    ``safetensors.torch.save_file`` refuses tensors that share memory; this keeps the first name.
    """
    seen: set[tuple[object, ...]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        key = _view_key(t)
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def unique_tensors(sd: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The distinct tensors of ``sd`` (tied duplicates once), in order."""
    return list(safetensors_view(sd).values())


def total_nbytes(sd: dict[str, torch.Tensor]) -> int:
    """Bytes of tensor data in ``sd``, counting tied tensors once."""
    return sum(t.numel() * t.element_size() for t in unique_tensors(sd))


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
