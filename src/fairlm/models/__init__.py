"""Model registry: a third architecture is one module with `build(config, vocab_size)` and one
config section of the same name.

Every model maps token ids ``[B, N]`` (int64) to logits ``[B, N, V]`` and is causal: the logit
at position i depends on tokens 0..i only.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from fairlm.ops.chunked_loss import linear_cross_entropy

# name -> module path; imported lazily so that a model's heavy imports cost only its users
REGISTRY: dict[str, str] = {
    "resnet_bk": "fairlm.models.resnet_bk",
    "mamba": "fairlm.models.mamba",
}


def model_names() -> list[str]:
    return sorted(REGISTRY)


def build_model(name: str, config: dict, vocab_size: int) -> nn.Module:
    """Build model `name` from the resolved config (shared `model` section plus its own)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(model_names())}")
    module = importlib.import_module(REGISTRY[name])
    return module.build(config, vocab_size)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total and non-embedding parameter counts (tied weights counted once).

    Embedding parameters are those of every ``nn.Embedding`` (token and, where present,
    position embeddings); a tied LM head shares the token embedding and adds nothing.
    """
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    embedding = 0
    counted: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding) and id(module.weight) not in counted:
            counted.add(id(module.weight))
            embedding += module.weight.numel()
    return {"total": total, "non_embedding": total - embedding}


def lm_loss(model: nn.Module, tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of `tokens` [B, N + 1] (float32), the same for every model.

    Models with `features` and `output_weight` (both of ours) go through the chunked head, so
    that the [B, N, V] logits never exist at once; others through their logits.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if hasattr(model, "features") and hasattr(model, "output_weight"):
        return linear_cross_entropy(model.features(inputs), model.output_weight(), targets,
                                    reduction=reduction)
    logits = model(inputs)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           reduction=reduction)


def kernel_description(model: nn.Module) -> str:
    """Which compute kernels the model runs (recorded in system.json)."""
    return str(getattr(model, "kernel_description", lambda: "torch (eager)")())
