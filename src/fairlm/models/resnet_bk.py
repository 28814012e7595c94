"""ResNet-BK as we train it (see shared/design/RESNET_BK.md).

Per layer, x = LayerNorm(h):
  v = clamp(Linear(D, heads)(x), -c, c)           one potential per token and head
  G = green_diagonal(v, z = i * z_imag, causal)    the BK core, per head
  bk = bk_scale * Linear(2 * heads, D)([Re G, Im G])
  h <- h + MoE(x) + bk
MoE is Switch-style: softmax over all experts, top-1, the expert's output scaled by its
probability (so the router learns); no batch statistics, so every token is routed on its own.
The shell (tied embeddings, final RMSNorm, optional learned positions) is fairlm.models.shell,
initialised like GPT-2 / nanoGPT (N(0, 0.02); residual projections 0.02 / sqrt(2 * layers)).
"""

from __future__ import annotations

import torch
from torch import nn

from fairlm.config import section
from fairlm.models.bk_core import green_diagonal
from fairlm.models.shell import LMShell


class Expert(nn.Module):
    def __init__(self, d_model: int, hidden: int, dropout: float):
        super().__init__()
        self.up = nn.Linear(d_model, hidden)
        self.dropout = nn.Dropout(dropout)
        self.down = nn.Linear(hidden, d_model)
        self.down.residual_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.dropout(torch.relu(self.up(x))))


class _PermuteRows(torch.autograd.Function):
    """x[order] whose backward is a gather by the inverse permutation.

    Autograd's own backward of index_select is a scatter-add, many times slower on CPU.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor):
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class SwitchMoE(nn.Module):
    """Top-1 mixture of experts; the chosen expert's output is scaled by its probability.

    Tokens are sorted by expert so that each expert runs once on a contiguous block.
    """

    def __init__(self, d_model: int, n_experts: int, expert_mult: int, dropout: float):
        super().__init__()
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(
            Expert(d_model, expert_mult * d_model, dropout) for _ in range(n_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(self.router(flat).float(), dim=-1)
        gate, choice = probs.max(dim=-1)
        order = torch.argsort(choice, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        counts = torch.bincount(choice, minlength=len(self.experts)).tolist()
        groups = _PermuteRows.apply(flat, order, inverse).split(counts)
        grouped_out = torch.cat([expert(g) for expert, g in zip(self.experts, groups, strict=True)])
        out = _PermuteRows.apply(grouped_out, inverse, order)
        return (out * gate[:, None]).to(x.dtype).reshape(x.shape)


class BKBranch(nn.Module):
    """Potentials -> resolvent diagonal -> features -> residual update."""

    def __init__(self, d_model: int, heads: int, clamp: float, z_imag: float, causal: bool,
                 scale_init: float):
        super().__init__()
        self.potential = nn.Linear(d_model, heads)
        self.features = nn.Linear(2 * heads, d_model)
        self.features.residual_projection = True
        self.bk_scale = nn.Parameter(torch.tensor(float(scale_init)))
        self.clamp = float(clamp)
        self.z = complex(0.0, float(z_imag))
        self.causal = bool(causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.potential(x).clamp(-self.clamp, self.clamp)  # [B, N, heads]
        green = green_diagonal(v.transpose(-1, -2), z=self.z, causal=self.causal)
        green = green.transpose(-1, -2)  # [B, N, heads]
        feats = torch.cat([green.real, green.imag], dim=-1)
        return self.bk_scale * self.features(feats.to(x.dtype))


class ResNetBKBlock(nn.Module):
    def __init__(self, d_model: int, settings: dict):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.moe = SwitchMoE(
            d_model, settings["n_experts"], settings["expert_mult"], settings["dropout"]
        )
        self.bk = BKBranch(
            d_model,
            settings["bk_heads"],
            settings["potential_clamp"],
            settings["z_imag"],
            settings["causal"],
            settings["bk_scale_init"],
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h)
        return h + self.moe(x) + self.bk(x)


class ResNetBK(LMShell):
    def __init__(self, vocab_size: int, d_model: int, n_layers: int, settings: dict,
                 max_positions: int | None):
        blocks = [ResNetBKBlock(d_model, settings) for _ in range(n_layers)]
        super().__init__(vocab_size, d_model, blocks, max_positions)
        self.settings = dict(settings)

    def kernel_description(self) -> str:
        mode = "causal" if self.settings["causal"] else "two-sided, sees the future"
        return f"BK core: chunked parallel scan ({mode}), analytic backward"


def settings_from_config(config: dict) -> dict:
    return section(config, "resnet_bk")


def build(config: dict, vocab_size: int) -> ResNetBK:
    settings = settings_from_config(config)
    model_cfg = config.get("model") or {}
    max_positions = None
    if settings["position_embedding"]:
        # enough positions for every length the config trains (a run's config names only its
        # own seq_len; the full config names the grid and the benchmark)
        lengths = [(config.get("run") or {}).get("seq_len")]
        lengths += list((config.get("grid") or {}).get("seq_lens") or [])
        lengths += list((config.get("bench") or {}).get("seq_lens") or [])
        lengths = [int(n) for n in lengths if n]
        max_positions = max(lengths) if lengths else 131072
    return ResNetBK(
        vocab_size,
        int(model_cfg.get("d_model", 512)),
        int(model_cfg.get("n_layers", 6)),
        settings,
        max_positions,
    )
