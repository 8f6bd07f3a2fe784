"""Fused LoRA linear, forward: two launches.

Math (PEFT layouts; FIELD.md §1)::

    x  : [M, K]   input, leading dims flattened          (compute dtype: fp16 / bf16 / fp32 / fp64)
    W  : [N, K]   frozen base weight (nn.Linear layout)   (compute dtype)
    b  : [N]      optional base bias                      (compute dtype)
    A  : [r, K]   lora_A.weight                           (any float dtype, cast in-register)
    B  : [N, r]   lora_B.weight                           (any float dtype, cast in-register)
    m  : [M, K]   dropout mask in {0, 1/(1-p)}, regenerated from the seed (kernels/dropout.py)

    F1  shrink        S = (m ⊙ x)·Aᵀ                     [M, r]  accumulated and stored in fp32 (fp64)
    F2  GEMM over K+r y = x·Wᵀ + b + (s·S)·Bᵀ            [M, N]  in the compute dtype

F1 grid: (cdiv(M, BLOCK_M), cdiv(r, BLOCK_R)); each program streams its BLOCK_M rows of x
once over K and applies the dropout mask in registers (x̃ is never written).
F2 grid: cdiv(M, BLOCK_M)·cdiv(N, BLOCK_N) programs in GROUP_M-grouped order (L2 reuse of W);
the rank-r update (s·S)·Bᵀ *seeds* the fp32 accumulator (r handled as BLOCK_K-wide extra
"K" steps), then the K loop adds x·Wᵀ into the same accumulator; bias and the cast happen in
the epilogue. There is no separate pass over y.

Saved for backward (by fastlora.function): x itself, S (M·r fp32) and the seed. Nothing of size
M·K or M·N is written besides y.

Rounding: operands of every ``tl.dot`` are in the compute dtype (x̃ = m ⊙ x rounded once, like
PEFT's dropout output; s·S rounded once), accumulation is fp32 (fp64 for fp64 inputs), y is
rounded once. fp32 dots use tf32 when the launcher asks for it (torch's allow_tf32 flag).

Limits: r is arbitrary (F1 tiles it by BLOCK_R, F2 loops over it); offsets are int64, so
M·K ≥ 2³¹ is fine; any strides (unit inner strides are specialised by Triton and vectorise).
"""
import torch
import triton
import triton.language as tl

from . import configs
from .dropout import dropout_keep
from .tiling import grouped_tile
from .launch import cdiv, dot_precision, launch, tile_addressable


