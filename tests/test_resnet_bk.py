"""ResNet-BK as a language model: shapes, causality, routing gradients, heads, parameters."""

import pytest
import torch

from fairlm.models import build_model, kernel_description, parameter_counts

VOCAB = 97


def config(d_model=32, n_layers=2, **resnet_bk):
    return {"model": {"d_model": d_model, "n_layers": n_layers}, "resnet_bk": resnet_bk}


def make(seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_model("resnet_bk", config(**kwargs), VOCAB).eval()


def token_ids(batch=2, n=48, seed=1):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_logits_shape_dtype_and_finite():
    model = make()
    logits = model(token_ids())
    assert logits.shape == (2, 48, VOCAB)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert "parallel scan (causal)" in kernel_description(model)


def changed_logits(model, t=30):
    ids = token_ids()
    other = ids.clone()
    other[:, t] = (other[:, t] + 1) % VOCAB
    with torch.no_grad():
        return (model(other) - model(ids)).abs(), t


def test_causal_model_never_reads_the_future():
    diff, t = changed_logits(make(causal=True))
    assert diff[:, :t].max().item() <= 1e-6
    assert diff[:, t:].max().item() > 1e-4  # and the changed token does matter


def test_two_sided_model_leaks_the_future():
    diff, t = changed_logits(make(causal=False))
    assert diff[:, :t].max().item() > 1e-4


def test_position_embedding_switch():
    assert make().position_embedding is None
    model = build_model(
        "resnet_bk",
        {**config(position_embedding=True), "grid": {"seq_lens": [64]}},
        VOCAB,
    )
    assert model.position_embedding.num_embeddings == 64
    assert model(token_ids(n=64)).shape == (2, 64, VOCAB)
    with pytest.raises(ValueError):
        model(token_ids(n=65))
    # a run's own config names only its seq_len
    run_model = build_model(
        "resnet_bk", {**config(position_embedding=True), "run": {"seq_len": 32}}, VOCAB
    )
    assert run_model.position_embedding.num_embeddings == 32


def test_router_potential_and_scale_get_gradients():
    model = make().train()
    loss = torch.nn.functional.cross_entropy(
        model(token_ids()).reshape(-1, VOCAB), token_ids(seed=2).reshape(-1)
    )
    loss.backward()
    block = model.blocks[0]
    assert block.moe.router.weight.grad.abs().sum() > 0  # the gate is trained
    assert block.bk.potential.weight.grad.abs().sum() > 0  # gradients flow through the core
    assert block.bk.bk_scale.grad.abs() > 0
    assert model.token_embedding.weight.grad.abs().sum() > 0


def test_several_bk_heads():
    model = make(bk_heads=3)
    assert model.blocks[0].bk.potential.out_features == 3
    assert model.blocks[0].bk.features.in_features == 6
    diff, t = changed_logits(model)
    assert diff[:, :t].max().item() <= 1e-6
    assert torch.isfinite(model(token_ids())).all()


def test_gradient_checkpointing_gives_the_same_gradients():
    ids, targets = token_ids(), token_ids(seed=3)
    grads = []
    for flag in [False, True]:
        model = make(seed=4).train()
        model.set_grad_checkpointing(flag)
        loss = torch.nn.functional.cross_entropy(
            model(ids).reshape(-1, VOCAB), targets.reshape(-1)
        )
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("heads", [1, 2])
def test_parameter_counts_follow_the_architecture(heads):
    d, layers, experts, mult = 32, 3, 4, 2
    model = make(d_model=d, n_layers=layers, bk_heads=heads, n_experts=experts, expert_mult=mult)
    per_layer = (
        2 * d  # LayerNorm
        + d * heads + heads  # potential
        + 2 * heads * d + d + 1  # features and bk_scale
        + d * experts  # router (no bias)
        + experts * (d * mult * d + mult * d + mult * d * d + d)  # experts
    )
    counts = parameter_counts(model)
    assert counts["non_embedding"] == layers * per_layer + d  # + final RMSNorm
    assert counts["total"] == counts["non_embedding"] + VOCAB * d  # head tied to embedding
    # no separate head matrix: the only [VOCAB, d] parameter is the token embedding
    vocab_sized = [p for p in model.parameters() if p.shape == (VOCAB, d)]
    assert len(vocab_sized) == 1


def test_gpt2_initialisation():
    model = make(d_model=256, n_layers=4)
    up = model.blocks[0].moe.experts[0].up.weight
    down = model.blocks[0].moe.experts[0].down.weight
    assert abs(up.std().item() - 0.02) < 0.002
    assert abs(down.std().item() - 0.02 / (2 * 4) ** 0.5) < 0.001
    assert model.blocks[0].bk.bk_scale.item() == 1.0


def test_switch_moe_matches_a_per_token_reference():
    from fairlm.models.resnet_bk import SwitchMoE

    torch.manual_seed(5)
    moe = SwitchMoE(d_model=8, n_experts=3, expert_mult=2, dropout=0.0)
    x = torch.randn(2, 11, 8, requires_grad=True)
    out = moe(x)
    probs = torch.softmax(moe.router(x), dim=-1)
    want = torch.stack([
        torch.stack([probs[b, t].max() * moe.experts[int(probs[b, t].argmax())](x[b, t])
                     for t in range(x.shape[1])])
        for b in range(x.shape[0])
    ])
    assert torch.allclose(out, want, atol=1e-6)
    weights = torch.randn_like(out)
    (grad_fast,) = torch.autograd.grad((out * weights).sum(), x)
    (grad_slow,) = torch.autograd.grad((want * weights).sum(), x)
    assert torch.allclose(grad_fast, grad_slow, atol=1e-6)
