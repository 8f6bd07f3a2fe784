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
    grid (cdiv(N, BLOCK_N), SPLIT)  W, walks its K range in BLOCK_K steps, forms the tile
                  ``W + (s·B)·A`` in fp32 registers (a rank-r ``tl.dot`` per step, s·B loaded once
                  for r ≤ 128, else r in 16-wide chunks) and accumulates its squares into partial
                  sums [SPLIT, N] (K split so that small N still fills the GPU; summed by torch,
                  then the square root); no N×K tensor is ever written (PEFT materialises B·A by
                  multiplying an identity matrix, then W + s·B·A, both N×K).
    forward       the LoRA forward kernels with DoRA's epilogue (kernels/lora_forward.py,
                  COL_SCALE / STORE_Z): the GEMM (fused path) or the rank-r update (hybrid
                  path) stores z (rounded to T) and writes ``g ⊙ acc + b``: no pass over y of
                  its own.
backward, fused path: LoRA's B1-B3 (kernels/lora_backward.py, COL_SCALE / COLSUM) read dy and
                  scale each tile by g as it loads (``dz = dy ⊙ g`` rounded to T, as a stored dz
                  would be; never written), and B1, which walks all of N for its row block, also
                  reads z and writes that block's column sums of ``dy ⊙ z`` (fp32 partials
                  [cdiv(M, BLOCK_M), N], summed by torch: no atomics). dm needs no GEMM and no
                  pass of its own.
