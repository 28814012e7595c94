"""The Mamba baseline: official parameterisation, the chunked scan against the sequential
oracle, whole-model agreement between kernels, causality, and parameter matching."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fairlm.models import build_model, parameter_counts  # noqa: E402
from fairlm.models.mamba import (  # noqa: E402
    KERNEL_CHUNKED_CPU,
    KERNEL_CUDA,
    KERNEL_MAMBAPY,
    KERNEL_SEQUENTIAL,
    mamba_non_embedding_params,
    mamba_ssm_available,
    match_mamba_size,
)
from fairlm.ops.selective_scan import selective_scan_chunked, selective_scan_sequential  # noqa: E402

VOCAB = 61


def make_config(d_model=40, n_layers=2, **mamba):
    return {"model": {"d_model": d_model, "n_layers": n_layers}, "mamba": mamba}


def build(seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_model("mamba", make_config(**kwargs), VOCAB)


def mixers(model):
    return [layer.mixer for layer in model.lm.backbone.layers]


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    return (
        logits.detach(),
        loss.detach(),
        {name: p.grad.clone() for name, p in model.named_parameters()},
    )


def relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_same_model(model, reference, ids, logits_tol, grads_tol):
    """Two builds with the same weights give the same logits, loss and every gradient."""
    reference.load_state_dict(model.state_dict())
    logits, loss, grads = loss_and_grads(model, ids)
    logits_ref, loss_ref, grads_ref = loss_and_grads(reference, ids)
    assert relative_error(logits, logits_ref) <= logits_tol
    assert abs(loss.item() - loss_ref.item()) <= logits_tol * abs(loss_ref.item())
    for name in grads_ref:
        assert relative_error(grads[name], grads_ref[name]) <= grads_tol, name


def scan_inputs(batch, d_inner, n_tokens, d_state, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, d_inner, n_tokens, generator=g, dtype=dtype)
    # Δ as the model makes it: softplus of something around the init range, up to ~1
    delta = F.softplus(torch.randn(batch, d_inner, n_tokens, generator=g, dtype=dtype) - 2.0)
    A = -torch.exp(torch.randn(d_inner, d_state, generator=g, dtype=dtype))
    B = torch.randn(batch, n_tokens, d_state, generator=g, dtype=dtype)
    C = torch.randn(batch, n_tokens, d_state, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (u, delta, A, B, C)]


# --- parameterisation ----------------------------------------------------------------------


def test_official_parameterisation_on_a_built_model():
    d_model, d_state = 40, 16
    model = build(d_model=d_model, kernel="chunked")
    config = model.lm.config
    assert config.state_size == d_state and config.conv_kernel == 4 and config.expand == 2
    assert config.time_step_rank == math.ceil(d_model / 16) == 3
    for mixer in mixers(model):
        assert mixer.dt_proj.in_features == 3 and mixer.dt_proj.out_features == 2 * d_model
        dt = F.softplus(mixer.dt_proj.bias.detach())
        assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
        # log-uniform over two decades: both decades are populated among 80 channels
        assert (dt < 1e-2).any() and (dt > 1e-2).any()
        expected_A_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).expand(
            2 * d_model, -1
        )
        torch.testing.assert_close(mixer.A_log.detach(), expected_A_log)
        assert torch.equal(mixer.D.detach(), torch.ones(2 * d_model))
        assert mixer.conv1d.kernel_size == (4,)
    assert model.lm.lm_head.weight is model.lm.backbone.embeddings.weight
    counts = parameter_counts(model)
    assert counts["total"] - counts["non_embedding"] == VOCAB * d_model  # tied head adds nothing
    assert counts["non_embedding"] == mamba_non_embedding_params(d_model, 2, 2, d_state, 4)


def test_dt_range_follows_the_config():
    model = build(kernel="chunked", dt_min=0.01, dt_max=0.02)
    for mixer in mixers(model):
        dt = F.softplus(mixer.dt_proj.bias.detach())
        assert dt.min() >= 0.01 * (1 - 1e-5) and dt.max() <= 0.02 * (1 + 1e-5)


def test_same_seed_same_weights():
    a, b = build(seed=3), build(seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


# --- the chunked scan against the oracle -----------------------------------------------------


@pytest.mark.parametrize(
    "batch, d_inner, n_tokens, d_state, block_elements",
    [
        (1, 8, 64, 16, 1 << 22),  # one block
        (2, 3, 97, 4, 2 * 3 * 4 * 16),  # blocks of 16 tokens, N not a multiple of block or chunk
        (2, 5, 130, 16, 2 * 5 * 16 * 25),  # blocks of 25, chunks of 5, a ragged last block
        (1, 2, 40, 3, 1),  # one token per block
    ],
)
def test_chunked_scan_equals_sequential_oracle(batch, d_inner, n_tokens, d_state, block_elements):
    inputs = scan_inputs(batch, d_inner, n_tokens, d_state)
    grad_y = torch.randn(batch, d_inner, n_tokens, generator=torch.Generator().manual_seed(1))
    y_ref = selective_scan_sequential(*inputs)
    grads_ref = torch.autograd.grad(y_ref, inputs, grad_y)
    y = selective_scan_chunked(*inputs, block_elements=block_elements)
    grads = torch.autograd.grad(y, inputs, grad_y)
    assert relative_error(y, y_ref) <= 1e-4
    for name, g, g_ref in zip("u delta A B C".split(), grads, grads_ref, strict=True):
        assert relative_error(g, g_ref) <= 1e-4, name


def test_chunked_scan_gradcheck_float64():
    inputs = [t.detach().double().requires_grad_() for t in scan_inputs(1, 2, 11, 3)]
    assert torch.autograd.gradcheck(
        lambda *x: selective_scan_chunked(*x, block_elements=2 * 3 * 4), inputs
    )


def test_chunked_scan_is_causal_across_blocks():
    u, delta, A, B, C = (t.detach() for t in scan_inputs(1, 3, 50, 4))
    y = selective_scan_chunked(u, delta, A, B, C, block_elements=3 * 4 * 9)
    t = 31
    u2, B2 = u.clone(), B.clone()
    u2[:, :, t] += 1.0
    B2[:, t] += 1.0
    y2 = selective_scan_chunked(u2, delta, A, B2, C, block_elements=3 * 4 * 9)
    assert torch.equal(y[:, :, :t], y2[:, :, :t])
    assert not torch.allclose(y[:, :, t:], y2[:, :, t:])


# --- the whole model ---------------------------------------------------------------------------


def test_model_chunked_equals_sequential():
    chunked = build(kernel="chunked")
    sequential = build(seed=99, kernel="sequential")
    ids = torch.randint(0, VOCAB, (2, 96), generator=torch.Generator().manual_seed(5))
    assert_same_model(chunked, sequential, ids, 1e-4, 1e-4)
    assert chunked.kernel_description() == KERNEL_CHUNKED_CPU
    assert sequential.kernel_description() == KERNEL_SEQUENTIAL


@pytest.mark.skipif(importlib.util.find_spec("mambapy") is None, reason="mambapy is not installed")
def test_model_chunked_equals_mambapy():
    chunked = build(kernel="chunked")
    mambapy = build(seed=99, kernel="mambapy")
    ids = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(6))
    assert_same_model(chunked, mambapy, ids, 1e-4, 1e-4)
    assert mambapy.kernel_description() == KERNEL_MAMBAPY


def test_auto_on_cpu_runs_the_chunked_scan_and_is_causal():
    model = build(kernel="auto").eval()
    assert model.kernel_description() == KERNEL_CHUNKED_CPU
    ids = torch.randint(0, VOCAB, (1, 80), generator=torch.Generator().manual_seed(7))
    t = 45
    changed = ids.clone()
    changed[0, t] = (ids[0, t] + 1) % VOCAB
    with torch.no_grad():
        logits, logits_changed = model(ids), model(changed)
    assert logits.shape == (1, 80, VOCAB)
    assert model.kernel_description() == KERNEL_CHUNKED_CPU
    torch.testing.assert_close(logits[:, :t], logits_changed[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[:, t:], logits_changed[:, t:])


def test_gradient_checkpointing_keeps_gradients():
    model = build(kernel="chunked")
    ids = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(8))
    _, loss, grads = loss_and_grads(model, ids)
    model.set_grad_checkpointing(True)
    assert model.lm.backbone.gradient_checkpointing
    _, loss_ckpt, grads_ckpt = loss_and_grads(model, ids)
    model.set_grad_checkpointing(False)
    assert not model.lm.backbone.gradient_checkpointing
    assert torch.allclose(loss, loss_ckpt)
    for name in grads:
        assert relative_error(grads_ckpt[name], grads[name]) <= 1e-5, name


def test_cuda_kernels_match_torch_path():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: mamba-ssm's kernels run on CUDA only")
    if not mamba_ssm_available():
        pytest.skip("mamba-ssm (with causal-conv1d) is not installed: pip install fairlm[cuda]")
    cuda_model = build(d_model=64, kernel="cuda").cuda()
    torch_model = build(seed=99, d_model=64, kernel="chunked").cuda()
    ids = torch.randint(0, VOCAB, (2, 512), generator=torch.Generator().manual_seed(9)).cuda()
    assert_same_model(cuda_model, torch_model, ids, 1e-3, 1e-2)
    assert cuda_model.kernel_description() == KERNEL_CUDA


# --- parameter matching --------------------------------------------------------------------------


def test_match_picks_the_integer_expand_that_fits():
    config = make_config(d_model=48, n_layers=3)
    target = mamba_non_embedding_params(48, 3, 3, 16, 4)
    match = match_mamba_size(config, target, VOCAB)
    assert match["expand"] == 3 and match["d_model"] == 48 and match["ratio"] == 1.0


def test_match_falls_back_to_d_model_when_no_expand_fits():
    config = make_config(d_model=48, n_layers=3)
    target = mamba_non_embedding_params(48, 3, 8, 16, 4) * 3  # beyond expand 8
    match = match_mamba_size(config, target, VOCAB)
    assert match["expand"] == 2 and match["d_model"] > 48
    assert match["within_tolerance"] and abs(match["ratio"] - 1) <= 0.05
    assert match["non_embedding"] == mamba_non_embedding_params(match["d_model"], 3, 2, 16, 4)


@pytest.mark.skipif(
    importlib.util.find_spec("fairlm.models.resnet_bk") is None,
    reason="fairlm.models.resnet_bk not written yet",
)
def test_match_params_against_resnet_bk():
    config = make_config(d_model=32, n_layers=2, match_params=True)
    torch.manual_seed(0)
    reference = parameter_counts(build_model("resnet_bk", config, VOCAB))["non_embedding"]
    model = build_model("mamba", config, VOCAB)
    ratio = parameter_counts(model)["non_embedding"] / reference
    assert abs(ratio - 1) <= 0.05
    assert "ResNet-BK" in model.size_note
