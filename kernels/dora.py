"""DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024; PEFT ``use_dora=True``):
the kernels it adds to LoRA's.

Math (PEFT layouts and order, ``peft/tuners/lora/dora.py``; x̃ the dropped-out LoRA input)::

    m  : [N]      lora_magnitude_vector (trainable)                      any float dtype
    n  = ‖W + s·B·A‖₂ per output row, detached (paper §4.3)              [N]   fp32 (fp64 for fp64)
    g  = m / n                                                           [N]   fp32 (fp64)
    z  = x·Wᵀ + s·(x̃·Aᵀ)·Bᵀ                                             [M, N]
    y  = g ⊙ z + b                      (g scales columns: y[i, j] = g[j]·z[i, j] + b[j])

    backward, given dy [M, N]:
    dz = dy ⊙ g                         then LoRA's backward (kernels/lora_backward.py) on dz:
                                        dS = s·dz·B, dB = s·dzᵀ·S, dA = dSᵀ·x̃, dx = dz·W + m ⊙ (dS·A)
    dm = Σ_M (dy ⊙ z) / n               (g = m/n with n constant)
    db = Σ_M dy

D1  row norm      n = ‖W + s·B·A‖ per row, in one pass over W: each program holds BLOCK_N rows of
    grid cdiv(N, BLOCK_N)   W, walks K in BLOCK_K steps, forms the tile ``W + (s·B)·A`` in fp32
                  registers (a rank-r ``tl.dot`` per step: r in BLOCK_R chunks) and accumulates its
                  squares; no N×K tensor is ever written (PEFT materialises B·A by multiplying an
                  identity matrix, then W + s·B·A, both N×K).
    forward       the LoRA forward kernels with DoRA's epilogue (kernels/lora_forward.py,
                  ``dora_epilogue``): the GEMM (fused path) or the rank-r update (hybrid path)
                  stores z (rounded to T) and writes ``g ⊙ acc + b``: no pass over y of its own.
D2  dy pass       one read of dy and z: ``dz = dy ⊙ g`` (rounded to T, the operand of LoRA's
    grid (cdiv(N, BLOCK_N), SPLIT)  backward) and the column sums ``Σ dy ⊙ z`` of each program's
                  row slab (fp32 partials [SPLIT, N], summed by torch: no atomics, so
                  deterministic); dm needs no GEMM.

Saved for backward beyond LoRA's (x, S, the seed): z ``[M, N]`` in T (only when m needs its
gradient) and n ``[N]``. Dropout: the mask touches the LoRA branch only (the paper's and the
formula above); PEFT's training forward with dropout > 0 also feeds x̃ to the magnitude's share of
the base term (``(g - 1) ⊙ x̃·Wᵀ``, a second base GEMM), which has the same expectation.
"""
import torch
import triton
import triton.language as tl

from .launch import cdiv, is_interpreted


