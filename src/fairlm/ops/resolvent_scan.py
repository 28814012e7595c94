"""Parallel kernels for the diagonal of the resolvent of a tridiagonal operator.

H = H0 + diag(v), H0 the discrete Laplacian (diagonal -2, off-diagonals k = 1), a_i = H_ii - z.
The causal diagonal is G_i = [(H_{0..i,0..i} - z)^-1]_ii = 1 / L_i with the continued fraction
L_0 = a_0, L_i = a_i - k / L_{i-1}. Written on G itself this is the Moebius recurrence

    G_i = 1 / (a_i - G_{i-1}),   G_{-1} = 0,   i.e.  G_i = M_i(G_{i-1}),  M_i = [[0, 1], [-1, a_i]].

With Im z > 0 the forward recurrence is safe: if G_{i-1} lies in the closed upper half plane,
Im(a_i - G_{i-1}) <= -Im z, so |G_i| <= 1 / Im z and G_i lies in the upper half plane again.
A perturbation of G_j reaches G_i multiplied by prod_{k=j+1..i} G_k^2, and prod_{k=j..i} G_k
is an entry of a resolvent (<= 1 / Im z): errors stay bounded. The products of the M_i, by
contrast, grow like |r|^n (|r| up to ~5 for |v| <= 3), so the parallel form rescales every
partial product (a Moebius map does not change when its matrix is scaled).

Parallel form (chunked, chosen by measurement on CPU, see `choose_chunk`):
 1. inside each chunk of C positions, the chunk's composite map (a 2 x 2 matrix), C sequential
    steps vectorised over all chunks and batch rows;
 2. the prefix products of the chunk maps, Hillis-Steele doubling (log2(N / C) levels);
 3. inside each chunk again, the contraction G_i = 1 / (a_i - G_{i-1}) from the exact carry.
Work is O(N); Python-level steps are O(C + log N).

The backward pass is analytic (`ResolventDiagonalFn`): dG_i/dG_{i-1} = G_i^2 and
dG_i/dv_i = -G_i^2, so the adjoint is the reverse linear recurrence
lambda_i = gbar_i + conj(G_{i+1})^2 lambda_{i+1}, itself a chunked affine scan. Products of the
coefficients are bounded (prod_{k=j..i} G_k is an entry of a resolvent, <= 1 / Im z), so the
cumulative products used in the fix-up cannot overflow.
"""

from __future__ import annotations

import math

import torch

LAPLACIAN_DIAGONAL = -2.0

# the chunk products are rescaled at most this many steps apart (fewer for large |a|)
_MAX_RESCALE_INTERVAL = 16


def diagonal_shift(v: torch.Tensor, z: complex) -> torch.Tensor:
    """a_i = H_ii - z as a complex tensor of v's precision (float32 for half inputs)."""
    real = v.to(torch.float64) if v.dtype == torch.float64 else v.to(torch.float32)
    return torch.complex(real + LAPLACIAN_DIAGONAL - z.real, torch.full_like(real, -z.imag))


def choose_chunk(n: int) -> int:
    """Chunk length: a power of two near sqrt(n / 8), at most 64; 1 (plain doubling) for tiny n.

    Measured on a 2-core CPU, forward+backward (ms, C = 1/8/16/32/64/128/256):
    batch 8, N 32768: 2478/110/392/156/46/62/74; batch 1, N 131072: 337/72/69/26/26/43/478.
    Plain Hillis-Steele (C = 1) moves O(N log N) data; long chunks cost 4C Python-level steps.
    """
    if n <= 16:
        return 1
    return int(min(64, 2 ** round(math.log2(math.sqrt(n / 8)))))


def _mobius_prefix_doubling(p, q, r, s):
    """Inclusive prefix products F_j ... F_0 of 2x2 matrices along the last dim (Hillis-Steele).

    The matrices are given by their entries [[p, q], [r, s]]; each partial product is divided
    by its largest entry so that no level can overflow.
    """
    n = p.shape[-1]
    shift = 1
    while shift < n:
        lp, lq, lr, ls = p[..., shift:], q[..., shift:], r[..., shift:], s[..., shift:]
        ep, eq, er, es = p[..., :-shift], q[..., :-shift], r[..., :-shift], s[..., :-shift]
        np_ = lp * ep + lq * er
        nq = lp * eq + lq * es
        nr = lr * ep + ls * er
        ns = lr * eq + ls * es
        scale = _inverse_magnitude(np_, nq, nr, ns)
        p = torch.cat([p[..., :shift], np_ * scale], dim=-1)
        q = torch.cat([q[..., :shift], nq * scale], dim=-1)
        r = torch.cat([r[..., :shift], nr * scale], dim=-1)
        s = torch.cat([s[..., :shift], ns * scale], dim=-1)
        shift *= 2
    return p, q, r, s


def _inverse_magnitude(*entries: torch.Tensor) -> torch.Tensor:
    """1 / (largest |Re| or |Im| among the entries), a real tensor; exact-in-ratio rescaling."""
    biggest = torch.stack([torch.view_as_real(e).abs().amax(-1) for e in entries]).amax(0)
    # all-zero cannot occur (det of a product of M_i is 1), but never divide by zero
    return 1.0 / biggest.clamp_min(torch.finfo(biggest.dtype).tiny)


