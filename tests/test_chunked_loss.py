"""The chunked LM-head cross-entropy equals the plain one, in value and gradient."""

import pytest
import torch

from fairlm.config import resolve
from fairlm.models import build_model, lm_loss
from fairlm.ops.chunked_loss import linear_cross_entropy


def test_gradcheck_in_float64_across_chunk_boundaries():
    torch.manual_seed(0)
    hidden = torch.randn(2, 13, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (2, 13))
    assert torch.autograd.gradcheck(
        lambda h, w: linear_cross_entropy(h, w, targets, reduction="sum", chunk=4),
        (hidden, weight))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_equals_plain_cross_entropy(reduction):
    torch.manual_seed(1)
    hidden = torch.randn(3, 50, 8, requires_grad=True)
    weight = torch.randn(40, 8, requires_grad=True)
    targets = torch.randint(0, 40, (3, 50))
    chunked = linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk=7)
    plain = torch.nn.functional.cross_entropy((hidden @ weight.t()).reshape(-1, 40),
                                              targets.reshape(-1), reduction=reduction)
    torch.testing.assert_close(chunked, plain)
    for a, b in zip(torch.autograd.grad(chunked, (hidden, weight)),
                    torch.autograd.grad(plain, (hidden, weight)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet_bk", "mamba"])
def test_both_models_loss_equals_the_loss_of_their_logits(name):
    config = resolve({"model": {"d_model": 16, "n_layers": 1}})
    torch.manual_seed(2)
    model = build_model(name, config, 97).double()
    tokens = torch.randint(0, 97, (2, 33))
    logits = model(tokens[:, :-1])
    plain = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), tokens[:, 1:].reshape(-1))
    # transformers hands back float32 logits even from a float64 model
    torch.testing.assert_close(lm_loss(model, tokens).float(), plain.float())