@triton.jit(do_not_specialize=["M", "M_KEY"])
def _lora_shrink_kernel(
    # pointers
    x_ptr, a_ptr, s_ptr, seed_ptr,
    # sizes
    M, K, R,
    # strides
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    # scalars
    keep_thresh, keep_scale,
    M_KEY,  # bucketed M: autotune key only
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    dtype = x_ptr.dtype.element_ty
    acc_dtype = s_ptr.dtype.element_ty
    # -- program ids; int64 block bases, int32 in-block offsets --------------------------------
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    m_start = pid_m * BLOCK_M
    r_start = pid_r * BLOCK_R
    rm = tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M - m_start
    mask_r = rr < R - r_start
    x_ptrs = x_ptr + tl.cast(m_start, tl.int64) * stride_xm + rm[:, None] * stride_xm + rk[None, :] * stride_xk
    a_ptrs = a_ptr + tl.cast(r_start, tl.int64) * stride_ar + rr[None, :] * stride_ar + rk[:, None] * stride_ak
    x_step = tl.cast(stride_xk, tl.int64) * BLOCK_K
    a_step = tl.cast(stride_ak, tl.int64) * BLOCK_K
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    # -- K loop: acc += (m ⊙ x)·Aᵀ ------------------------------------------------------------
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=acc_dtype)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            a = tl.load(a_ptrs, mask=mask_r[None, :], other=0.0)
        else:
            mask_k = rk < K - k0
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, m_start + rm, k0, keep_thresh, BLOCK_M, BLOCK_K)
            x = (x * tl.where(keep, keep_scale, 0.0)).to(dtype)  # multiply (NaN·0 = NaN, as torch)
        acc = tl.dot(x, a.to(dtype), acc, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        x_ptrs += x_step
        a_ptrs += a_step
    # -- store S ------------------------------------------------------------------------------
    s_ptrs = s_ptr + tl.cast(m_start, tl.int64) * stride_sm + r_start * stride_sr
    s_ptrs += rm[:, None] * stride_sm + rr[None, :] * stride_sr
    tl.store(s_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit(do_not_specialize=["M", "M_KEY"])
def _lora_linear_fwd_kernel(
    # pointers
    x_ptr, w_ptr, s_ptr, b_ptr, bias_ptr, y_ptr, scale_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr,
    stride_bn, stride_br, stride_ym, stride_yn, stride_bias,
    # scalars
    M_KEY,  # bucketed M: autotune key only
    # meta-parameters
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    dtype = x_ptr.dtype.element_ty
    acc_dtype = s_ptr.dtype.element_ty
    # -- program id -> (pid_m, pid_n), GROUP_M row-blocks share a band of W in L2 --------------
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m_start = pid_m * BLOCK_M
    n_start = pid_n * BLOCK_N
    # -- offsets: int64 block bases, int32 in-block offsets. Rows past M and N are clamped to
    # the last valid one (read, never stored), so only the K and r tails need load masks. ------
    rm = tl.minimum(tl.arange(0, BLOCK_M), M - 1 - m_start)
    rn = tl.minimum(tl.arange(0, BLOCK_N), N - 1 - n_start)
    rk = tl.arange(0, BLOCK_K)
    x_ptr += tl.cast(m_start, tl.int64) * stride_xm
    s_ptr += tl.cast(m_start, tl.int64) * stride_sm
    w_ptr += tl.cast(n_start, tl.int64) * stride_wn
    b_ptr += tl.cast(n_start, tl.int64) * stride_bn

    # -- LoRA expand seeds the accumulator: acc = (s·S)·Bᵀ, r in BLOCK_K-wide steps ------------
    scaling = tl.load(scale_ptr).to(acc_dtype)  # a device scalar: changing it recompiles nothing
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    s_ptrs = s_ptr + rm[:, None] * stride_sm + rk[None, :] * stride_sr
    b_ptrs = b_ptr + rn[None, :] * stride_bn + rk[:, None] * stride_br
    for r0 in range(0, R, BLOCK_K):
        mask_r = rk < R - r0
        s = tl.load(s_ptrs, mask=mask_r[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_r[:, None], other=0.0)
        acc = tl.dot((s * scaling).to(dtype), b.to(dtype), acc, input_precision=DOT_PRECISION,
                     out_dtype=acc_dtype)
        s_ptrs += stride_sr * BLOCK_K
        b_ptrs += stride_br * BLOCK_K

    # -- base GEMM into the same accumulator: acc += x·Wᵀ --------------------------------------
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk
    x_step = tl.cast(stride_xk, tl.int64) * BLOCK_K
    w_step = tl.cast(stride_wk, tl.int64) * BLOCK_K
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            mask_k = rk < K - k0
            x = tl.load(x_ptrs, mask=mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        x_ptrs += x_step
        w_ptrs += w_step

    # -- epilogue: bias, cast, masked store ---------------------------------------------------
    cm = tl.arange(0, BLOCK_M)
    cn = tl.arange(0, BLOCK_N)
    mask_n = cn < N - n_start
    if HAS_BIAS:
        bias = tl.load(bias_ptr + (n_start + cn) * stride_bias, mask=mask_n, other=0.0)
        acc += bias.to(acc_dtype)[None, :]
    y_ptrs = y_ptr + tl.cast(m_start, tl.int64) * stride_ym + tl.cast(n_start, tl.int64) * stride_yn
    y_ptrs += cm[:, None] * stride_ym + cn[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(cm < M - m_start)[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
def acc_dtype_of(dtype):
    """Accumulator / saved-S dtype for a compute dtype: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lora_linear_fwd(x, weight, lora_A, lora_B, scale, bias=None, seed=None, keep_thresh=0, keep_scale=1.0):
    """Launch F1 and F2. Inputs must already be validated (fastlora.functional does it).

    Args:
        x: ``[M, K]`` (M ≥ 1, any strides), compute dtype.
        weight: ``[N, K]``, x's dtype. bias: ``[N]`` or None, x's dtype.
        lora_A: ``[r, K]``, lora_B: ``[N, r]``, any float dtype (cast in-register).
        scale: the LoRA scaling as a one-element fp32 tensor on x's device (read by the kernel).
        seed: int64 tensor ``[1]`` on x's device to enable dropout, or None.
        keep_thresh, keep_scale: dropout parameters (see kernels/dropout.py).

    Returns:
        ``(y [M, N] in x.dtype, S [M, r] in fp32, fp64 for fp64 x)``.
    """
    x, weight, lora_A, lora_B = (tile_addressable(t, n) for t, n in
                                 ((x, "input"), (weight, "weight"), (lora_A, "lora_A"), (lora_B, "lora_B")))
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    device, itemsize = x.device, x.element_size()
    S = torch.empty((M, R), device=device, dtype=acc_dtype_of(x.dtype))
    y = torch.empty((M, N), device=device, dtype=x.dtype)
    precision = dot_precision(x.dtype)
    block_r = configs.block_r(R)
    mk = configs.m_key(M)
    launch(
        "shrink", _lora_shrink_kernel,
        lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(R, block_r)), device, itemsize,
        x_ptr=x, a_ptr=lora_A, s_ptr=S, seed_ptr=seed if seed is not None else S,
        M=M, K=K, R=R,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_ar=lora_A.stride(0), stride_ak=lora_A.stride(1),
        stride_sm=S.stride(0), stride_sr=S.stride(1),
        keep_thresh=keep_thresh, keep_scale=keep_scale, M_KEY=mk,
        HAS_DROPOUT=seed is not None, DOT_PRECISION=precision, BLOCK_R=block_r,
    )
    launch(
        "fwd", _lora_linear_fwd_kernel,
        lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),), device, itemsize,
        x_ptr=x, w_ptr=weight, s_ptr=S, b_ptr=lora_B, bias_ptr=bias if bias is not None else y, y_ptr=y,
        scale_ptr=scale,
        M=M, N=N, K=K, R=R,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_sm=S.stride(0), stride_sr=S.stride(1),
        stride_bn=lora_B.stride(0), stride_br=lora_B.stride(1),
        stride_ym=y.stride(0), stride_yn=y.stride(1), stride_bias=bias.stride(0) if bias is not None else 0,
        M_KEY=mk,
        HAS_BIAS=bias is not None, DOT_PRECISION=precision,
    )
    return y, S
