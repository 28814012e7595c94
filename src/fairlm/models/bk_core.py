"""The BK core: the diagonal of the resolvent G = (H - z)^-1 of H = H0 + diag(v).

H0 is the discrete Laplacian (diagonal -2, off-diagonals 1), v the real potential, z = i * z_imag.

- causal (default): G_i = [(H_{0..i,0..i} - z)^-1]_ii = 1 / L_i, L_0 = a_0, L_i = a_i - 1 / L_{i-1},
  a_i = -2 + v_i - z. It depends on v_0..v_i only, and |G_i| <= 1 / Im z.
- causal=False: the published two-sided G_ii of the full N x N matrix (sees the future),
  computed stably as 1 / (a_i - 1/L_{i-1} - 1/R_{i+1}) with R the same fraction from the right.

`green_diagonal` is the implementation (parallel chunked scan, analytic backward);
`green_diagonal_reference_loop` and `green_diagonal_dense` are references for tests.
"""

from __future__ import annotations

import torch

from fairlm.ops.resolvent_scan import resolvent_diagonal, resolvent_diagonal_loop


def _check_potential(v: torch.Tensor, z: complex) -> complex:
    if v.is_complex():
        raise TypeError("the potential v must be real; got a complex tensor")
    z = complex(z)
    if not z.imag > 0:
        raise ValueError(f"the resolvent needs Im z > 0 to be bounded; got z = {z}")
    return z


def green_diagonal(v: torch.Tensor, z: complex = 1j, causal: bool = True) -> torch.Tensor:
    """Diagonal of the (causal or two-sided) resolvent, shape [..., N] complex.

    float64 v gives complex128; float32 (and half precision, computed in float32) complex64.
    """
    z = _check_potential(v, z)
    return resolvent_diagonal(v, z, causal)


def green_diagonal_reference_loop(v: torch.Tensor, z: complex = 1j, causal: bool = True):
    """The same by a Python loop over positions (autograd through the loop): the test oracle."""
    z = _check_potential(v, z)
    return resolvent_diagonal_loop(v, z, causal)


def green_diagonal_dense(v: torch.Tensor, z: complex = 1j, causal: bool = True) -> torch.Tensor:
    """Reference by torch.linalg.inv of the dense matrices, in complex128. Small N only.

    Causal: position i reads the inverse of the leading (i+1) x (i+1) block, so this costs
    O(N^4); the two-sided diagonal inverts the full matrix once.
    """
    z = _check_potential(v, z)
    v64 = v.detach().to(torch.float64)
    n = v64.shape[-1]
    if not causal:
        return torch.diagonal(torch.linalg.inv(_shifted_operator(v64, z)), dim1=-2, dim2=-1)
    values = []
    for i in range(n):
        block = torch.linalg.inv(_shifted_operator(v64[..., : i + 1], z))
        values.append(block[..., i, i])
    if not values:
        return torch.zeros_like(v64, dtype=torch.complex128)
    return torch.stack(values, dim=-1)


def _shifted_operator(v: torch.Tensor, z: complex) -> torch.Tensor:
    """H0 + diag(v) - z I as a dense complex128 [..., n, n] tensor."""
    n = v.shape[-1]
    ones = torch.ones(max(n - 1, 0), dtype=torch.float64, device=v.device)
    laplacian = torch.diag(ones, 1) + torch.diag(ones, -1)
    h = laplacian + torch.diag_embed(v - 2.0)
    eye = torch.eye(n, dtype=torch.complex128, device=v.device)
    return h.to(torch.complex128) - z * eye