D2  dy pass       one read of dy and z: ``dz = dy ⊙ g`` (rounded to T) and the column sums
    grid (cdiv(N, BLOCK_N), SPLIT)  ``Σ dy ⊙ z`` of each program's row slab (fp32 partials [SPLIT,
                  N], summed by torch: deterministic). Runs only where the fused backward cannot
                  fold: the hybrid path when dx is needed (cuBLAS's ``dz·W`` reads dz), a trainable
                  W (dW = dzᵀ·x), and the sums alone when only the magnitude needs a gradient.

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
    w_ptr, a_ptr, b_ptr, scale_ptr, part_ptr,
    # sizes
    N, K, R, K_PER_SPLIT,
    # strides
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    # meta-parameters
    ONE_R: tl.constexpr, W_KN: tl.constexpr, PRECISION: tl.constexpr, NUM_STAGES_W: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Partial squared row norms ``part[pid_k, n] = Σ_{k in split} (W + s·B·A)[n, k]²``.
    ONE_R (r ≤ BLOCK_R): the scaled B tile is loaded once and the K loop is the innermost loop
    (so Triton pipelines its W and A loads); else r runs in BLOCK_R chunks inside each K step."""
    acc_dtype = part_ptr.dtype.element_ty
    n_start = tl.program_id(0) * BLOCK_N
    pid_k = tl.program_id(1)
    k_begin = pid_k * K_PER_SPLIT  # a multiple of BLOCK_K
    k_end = tl.minimum(K, k_begin + K_PER_SPLIT)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    mask_n = rn < N - n_start
    w_ptr += tl.cast(n_start, tl.int64) * stride_wn
    b_ptr += tl.cast(n_start, tl.int64) * stride_bn
    scaling = tl.load(scale_ptr).to(acc_dtype)
    sq = tl.zeros((BLOCK_N,), dtype=acc_dtype)
    if ONE_R:
        mask_r = rr < R
        sb = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                     mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(acc_dtype) * scaling
        if W_KN:  # W's N stride is 1 (Conv1D's weight.t()): tiles as [BLOCK_K, BLOCK_N], dᵀ = Aᵀ·(s·B)ᵀ + Wᵀ
            sbt = tl.trans(sb)
            for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=NUM_STAGES_W):
                mask_k = rk < k_end - k0
                wt = tl.load(w_ptr + rn[None, :] * stride_wn + (k0 + rk)[:, None] * stride_wk,
                             mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                at = tl.load(a_ptr + rr[None, :] * stride_ar + (k0 + rk)[:, None] * stride_ak,
                             mask=mask_k[:, None] & mask_r[None, :], other=0.0)
                d = tl.dot(at.to(acc_dtype), sbt, wt.to(acc_dtype), input_precision=PRECISION, out_dtype=acc_dtype)
                sq += tl.sum(d * d, axis=0)
        else:
            for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=NUM_STAGES_W):
                mask_k = rk < k_end - k0
                w = tl.load(w_ptr + rn[:, None] * stride_wn + (k0 + rk)[None, :] * stride_wk,
                            mask=mask_n[:, None] & mask_k[None, :], other=0.0)
                a = tl.load(a_ptr + rr[:, None] * stride_ar + (k0 + rk)[None, :] * stride_ak,
                            mask=mask_r[:, None] & mask_k[None, :], other=0.0)
                d = tl.dot(sb, a.to(acc_dtype), w.to(acc_dtype), input_precision=PRECISION, out_dtype=acc_dtype)
                sq += tl.sum(d * d, axis=1)
    else:
        for k0 in range(k_begin, k_end, BLOCK_K):
            mask_k = rk < k_end - k0
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
    tl.store(part_ptr + tl.cast(pid_k, tl.int64) * N + n_start + rn, sq, mask=mask_n)


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
NORM_WARPS, NORM_STAGES = 4, 3
MAX_ONE_R = 128  # ranks up to this hold s·B in registers (ONE_R); larger ones run in 16-wide chunks


def norm_meta(R, w_kn=False):
    """The row-norm kernel's constexprs for rank R (``w_kn``: W's N stride is 1). The K step
    shrinks as the rank block grows, so that s·B, the A tile's stages and the tf32x3 split fit
    without spills (bench/kernel_resources.py compiles each)."""
    block_r = max(16, triton.next_power_of_2(R))
    if block_r > MAX_ONE_R:
        return dict(ONE_R=False, W_KN=False, BLOCK_N=32, BLOCK_K=128, BLOCK_R=16, NUM_STAGES_W=NORM_STAGES)
    return dict(ONE_R=True, W_KN=w_kn, BLOCK_N=32, BLOCK_K={16: 128, 32: 64, 64: 32, 128: 16}[block_r],
                BLOCK_R=block_r, NUM_STAGES_W=NORM_STAGES)


DY_CONFIG = dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=3)
_INTERPRETER = {"norm": dict(BLOCK_N=64, BLOCK_K=128), "dy": dict(BLOCK_M=64, BLOCK_N=128)}


def _sm_count(device):
    from . import configs
    return configs.sm_count(device)


def dora_norm(weight, lora_A, lora_B, scale):
    """D1: ``‖W + s·B·A‖₂`` per row, ``[N]`` in scale's dtype (fp32, or fp64).

    Args: weight ``[N, K]`` any float dtype and strides; lora_A ``[r, K]``, lora_B ``[N, r]``
    any float dtype; scale: the scaling s as a one-element tensor (its dtype is the result's) on
    weight's device. No N×K temporary: K is split across programs when the N blocks alone would
    not fill the GPU (partial sums of squares ``[SPLIT, N]``, added by torch: deterministic)."""
    N, K = weight.shape
    R = lora_A.shape[0]
    if N == 0 or K == 0:
        return torch.zeros(N, device=weight.device, dtype=scale.dtype)
    interp = is_interpreted(_dora_norm_kernel)
    meta = norm_meta(R, weight.stride(1) != 1 and weight.stride(0) == 1)
    if interp:  # big tiles: fewer interpreted programs (no registers to spare there)
        meta.update(_INTERPRETER["norm"])
    else:
        meta.update(num_warps=NORM_WARPS, num_stages=NORM_STAGES)
    row_blocks, k_blocks = cdiv(N, meta["BLOCK_N"]), cdiv(K, meta["BLOCK_K"])
    # ~4 programs per SM (2 K splits under the interpreter, so that the partial sums are exercised),
    # at least 8 K steps per split
    want = 2 if interp else cdiv(4 * _sm_count(weight.device), row_blocks)
    split = max(1, min(want, k_blocks // (1 if interp else 8)))
    per = cdiv(k_blocks, split) * meta["BLOCK_K"]
    split = cdiv(K, per)
    part = torch.empty((split, N), device=weight.device, dtype=scale.dtype)
    precision = "ieee" if scale.dtype == torch.float64 else "tf32x3"
    _dora_norm_kernel[(row_blocks, split)](
        weight, lora_A, lora_B, scale, part, N, K, R, per,
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        PRECISION=precision, **meta)
    return (part[0] if split == 1 else part.sum(0)).sqrt()


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