def causal_green_scan(a: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """G_i = 1 / (a_i - G_{i-1}), G_{-1} = 0, along the last dim of complex `a` (no autograd)."""
    *batch, n = a.shape
    if n == 0:
        return a.clone()
    c = choose_chunk(n) if chunk is None else max(1, min(chunk, n))
    n_chunks = -(-n // c)
    flat = a.reshape(-1, n)
    pad = n_chunks * c - n
    if pad:
        # padding sits after the last real position, so it cannot influence any output
        filler = torch.full((flat.shape[0], pad), -1j, dtype=a.dtype, device=a.device)
        flat = torch.cat([flat, filler], dim=1)
    # [C, rows, n_chunks]: step i of every chunk is one contiguous slice
    steps = flat.reshape(-1, n_chunks, c).permute(2, 0, 1).contiguous()

    carry = _chunk_start_values(steps)
    out = torch.empty_like(steps)
    g = carry
    for i in range(c):
        g = torch.reciprocal(steps[i] - g)
        out[i] = g
    result = out.permute(1, 2, 0).reshape(flat.shape[0], -1)[:, :n]
    return result.reshape(*batch, n)


def _chunk_start_values(steps: torch.Tensor) -> torch.Tensor:
    """G_{-1} seen by each chunk: 0 for the first, the previous chunk's last G otherwise."""
    c, rows, n_chunks = steps.shape
    zeros = torch.zeros((rows, n_chunks), dtype=steps.dtype, device=steps.device)
    if n_chunks == 1:
        return zeros
    # composite map of each chunk: the product M_{C-1} ... M_0 as rows (top, bottom), run as
    # the three-term recurrence bottom' = a * bottom - top, top' = bottom on both columns
    ones = torch.ones_like(zeros)
    top = torch.stack([ones, zeros])  # (p, q)
    bottom = torch.stack([zeros, ones])  # (r, s)
    interval = _rescale_interval(steps)
    for i in range(c):
        top, bottom = bottom, steps[i] * bottom - top
        if (i + 1) % interval == 0 or i == c - 1:
            scale = _inverse_magnitude(top[0], top[1], bottom[0], bottom[1])
            top = top * scale
            bottom = bottom * scale
    p, q, r, s = _mobius_prefix_doubling(top[0], top[1], bottom[0], bottom[1])
    # applying prefix j to G = 0 gives q / s: the G at the end of chunk j
    ends = q / s
    return torch.cat([zeros[:, :1], ends[:, :-1]], dim=1)


def _rescale_interval(steps: torch.Tensor) -> int:
    """Steps between rescalings: entries start <= 1 and grow by at most (max|a| + 1) per step,
    so k steps stay below sqrt(largest float) while (max|a| + 1)^k does."""
    growth = float(steps.abs().max()) + 1.0
    headroom = 0.5 * math.log(torch.finfo(steps.real.dtype).max)
    return int(min(_MAX_RESCALE_INTERVAL, max(1, headroom // math.log(growth))))


def _affine_prefix_doubling(coef: torch.Tensor, offset: torch.Tensor):
    """Inclusive scan of x -> coef * x + offset maps along the last dim (Hillis-Steele)."""
    n = coef.shape[-1]
    shift = 1
    while shift < n:
        new_offset = coef[..., shift:] * offset[..., :-shift] + offset[..., shift:]
        new_coef = coef[..., shift:] * coef[..., :-shift]
        offset = torch.cat([offset[..., :shift], new_offset], dim=-1)
        coef = torch.cat([coef[..., :shift], new_coef], dim=-1)
        shift *= 2
    return coef, offset


def linear_recurrence_scan(coef: torch.Tensor, rhs: torch.Tensor, chunk: int | None = None):
    """x_i = coef_i * x_{i-1} + rhs_i, x_{-1} = 0, along the last dim (chunked, no autograd).

    Caller guarantees the cumulative products of `coef` stay bounded (true for the resolvent
    adjoint); they may underflow to zero, which is then the exact answer to working precision.
    """
    *batch, n = rhs.shape
    if n == 0:
        return rhs.clone()
    c = choose_chunk(n) if chunk is None else max(1, min(chunk, n))
    n_chunks = -(-n // c)
    coef = coef.reshape(-1, n)
    rhs = rhs.reshape(-1, n)
    pad = n_chunks * c - n
    if pad:
        coef = torch.cat([coef, coef.new_zeros(coef.shape[0], pad)], dim=1)
        rhs = torch.cat([rhs, rhs.new_zeros(rhs.shape[0], pad)], dim=1)
    coef_steps = coef.reshape(-1, n_chunks, c).permute(2, 0, 1).contiguous()
    rhs_steps = rhs.reshape(-1, n_chunks, c).permute(2, 0, 1).contiguous()

    local = torch.empty_like(rhs_steps)
    x = torch.zeros_like(rhs_steps[0])
    for i in range(c):
        x = coef_steps[i] * x + rhs_steps[i]
        local[i] = x
    growth = torch.cumprod(coef_steps, dim=0)
    # carry into chunk j: x at the end of chunk j-1, from the scan of the chunk maps
    _, ends = _affine_prefix_doubling(growth[-1], local[-1])
    carry = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], dim=1)
    full = local + growth * carry
    result = full.permute(1, 2, 0).reshape(rhs.shape[0], -1)[:, :n]
    return result.reshape(*batch, n)


# ---------------------------------------------------------------------------------------------
# forward and backward of the two modes


def causal_forward(v: torch.Tensor, z: complex) -> torch.Tensor:
    return causal_green_scan(diagonal_shift(v, z))


def causal_backward(green: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dloss/dv for the causal diagonal (PyTorch's conjugate-Wirtinger convention).

    lambda_i = gbar_i + conj(G_{i+1}^2) lambda_{i+1};  dloss/dv_i = Re(-conj(G_i^2) lambda_i).
    """
    sq_conj = (green * green).conj()
    # run the reverse recurrence forwards on flipped sequences; coef_j links j to j - 1
    coef = torch.flip(sq_conj, dims=[-1])
    coef = torch.cat([torch.zeros_like(coef[..., :1]), coef[..., :-1]], dim=-1)
    adjoint = torch.flip(linear_recurrence_scan(coef, torch.flip(grad, dims=[-1])), dims=[-1])
    return -(sq_conj * adjoint).real


def two_sided_forward(v: torch.Tensor, z: complex):
    """Published G_ii of the full matrix, as 1 / (a_i - G^left_{i-1} - G^right_{i+1}).

    Returns (G, left, right) where left/right are the causal diagonals from each end.
    """
    a = diagonal_shift(v, z)
    left = causal_green_scan(a)
    right = torch.flip(causal_green_scan(torch.flip(a, dims=[-1])), dims=[-1])
    zero = torch.zeros_like(a[..., :1])
    left_prev = torch.cat([zero, left[..., :-1]], dim=-1)
    right_next = torch.cat([right[..., 1:], zero], dim=-1)
    return torch.reciprocal(a - left_prev - right_next), left, right


def two_sided_backward(green, left, right, grad):
    """dG_i = -G_i^2 (dv_i - dleft_{i-1} - dright_{i+1}), then through both causal scans."""
    sq_conj = (green * green).conj()
    pulled = sq_conj * grad
    direct = -pulled.real
    zero = torch.zeros_like(pulled[..., :1])
    grad_left = torch.cat([pulled[..., 1:], zero], dim=-1)  # left_j feeds G_{j+1}
    grad_right = torch.cat([zero, pulled[..., :-1]], dim=-1)  # right_j feeds G_{j-1}
    through_left = causal_backward(left, grad_left)
    through_right = torch.flip(
        causal_backward(torch.flip(right, dims=[-1]), torch.flip(grad_right, dims=[-1])),
        dims=[-1],
    )
    return direct + through_left + through_right


class ResolventDiagonalFn(torch.autograd.Function):
    """G = diag((H - z)^-1) (two-sided) or its causal form, with an analytic backward."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, z: complex, causal: bool):
        if causal:
            green = causal_forward(v, z)
            ctx.save_for_backward(green)
        else:
            green, left, right = two_sided_forward(v, z)
            ctx.save_for_backward(green, left, right)
        ctx.causal = causal
        ctx.input_dtype = v.dtype
        return green

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        saved = ctx.saved_tensors  # unpack once: checkpointing allows a single unpack
        grad = grad.to(saved[0].dtype)
        if ctx.causal:
            grad_v = causal_backward(saved[0], grad)
        else:
            grad_v = two_sided_backward(*saved, grad)
        return grad_v.to(ctx.input_dtype), None, None


def resolvent_diagonal(v: torch.Tensor, z: complex = 1j, causal: bool = True) -> torch.Tensor:
    return ResolventDiagonalFn.apply(v, complex(z), bool(causal))


# ---------------------------------------------------------------------------------------------
# the oracle


def resolvent_diagonal_loop(v: torch.Tensor, z: complex = 1j, causal: bool = True):
    """The same quantities by a Python loop over positions (vectorised over batch only).

    Differentiable by plain autograd. A test oracle and the benchmark's baseline, not the model.
    """
    a = diagonal_shift(v, complex(z))
    n = a.shape[-1]
    left = _loop_causal(a, range(n))
    if causal:
        return left
    right = _loop_causal(a, range(n - 1, -1, -1))
    zero = torch.zeros_like(a[..., :1])
    left_prev = torch.cat([zero, left[..., :-1]], dim=-1)
    right_next = torch.cat([right[..., 1:], zero], dim=-1)
    return 1.0 / (a - left_prev - right_next)


def _loop_causal(a: torch.Tensor, order) -> torch.Tensor:
    values: dict[int, torch.Tensor] = {}
    g = torch.zeros_like(a[..., 0])
    for i in order:
        g = 1.0 / (a[..., i] - g)  # k = 1
        values[i] = g
    if not values:
        return a.clone()
    return torch.stack([values[i] for i in range(a.shape[-1])], dim=-1)
