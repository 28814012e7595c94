"""Cross-entropy of a linear LM head, computed a chunk of tokens at a time.

At 131,072 tokens and an 8,192-token vocabulary the logits alone are 4 GiB in float32, and
their softmax and gradient as much again: memory would grow with N·V and the time of these
allocations with it. Here the logits of one chunk exist at a time; backward recomputes them.
Memory is O(N·D + chunk·V), time O(N·D·V), exactly as for the plain head.
"""

from __future__ import annotations

import torch

CHUNK_TOKENS = 8192


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        # hidden [T, D], weight [V, D], targets [T] -> summed NLL (nats), at least float32
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        w = weight.to(dtype)
        total = hidden.new_zeros((), dtype=dtype)
        lse = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            logits = hidden[start:end].to(dtype) @ w.t()
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[start:end, None]).squeeze(1)
            total += (lse[start:end] - picked).sum()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, targets, lse = ctx.saved_tensors
        w = weight.to(lse.dtype)
        grad_hidden = torch.empty_like(hidden, dtype=lse.dtype)
        grad_weight = torch.zeros_like(w)
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = min(start + ctx.chunk, hidden.shape[0])
            h = hidden[start:end].to(lse.dtype)
            # d(lse - logit[target]) / d logits = softmax - onehot(target)
            grad_logits = torch.exp(h @ w.t() - lse[start:end, None])
            grad_logits[torch.arange(end - start, device=h.device), targets[start:end]] -= 1.0
            grad_logits *= grad_total
            grad_hidden[start:end] = grad_logits @ w
            grad_weight += grad_logits.t() @ h
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         reduction: str = "mean", chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """Cross-entropy of logits = hidden @ weight.T against targets, without all the logits.

    hidden [..., D], weight [V, D], targets [...] (int64); reduction "mean" or "sum".
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    total = _LinearCrossEntropy.apply(flat_hidden, weight, flat_targets, chunk)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / flat_targets.numel()
    raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
