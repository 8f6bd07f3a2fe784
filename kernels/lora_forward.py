"""Fused LoRA linear, forward: the shrink, then either one fused GEMM or cuBLAS + a rank-r update.

Math (PEFT layouts; FIELD.md §1)::

    x  : [M, K]   input, leading dims flattened             compute dtype T (fp16 / bf16 / fp32 / fp64)
    W  : [N, K]   frozen base weight (nn.Linear layout, or the transposed view of a GPT-2 Conv1D)   T
    b  : [N]      optional base bias                         T
    A  : [r, K]   lora_A.weight                              any float dtype
    B  : [N, r]   lora_B.weight                              any float dtype
    m  : [M, K]   dropout mask in {0, 1/(1-p)}, regenerated from the seed (kernels/dropout.py)
    L             the LoRA branch's dtype: every LoRA matmul operand is rounded to L (PEFT: the
                  adapters' dtype outside autocast, e.g. fp32 adapters on a bf16 model; the
                  autocast dtype under autocast)

    F1  shrink        S  = (m ⊙ x)·Aᵀ                  [M, r]  fp32 accumulator, stored fp32 (fp64 for fp64)
    F2  fused GEMM    y  = x·Wᵀ + b + (s·S)·Bᵀ         [M, N]  one fp32 accumulator, rounded to T once
    or, the hybrid path:
        cuBLAS        y  = x·Wᵀ + b                    (torch.addmm, rounded to T: PEFT's base output)
    H1  rank-r update y += (s·S)·Bᵀ                     read-modify-write of y, rounded to T once more

F1 grid ``(cdiv(M, BLOCK_M), SPLIT_K, cdiv(r, BLOCK_R))``: each program streams BLOCK_M rows of x
over its share of K once, applies the dropout mask in registers (x̃ is never written) and either
stores its S tile (SPLIT_K = 1) or adds it with fp32 atomics into a zeroed S (SPLIT_K > 1, chosen
by the launcher so that small M still fills the GPU; never in deterministic mode).

F2 grid ``cdiv(M, BLOCK_M)·cdiv(N, BLOCK_N)`` programs in GROUP_M-grouped order (L2 reuse of W).
The LoRA operands of the tile (S ``[BLOCK_M, r]``, B ``[r, BLOCK_N]``) are loaded into registers
*before* the K loop, so the loop's software pipeline starts at once and their latency hides under
it; after the loop they are rounded to L and one ``tl.dot`` of depth BLOCK_R (r padded to a power
of two ≥ 16, not to BLOCK_K) adds ``(s·S)·Bᵀ`` into the same accumulator. Bias and the cast happen
in the epilogue: there is no separate pass over y.

H1 grid ``cdiv(M, BLOCK_M)·cdiv(N, BLOCK_N)``: the same LoRA tile product added into y, which
cuBLAS has written (one extra read and write of y: the price of cuBLAS's GEMM).

Memory access: every tile is loaded through pointers whose in-tile offsets are contiguous along
the tensor's unit-stride dimension; tails are handled by load masks (``other=0``) that are
constant along that dimension, so loads stay 16-byte vectors and the pipeliner turns the main
loop's loads into ``cp.async`` (the compile-time gates in tests/test_kernel_configs.py read the
SASS to check it). Block bases are int64, in-tile offsets int32 (kernels/launch.py).

Saved for backward (by fastlora.function): x itself, S (M·r fp32) and the seed.

Rounding: the dropped-out input is formed as keep ⊙ x (exact) and the dropout scale multiplies
the accumulated S; S is rounded to L once for the expand; every dot accumulates in fp32 (fp64
for fp64); y is rounded once (fused path) or twice (hybrid: the base output, then the sum,
exactly PEFT's order). fp32 dots of the base GEMM use tf32 iff torch allows it (else ieee). The
LoRA products: in L's own precision when L is the model dtype; for fp32 LoRA math on a 16-bit
model, the shrink splits A into pieces of the model dtype (kernels/precision.py: exact, on tensor
cores) and the GEMM epilogues' fp32 products use tf32x3 (tf32 if torch allows it), far below
the output's 16-bit rounding.
"""
import torch
import triton
import triton.language as tl

from . import configs
from .dropout import dropout_keep
from .precision import dot_pieces, split
from .launch import cdiv, dot_precision, epilogue_lora_args, launch, stream_lora_args, tile_addressable
from .tiling import grouped_tile


