"""The BK core against dense inverses, its loop oracle, gradcheck, and long-sequence stability."""

import pytest
import torch

from fairlm.models.bk_core import (
    green_diagonal,
    green_diagonal_dense,
    green_diagonal_reference_loop,
)
from fairlm.ops.resolvent_scan import causal_green_scan, diagonal_shift


def random_potential(*shape, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.empty(*shape, dtype=dtype).uniform_(-3.0, 3.0, generator=generator)


def relative_error(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 16, 33, 100, 257, 512])
def test_two_sided_matches_dense_inverse(n):
    v = random_potential(2, n, seed=n)
    want = green_diagonal_dense(v, 1j, causal=False)
    assert relative_error(green_diagonal(v, 1j, causal=False), want) <= 1e-9


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 40])
def test_causal_matches_every_leading_submatrix(n):
    v = random_potential(2, n, seed=100 + n)
    want = green_diagonal_dense(v, 0.5j, causal=True)
    assert relative_error(green_diagonal(v, 0.5j, causal=True), want) <= 1e-9


@pytest.mark.parametrize("n", [129, 512])
def test_causal_matches_leading_submatrices_at_long_lengths(n):
    v = random_potential(n, seed=200 + n)
    got = green_diagonal(v, 1j, causal=True)
    for i in [0, 1, n // 3, n // 2 + 1, n - 2, n - 1]:
        # the causal G_i is the last diagonal entry of the leading (i+1) block's inverse
        want = green_diagonal_dense(v[: i + 1], 1j, causal=False)[-1]
        assert abs((got[i] - want) / want).item() <= 1e-9


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [1, 2, 3, 8, 64])
def test_scan_equals_loop_oracle_for_every_chunking(causal, chunk):
    v = random_potential(3, 1000, seed=chunk)
    want = green_diagonal_reference_loop(v, 0.8j, causal)
    if causal:
        got = causal_green_scan(diagonal_shift(v, 0.8j), chunk=chunk)
    else:
        got = green_diagonal(v, 0.8j, causal=False)
    assert relative_error(got, want) <= 1e-12


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [1, 2, 5, 23])
def test_gradcheck(causal, n):
    v = random_potential(2, n, seed=n).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: green_diagonal(x, 0.7j, causal), (v,))


@pytest.mark.parametrize("causal", [True, False])
def test_analytic_backward_matches_autograd_through_the_loop(causal):
    v = random_potential(2, 3000, seed=5).requires_grad_()
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(2, 3000, dtype=torch.complex128, generator=generator)
    (green_diagonal_reference_loop(v, 0.5j, causal) * weights).real.sum().backward()
    want = v.grad.clone()
    v.grad = None
    (green_diagonal(v, 0.5j, causal) * weights).real.sum().backward()
    assert relative_error(v.grad, want) <= 1e-10


def test_dtypes_and_shapes():
    v32 = random_potential(2, 3, 10, dtype=torch.float32)
    assert green_diagonal(v32).dtype == torch.complex64
    assert green_diagonal(v32.double()).dtype == torch.complex128
    assert green_diagonal(v32).shape == (2, 3, 10)
    with pytest.raises(ValueError):
        green_diagonal(v32, z=-1j)


def test_causal_output_ignores_the_future():
    v = random_potential(300, seed=9)
    changed = v.clone()
    changed[150:] = -v[150:]
    causal_before = green_diagonal(v)[:150]
    assert torch.equal(green_diagonal(changed)[:150], causal_before)
    two_sided = green_diagonal(changed, causal=False)[:150] - green_diagonal(v, causal=False)[:150]
    assert two_sided.abs().max() > 1e-6


N_LONG = 131072


@pytest.mark.parametrize(
    "name",
    ["constant_minus", "constant_plus", "random", "alternating"],
)
def test_stable_at_131072_in_float32(name):
    potentials = {
        "constant_minus": torch.full((N_LONG,), -3.0),
        "constant_plus": torch.full((N_LONG,), 3.0),
        "random": random_potential(N_LONG, dtype=torch.float32, seed=3),
        "alternating": 3.0 * (-1.0) ** torch.arange(N_LONG, dtype=torch.float32),
    }
    v = potentials[name].requires_grad_()
    z_imag = 1.0
    green = green_diagonal(v, 1j * z_imag, causal=True)
    assert green.dtype == torch.complex64
    assert torch.isfinite(torch.view_as_real(green)).all()
    assert green.abs().max().item() <= (1.0 / z_imag) * (1 + 1e-6)
    # a branch that is silently off would be all zeros; the bound |G| >= 1/(|a| + 1/Im z) holds
    assert green.abs().min().item() > 0.1
    torch.cat([green.real, green.imag]).sum().backward()
    assert torch.isfinite(v.grad).all()
    two_sided = green_diagonal(v.detach(), 1j * z_imag, causal=False)
    assert torch.isfinite(torch.view_as_real(two_sided)).all()
    assert two_sided.abs().max().item() <= (1.0 / z_imag) * (1 + 1e-6)
    # float32 agrees with the float64 oracle on a long prefix
    prefix = 4096
    oracle = green_diagonal_reference_loop(v.detach()[:prefix].double(), 1j * z_imag)
    assert (green[:prefix].to(torch.complex128) - oracle).abs().max().item() < 1e-5


def test_non_finite_potential_surfaces_instead_of_being_masked():
    v = torch.zeros(300)
    v[100] = float("nan")
    green = green_diagonal(v)
    assert torch.isfinite(torch.view_as_real(green[:100])).all()  # the past is untouched
    assert torch.isnan(green[100:]).all()  # no NaN -> 0 filter hides it
    assert torch.isnan(green_diagonal(v, causal=False)).all()
