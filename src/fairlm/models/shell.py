"""The language-model shell shared by the sequence models: ids -> embedding -> blocks ->
final RMSNorm -> tied LM head.

A block is any module mapping hidden states [B, N, D] to [B, N, D] with its residual inside.

Initialisation follows GPT-2 / nanoGPT: every Linear and Embedding weight ~ N(0, 0.02), biases
zero, and projections that write into the residual stream (marked `residual_projection = True`)
~ N(0, 0.02 / sqrt(2 * n_layers)); norms start at weight 1 (and bias 0).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

INIT_STD = 0.02
NORM_EPS = 1e-5  # Mamba's RMSNorm epsilon


class LMShell(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        blocks: list[nn.Module],
        max_positions: int | None = None,
    ):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        # learned absolute positions are optional: a recurrence already knows order
        self.position_embedding = (
            nn.Embedding(max_positions, d_model) if max_positions else None
        )
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = nn.RMSNorm(d_model, eps=NORM_EPS)
        self.grad_checkpointing = False
        init_gpt2_(self, n_layers=len(self.blocks))

    def set_grad_checkpointing(self, flag: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations."""
        self.grad_checkpointing = bool(flag)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.features(ids) @ self.output_weight().t()

    def output_weight(self) -> torch.Tensor:
        """The LM head: tied, the logits reuse the token embedding matrix."""
        return self.token_embedding.weight

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """The final-normed hidden states [B, N, D] that the head maps to logits."""
        h = self.token_embedding(ids)
        if self.position_embedding is not None:
            n = ids.shape[-1]
            if n > self.position_embedding.num_embeddings:
                raise ValueError(
                    f"sequence length {n} exceeds the position embedding's "
                    f"{self.position_embedding.num_embeddings} positions"
                )
            h = h + self.position_embedding(torch.arange(n, device=ids.device))
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, use_reentrant=False)
            else:
                h = block(h)
        return self.final_norm(h)


def init_gpt2_(model: nn.Module, n_layers: int) -> None:
    residual_std = INIT_STD / math.sqrt(2 * max(1, n_layers))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            std = residual_std if getattr(module, "residual_projection", False) else INIT_STD
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