@triton.jit(do_not_specialize=["M", "M_KEY"])
def _lora_shrink_kernel(
    # pointers
    x_ptr, a_ptr, s_ptr, seed_ptr,
    # sizes
    M, K, R, K_PER_SPLIT,
    # strides
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    # scalars
    keep_thresh, keep_scale,
    M_KEY,  # bucketed M: tuning key only
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, ATOMIC: tl.constexpr, EVEN_K: tl.constexpr,
    LORA_DTYPE: tl.constexpr, LORA_PRECISION: tl.constexpr, PIECES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    acc_dtype = s_ptr.dtype.element_ty
    # -- program ids: (row block, K split, rank block); int64 block bases, int32 in-tile offsets -
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_r = tl.program_id(2)
    m_start = pid_m * BLOCK_M
    r_start = pid_r * BLOCK_R
    k_begin = pid_k * K_PER_SPLIT  # a multiple of BLOCK_K
    k_end = tl.minimum(K, k_begin + K_PER_SPLIT)
    rm = tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M - m_start
    mask_r = rr < R - r_start
    x_ptrs = x_ptr + (tl.cast(m_start, tl.int64) * stride_xm + tl.cast(k_begin, tl.int64) * stride_xk)
    x_ptrs += rm[:, None] * stride_xm + rk[None, :] * stride_xk
    a_ptrs = a_ptr + (tl.cast(r_start, tl.int64) * stride_ar + tl.cast(k_begin, tl.int64) * stride_ak)
    a_ptrs += rr[None, :] * stride_ar + rk[:, None] * stride_ak
    x_step = tl.cast(stride_xk, tl.int64) * BLOCK_K
    a_step = tl.cast(stride_ak, tl.int64) * BLOCK_K
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    # -- K loop: acc += (keep ⊙ x)·Aᵀ; the dropout scale multiplies the sum -------------------
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=acc_dtype)
    for k0 in range(k_begin, k_end, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            a = tl.load(a_ptrs, mask=mask_r[None, :], other=0.0)
        else:
            mask_k = rk < k_end - k0
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, m_start + rm, k0, keep_thresh, BLOCK_M, BLOCK_K)
            x = x * keep.to(x.dtype)  # exact; a multiply, so NaN·0 = NaN as in torch's dropout
        p0, p1, p2 = split(a, LORA_DTYPE, PIECES)
        acc = dot_pieces(x.to(LORA_DTYPE), p0, p1, p2, acc, True, PIECES, LORA_PRECISION)
        x_ptrs += x_step
        a_ptrs += a_step
    if HAS_DROPOUT:
        acc = acc * keep_scale
    # -- store (or add) the S tile --------------------------------------------------------------
    s_ptrs = s_ptr + tl.cast(m_start, tl.int64) * stride_sm + r_start * stride_sr
    s_ptrs += rm[:, None] * stride_sm + rr[None, :] * stride_sr
    if ATOMIC:
        tl.atomic_add(s_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :], sem="relaxed")
    else:
        tl.store(s_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def rank_update(acc, s_ptr, b_ptr, scaling, R, rm, rn, mask_m, mask_n, stride_sm, stride_sr, stride_bn, stride_br,
                EPI_DTYPE: tl.constexpr, EPI_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                s_first, b_first):
    """``acc + (s·S)·Bᵀ`` for one ``[BLOCK_M, BLOCK_N]`` tile, r in BLOCK_R-deep steps: step 0
    from the prefetched ``s_first [BLOCK_M, BLOCK_R]`` / ``b_first [BLOCK_R, BLOCK_N]``, the others
    (r > BLOCK_R) loaded here. Operands rounded to EPI_DTYPE (fp32 LoRA math: ``tf32x3``, the
    output is rounded to 16 bits after), accumulation in acc's dtype."""
    acc_dtype = acc.dtype
    acc = tl.dot((s_first * scaling).to(EPI_DTYPE), b_first.to(EPI_DTYPE), acc,
                 input_precision=EPI_PRECISION, out_dtype=acc_dtype)
    rr = tl.arange(0, BLOCK_R)
    for r0 in range(BLOCK_R, R, BLOCK_R):
        mask_r = rr < R - r0
        s = tl.load(s_ptr + rm[:, None] * stride_sm + (r0 + rr)[None, :] * stride_sr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        b = tl.load(b_ptr + rn[None, :] * stride_bn + (r0 + rr)[:, None] * stride_br,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot((s * scaling).to(EPI_DTYPE), b.to(EPI_DTYPE), acc, input_precision=EPI_PRECISION,
                     out_dtype=acc_dtype)
    return acc


@triton.jit
def load_rank_block(s_ptr, b_ptr, R, rm, rn, mask_m, mask_n, stride_sm, stride_sr, stride_bn, stride_br,
                    BLOCK_R: tl.constexpr):
    """The first rank block of a tile's LoRA operands: ``S [BLOCK_M, BLOCK_R]``, ``Bᵀ [BLOCK_R, BLOCK_N]``
    (r tail masked with zeros)."""
    rr = tl.arange(0, BLOCK_R)
    mask_r = rr < R
    s = tl.load(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
                mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    b = tl.load(b_ptr + rn[None, :] * stride_bn + rr[:, None] * stride_br,
                mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    return s, b


@triton.jit(do_not_specialize=["M", "M_KEY"])
def _lora_linear_fwd_kernel(
    # pointers
    x_ptr, w_ptr, s_ptr, b_ptr, bias_ptr, y_ptr, scale_ptr, g_ptr, z_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr,
    stride_bn, stride_br, stride_ym, stride_yn, stride_bias,
    # scalars
    M_KEY,  # bucketed M: tuning key only
    # meta-parameters
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EPI_DTYPE: tl.constexpr, EPI_PRECISION: tl.constexpr,
    COL_SCALE: tl.constexpr, STORE_Z: tl.constexpr,  # DoRA (kernels/dora.py): y = g ⊙ z + b, z kept
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    acc_dtype = s_ptr.dtype.element_ty
    # -- program id -> (pid_m, pid_n), GROUP_M row-blocks share a band of W in L2 --------------
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m_start = pid_m * BLOCK_M
    n_start = pid_n * BLOCK_N
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M - m_start
    mask_n = rn < N - n_start
    x_ptr += tl.cast(m_start, tl.int64) * stride_xm
    s_ptr += tl.cast(m_start, tl.int64) * stride_sm
    w_ptr += tl.cast(n_start, tl.int64) * stride_wn
    b_ptr += tl.cast(n_start, tl.int64) * stride_bn

    # -- LoRA operands of the tile: loaded now, used after the K loop --------------------------
    s_first, b_first = load_rank_block(s_ptr, b_ptr, R, rm, rn, mask_m, mask_n, stride_sm, stride_sr,
                                       stride_bn, stride_br, BLOCK_R)

    # -- base GEMM: acc = x·Wᵀ ---------------------------------------------------------------------
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk
    x_step = tl.cast(stride_xk, tl.int64) * BLOCK_K
    w_step = tl.cast(stride_wk, tl.int64) * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            mask_k = rk < K - k0
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        x_ptrs += x_step
        w_ptrs += w_step

    # -- LoRA term into the same accumulator: acc += (s·S)·Bᵀ ------------------------------------
    scaling = tl.load(scale_ptr).to(acc_dtype)  # a device scalar: changing it recompiles nothing
    acc = rank_update(acc, s_ptr, b_ptr, scaling, R, rm, rn, mask_m, mask_n, stride_sm, stride_sr,
                      stride_bn, stride_br, EPI_DTYPE, EPI_PRECISION, BLOCK_R, s_first, b_first)

    # -- epilogue: (DoRA: z kept, column scale g), bias, cast, masked store -------------------
    tile_base = tl.cast(m_start, tl.int64) * stride_ym + tl.cast(n_start, tl.int64) * stride_yn  # z: y's strides
    tile_off = rm[:, None] * stride_ym + rn[None, :] * stride_yn
    mask = mask_m[:, None] & mask_n[None, :]
    if STORE_Z:  # rounded now, stored after y: acc dies before the second store's layout conversion
        z = acc.to(z_ptr.dtype.element_ty)
    if COL_SCALE:
        g = tl.load(g_ptr + n_start + rn, mask=mask_n, other=0.0)
        acc = acc * g.to(acc_dtype)[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + (n_start + rn) * stride_bias, mask=mask_n, other=0.0)
        acc += bias.to(acc_dtype)[None, :]
    tl.store(y_ptr + tile_base + tile_off, acc.to(y_ptr.dtype.element_ty), mask=mask)
    if STORE_Z:
        tl.store(z_ptr + tile_base + tile_off, z, mask=mask)


@triton.jit(do_not_specialize=["M", "M_KEY"])
def _lora_expand_kernel(
    # pointers
    y_ptr, s_ptr, b_ptr, scale_ptr, bias_ptr, g_ptr, z_ptr,
    # sizes
    M, N, R,
    # strides
    stride_ym, stride_yn, stride_sm, stride_sr, stride_bn, stride_br, stride_bias,
    # scalars
    M_KEY,  # bucketed M: tuning key only
    # meta-parameters
    EPI_DTYPE: tl.constexpr, EPI_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, COL_SCALE: tl.constexpr, STORE_Z: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """H1 (hybrid path): ``y += (s·S)·Bᵀ`` in place, y already holding cuBLAS's ``x·Wᵀ + b``;
    DoRA: y holds ``x·Wᵀ`` and becomes ``g ⊙ (y + (s·S)·Bᵀ) + b`` (z, the sum, stored too)."""
    acc_dtype = s_ptr.dtype.element_ty
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m_start = pid_m * BLOCK_M
    n_start = pid_n * BLOCK_N
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    mask_m = rm < M - m_start
    mask_n = rn < N - n_start
    s_ptr += tl.cast(m_start, tl.int64) * stride_sm
    b_ptr += tl.cast(n_start, tl.int64) * stride_bn
    tile_base = tl.cast(m_start, tl.int64) * stride_ym + tl.cast(n_start, tl.int64) * stride_yn  # z: y's strides
    tile_off = rm[:, None] * stride_ym + rn[None, :] * stride_yn
    y_ptrs = y_ptr + tile_base + tile_off
    mask = mask_m[:, None] & mask_n[None, :]
    s_first, b_first = load_rank_block(s_ptr, b_ptr, R, rm, rn, mask_m, mask_n, stride_sm, stride_sr,
                                       stride_bn, stride_br, BLOCK_R)
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    scaling = tl.load(scale_ptr).to(acc_dtype)
    if COL_SCALE:  # loaded before the rank loop (ptxas keeps fewer values alive across it)
        g = tl.load(g_ptr + n_start + rn, mask=mask_n, other=0.0)
    acc = rank_update(y.to(acc_dtype), s_ptr, b_ptr, scaling, R, rm, rn, mask_m, mask_n, stride_sm, stride_sr,
                      stride_bn, stride_br, EPI_DTYPE, EPI_PRECISION, BLOCK_R, s_first, b_first)
    if STORE_Z:
        tl.store(z_ptr + tile_base + tile_off, acc.to(z_ptr.dtype.element_ty), mask=mask)
    if COL_SCALE:
        acc = acc * g.to(acc_dtype)[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + (n_start + rn) * stride_bias, mask=mask_n, other=0.0)
        acc += bias.to(acc_dtype)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def acc_dtype_of(dtype, lora_dtype=None):
    """Accumulator / saved-S dtype: fp64 when the compute (or LoRA) dtype is fp64, else fp32."""
    return torch.float64 if torch.float64 in (dtype, lora_dtype) else torch.float32


def shrink(x, lora_A, lora_dtype, seed, keep_thresh, keep_scale, deterministic):
    """F1: ``S = (m ⊙ x)·Aᵀ`` ``[M, r]`` in the accumulator dtype. Its candidates include a split
    of K (fp32 atomics into a zeroed S) for when the row blocks alone leave the GPU idle; never
    in deterministic mode."""
    M, K = x.shape
    R = lora_A.shape[0]
    device = x.device
    acc = acc_dtype_of(x.dtype, lora_dtype)
    block_r = configs.block_r(R)

    def outputs(meta, trial):
        return dict(s_ptr=(torch.zeros if meta["SPLIT"] > 1 else torch.empty)((M, R), device=device, dtype=acc))

    _, outs = launch(
        "shrink", _lora_shrink_kernel,
        lambda a: (cdiv(M, a["BLOCK_M"]), a["SPLIT"], cdiv(R, block_r)), device, x.element_size(),
        dict(x_ptr=x, a_ptr=lora_A, seed_ptr=seed if seed is not None else lora_A,
             M=M, K=K, R=R,
             stride_xm=x.stride(0), stride_xk=x.stride(1),
             stride_ar=lora_A.stride(0), stride_ak=lora_A.stride(1),
             stride_sm=R, stride_sr=1,
             keep_thresh=keep_thresh, keep_scale=keep_scale, M_KEY=configs.m_key(M),
             HAS_DROPOUT=seed is not None, DETERMINISTIC=deterministic, BLOCK_R=block_r,
             **stream_lora_args(x.dtype, lora_dtype)),
        outputs, fixed=deterministic)
    return outs["s_ptr"]


def lora_linear_fwd(x, weight, lora_A, lora_B, scale, bias=None, seed=None, keep_thresh=0, keep_scale=1.0,
                    lora_dtype=None, path="fused"):
    """Forward on the Triton path. Inputs must already be validated (fastlora.functional does it).

    Args:
        x: ``[M, K]`` (M ≥ 1, any strides), compute dtype T.
        weight: ``[N, K]`` in T, any strides (a transposed view of a ``[K, N]`` tensor is fine).
        bias: ``[N]`` in T, or None.
        lora_A: ``[r, K]``, lora_B: ``[N, r]``, any float dtype (rounded to ``lora_dtype`` in-register).
        scale: the LoRA scaling as a one-element tensor of the accumulator dtype on x's device.
        seed: int64 tensor ``[1]`` on x's device to enable dropout, or None.
        keep_thresh, keep_scale: dropout parameters (see kernels/dropout.py).
        lora_dtype: L, the dtype of the LoRA matmuls' operands (default T); fp64 iff T is fp64.
        path: ``"fused"`` (F1 + F2) or ``"hybrid"`` (F1 + cuBLAS ``addmm`` + H1).

    Returns:
        ``(y [M, N] in T, S [M, r] in fp32, fp64 for fp64)``.
    """
    y, S, _ = forward(x, weight, lora_A, lora_B, scale, bias, seed, keep_thresh, keep_scale, lora_dtype, path)
    return y, S


def forward(x, weight, lora_A, lora_B, scale, bias=None, seed=None, keep_thresh=0, keep_scale=1.0, lora_dtype=None,
            path="fused", g=None, store_z=False):
    """:func:`lora_linear_fwd`, with DoRA's epilogue when ``g`` (``[N]`` in the accumulator
    dtype, contiguous) is given: ``y = g ⊙ z + b`` with ``z = x·Wᵀ + (s·S)·Bᵀ``, and z ``[M, N]``
    in T stored too if ``store_z``. Returns ``(y, S, z or None)``."""
    lora_dtype = lora_dtype or x.dtype
    x, weight, lora_A, lora_B = (tile_addressable(t, n) for t, n in
                                 ((x, "input"), (weight, "weight"), (lora_A, "lora_A"), (lora_B, "lora_B")))
    deterministic = torch.are_deterministic_algorithms_enabled()
    S = shrink(x, lora_A, lora_dtype, seed, keep_thresh, keep_scale, deterministic)
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    device, itemsize = x.device, x.element_size()
    z = torch.empty((M, N), device=device, dtype=x.dtype) if store_z else None
    common = dict(s_ptr=S, b_ptr=lora_B, scale_ptr=scale, g_ptr=g if g is not None else S, M=M, N=N, R=R,
                  stride_sm=S.stride(0), stride_sr=S.stride(1), stride_bn=lora_B.stride(0),
                  stride_br=lora_B.stride(1), M_KEY=configs.m_key(M), BLOCK_R=configs.GEMM_BLOCK_R,
                  COL_SCALE=g is not None, STORE_Z=store_z, **epilogue_lora_args(x.dtype, lora_dtype))
    grid = lambda a: (cdiv(M, a["BLOCK_M"]) * cdiv(N, a["BLOCK_N"]),)  # noqa: E731
    if path == "hybrid":
        # LoRA: cuBLAS adds the bias (PEFT's base output); DoRA: the kernel adds it after the scale
        in_gemm = bias is not None and g is None
        y = torch.addmm(bias, x, weight.t()) if in_gemm else torch.mm(x, weight.t())
        late_bias = bias is not None and not in_gemm
        launch("expand", _lora_expand_kernel, grid, device, itemsize,
               dict(**common, bias_ptr=bias if late_bias else S, stride_bias=bias.stride(0) if late_bias else 0,
                    HAS_BIAS=late_bias, stride_ym=y.stride(0), stride_yn=y.stride(1)),
               lambda meta, trial: dict(y_ptr=y.clone() if trial else y,
                                        z_ptr=(torch.empty_like(y) if trial else z) if store_z else y),
               fixed=deterministic)
        return y, S, z
    y = torch.empty((M, N), device=device, dtype=x.dtype)
    launch("fwd", _lora_linear_fwd_kernel, grid, device, itemsize,
           dict(**common, x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else y, K=K,
                stride_xm=x.stride(0), stride_xk=x.stride(1),
                stride_wn=weight.stride(0), stride_wk=weight.stride(1),
                stride_ym=y.stride(0), stride_yn=y.stride(1),
                stride_bias=bias.stride(0) if bias is not None else 0,
                HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(x.dtype)),
           lambda meta, trial: dict(y_ptr=torch.empty_like(y) if trial else y,
                                    z_ptr=(torch.empty_like(y) if trial else z) if store_z else y),
           fixed=deterministic)
    return y, S, z