@triton.jit
def _dora_norm_kernel(
    # pointers
    w_ptr, a_ptr, b_ptr, scale_ptr, norm_ptr,
    # sizes
    N, K, R,
    # strides
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    # meta-parameters
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    acc_dtype = norm_ptr.dtype.element_ty
    n_start = tl.program_id(0) * BLOCK_N
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    mask_n = rn < N - n_start
    w_ptr += tl.cast(n_start, tl.int64) * stride_wn
    b_ptr += tl.cast(n_start, tl.int64) * stride_bn
    scaling = tl.load(scale_ptr).to(acc_dtype)
    sq = tl.zeros((BLOCK_N,), dtype=acc_dtype)
    for k0 in range(0, K, BLOCK_K):
        mask_k = rk < K - k0
        w = tl.load(w_ptr + rn[:, None] * stride_wn + (k0 + rk)[None, :] * stride_wk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        d = w.to(acc_dtype)
        for r0 in range(0, R, BLOCK_R):  # d += (s·B)·A over this K step, r in BLOCK_R chunks
            mask_r = rr < R - r0
            b = tl.load(b_ptr + rn[:, None] * stride_bn + (r0 + rr)[None, :] * stride_br,
                        mask=mask_n[:, None] & mask_r[None, :], other=0.0)
            a = tl.load(a_ptr + (r0 + rr)[:, None] * stride_ar + (k0 + rk)[None, :] * stride_ak,
                        mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            d = tl.dot(b.to(acc_dtype) * scaling, a.to(acc_dtype), d, input_precision=PRECISION,
                       out_dtype=acc_dtype)
        sq += tl.sum(d * d, axis=1)
    tl.store(norm_ptr + n_start + rn, tl.sqrt(sq), mask=mask_n)


@triton.jit
def _dora_dy_kernel(
    # pointers
    dy_ptr, z_ptr, g_ptr, dz_ptr, part_ptr,
    # sizes
    M, N, M_PER_SPLIT,
    # strides
    stride_dym, stride_dyn, stride_zm, stride_zn,
    # meta-parameters
    SCALE_DY: tl.constexpr, COLSUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    acc_dtype = g_ptr.dtype.element_ty
    n_start = tl.program_id(0) * BLOCK_N
    pid_s = tl.program_id(1)
    m_begin = pid_s * M_PER_SPLIT
    m_end = tl.minimum(M, m_begin + M_PER_SPLIT)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    mask_n = rn < N - n_start
    if SCALE_DY:
        g = tl.load(g_ptr + n_start + rn, mask=mask_n, other=0.0)
    colsum = tl.zeros((BLOCK_N,), dtype=acc_dtype)
    for m0 in range(m_begin, m_end, BLOCK_M):
        mask = (rm < m_end - m0)[:, None] & mask_n[None, :]
        rows = tl.cast(m0, tl.int64) + rm
        cols = n_start + rn
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0)
        dy = dy.to(acc_dtype)
        if SCALE_DY:  # dz is contiguous [M, N]
            tl.store(dz_ptr + rows[:, None] * N + cols[None, :], (dy * g[None, :]).to(dz_ptr.dtype.element_ty),
                     mask=mask)
        if COLSUM:
            z = tl.load(z_ptr + rows[:, None] * stride_zm + cols[None, :] * stride_zn, mask=mask, other=0.0)
            colsum += tl.sum(dy * z.to(acc_dtype), axis=0)
    if COLSUM:
        tl.store(part_ptr + tl.cast(pid_s, tl.int64) * N + n_start + rn, colsum, mask=mask_n)


# ----------------------------------------------------------------------------------------------
# Launchers (fixed configs: one pass over a big operand each, bandwidth-bound)
# ----------------------------------------------------------------------------------------------
NORM_CONFIG = dict(BLOCK_N=32, BLOCK_K=128, BLOCK_R=16, num_warps=4, num_stages=3)
DY_CONFIG = dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=3)
_INTERPRETER = {"norm": dict(BLOCK_N=64, BLOCK_K=128, BLOCK_R=16), "dy": dict(BLOCK_M=64, BLOCK_N=128)}


def _sm_count(device):
    from . import configs
    return configs.sm_count(device)


def dora_norm(weight, lora_A, lora_B, scale):
    """D1: ``‖W + s·B·A‖₂`` per row, ``[N]`` in scale's dtype (fp32, or fp64).

    Args: weight ``[N, K]`` any float dtype and strides; lora_A ``[r, K]``, lora_B ``[N, r]``
    any float dtype; scale: the scaling s as a one-element tensor (its dtype is the result's) on
    weight's device. No N×K temporary."""
    N, K = weight.shape
    R = lora_A.shape[0]
    norm = torch.empty(N, device=weight.device, dtype=scale.dtype)
    if N == 0:
        return norm
    interp = is_interpreted(_dora_norm_kernel)
    meta = dict(_INTERPRETER["norm"]) if interp else dict(NORM_CONFIG)
    precision = "ieee" if scale.dtype == torch.float64 else "tf32x3"
    _dora_norm_kernel[(cdiv(N, meta["BLOCK_N"]),)](
        weight, lora_A, lora_B, scale, norm, N, K, R,
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        PRECISION=precision, **meta)
    return norm


def dora_dy(dy, z, g, scale_dy=True, colsum=True):
    """D2: ``(dz, colsum)`` from one read of dy (and z): ``dz = dy ⊙ g`` ``[M, N]`` contiguous in
    dy's dtype (None unless ``scale_dy``), ``colsum = Σ_M dy ⊙ z`` ``[N]`` in g's dtype (None unless
    ``colsum``). dy, z: ``[M, N]`` any strides; g: ``[N]`` contiguous fp32 / fp64."""
    M, N = dy.shape
    interp = is_interpreted(_dora_dy_kernel)
    meta = dict(_INTERPRETER["dy"]) if interp else dict(DY_CONFIG)
    col_blocks, row_blocks = cdiv(N, meta["BLOCK_N"]), cdiv(M, meta["BLOCK_M"])
    # row slabs: ~4 programs per SM (2 under the interpreter, so that the partial sums are exercised)
    want = 2 if interp else cdiv(4 * _sm_count(dy.device), col_blocks)
    per = cdiv(row_blocks, max(1, min(want, row_blocks))) * meta["BLOCK_M"]  # rows per slab (M ≥ 1)
    split = cdiv(M, per)
    dz = torch.empty((M, N), device=dy.device, dtype=dy.dtype) if scale_dy else None
    part = torch.empty((split, N), device=dy.device, dtype=g.dtype) if colsum else None
    _dora_dy_kernel[(col_blocks, split)](
        dy, z if colsum else dy, g, dz if scale_dy else dy, part if colsum else g, M, N, per,
        dy.stride(0), dy.stride(1), (z if colsum else dy).stride(0), (z if colsum else dy).stride(1),
        SCALE_DY=scale_dy, COLSUM=colsum, **meta)
    return dz, part.sum(0) if colsum else None
