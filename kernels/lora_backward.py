"""Fused LoRA linear, backward: three launches (plus one memset in the default mode).

Math (FIELD.md §1), given dy : [M, N] and what the forward saved (x, S = x̃·Aᵀ, the seed)::

    B1  dS = s·dy·B                   [M, r]   fp32 (fp64), kept for B2 and B3
        dB = s·dyᵀ·S                  [N, r]   default mode: fp32 atomics, from the same dy tiles
    B2  dx = dy·W + m ⊙ (dS·A)        [M, K]   compute dtype
    B3  dA = dSᵀ·(m ⊙ x)              [r, K]   fp32 (fp64); deterministic mode: also dB = s·Sᵀ·dy

B1 grid (cdiv(M, BLOCK_M), cdiv(r, BLOCK_R)): one pass over dy. Each program runs the whole N
loop for its rows, so dS is complete in registers; in the default mode every dy tile also
yields its rows' share of dBᵀ, dyᵀ·S, added with fp32 atomics into a zeroed workspace.

B2 grid cdiv(M, BLOCK_M)·cdiv(K, BLOCK_K), GROUP_M-grouped: the LoRA term dS·A is computed
first (r in BLOCK_N-wide steps), the dropout mask is regenerated for the tile and applied, and
the result seeds the accumulator of the dy·W GEMM over N (no extra pass over dx).

B3 grid (column blocks, rank blocks × products, row slabs): a reduction over M of a rank-r
operand times a wide one, ``acc[r, c] = Σ_m G[m, r]·V[m, c]``: G = dS, V = m ⊙ x (the mask
regenerated) for dA; G = s·S, V = dy for dB. Default mode: dA only, SPLIT row slabs joined by
fp32 atomics (enough programs to fill the GPU). Under ``torch.use_deterministic_algorithms(True)``:
no atomics anywhere; B1 skips dB, B3 runs one slab and computes dA and dB (second read of dy)
with plain stores, so every bit is reproducible (the launches also use one fixed config).

The workspace [dB | dA] is one flat fp32 buffer: one memset serves both atomic reductions.
Skipped on demand: B1 computes only what is asked (dS needs dx or dA), B2 runs only if the
input needs a grad, B3 only if lora_A's grad (or, deterministically, lora_B's) is needed.
"""
import torch
import triton
import triton.language as tl

from . import configs
from .dropout import dropout_keep
from .tiling import grouped_tile
from .launch import cdiv, dot_precision, launch, tile_addressable


@triton.jit(do_not_specialize=["M", "M_KEY"])
def _lora_bwd_dy_kernel(
    # pointers
    dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr, scale_ptr,
    # sizes
    M, N, R,
    # strides
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr,
    stride_dsm, stride_dsr, stride_dbn, stride_dbr,
    # scalars
    M_KEY,  # bucketed M: autotune key only
    # meta-parameters
    COMPUTE_DS: tl.constexpr, COMPUTE_DB: tl.constexpr, EVEN_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    dtype = dy_ptr.dtype.element_ty
    acc_dtype = s_ptr.dtype.element_ty
    scaling = tl.load(scale_ptr).to(acc_dtype)
    # -- program ids; int64 block bases, int32 in-block offsets --------------------------------
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    m_start = pid_m * BLOCK_M
    r_start = pid_r * BLOCK_R
    rm = tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    rn = tl.arange(0, BLOCK_N)
    mask_m = rm < M - m_start
    mask_r = rr < R - r_start
    dy_ptrs = dy_ptr + tl.cast(m_start, tl.int64) * stride_dym + rm[:, None] * stride_dym + rn[None, :] * stride_dyn
    b_ptrs = b_ptr + r_start * stride_br + rn[:, None] * stride_bn + rr[None, :] * stride_br
    dy_step = tl.cast(stride_dyn, tl.int64) * BLOCK_N
    b_step = tl.cast(stride_bn, tl.int64) * BLOCK_N
    if COMPUTE_DB:
        # Rows past M load S = 0, so they add nothing to dB.
        s_ptrs = s_ptr + tl.cast(m_start, tl.int64) * stride_sm + r_start * stride_sr
        s = tl.load(s_ptrs + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(dtype)
        db_ptrs = db_ptr + r_start * stride_dbr + rn[:, None] * stride_dbn + rr[None, :] * stride_dbr
        db_step = tl.cast(stride_dbn, tl.int64) * BLOCK_N
    # -- N loop: one read of dy feeds dS and the partial dB ------------------------------------
    acc_ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=acc_dtype)
    for n0 in range(0, N, BLOCK_N):
        if EVEN_N:
            mask_n = rn < BLOCK_N
        else:
            mask_n = rn < N - n0
        dy = tl.load(dy_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        if COMPUTE_DS:
            b = tl.load(b_ptrs, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
            acc_ds = tl.dot(dy, b.to(dtype), acc_ds, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        if COMPUTE_DB:
            part = tl.dot(tl.trans(dy), s, input_precision=DOT_PRECISION, out_dtype=acc_dtype) * scaling
            tl.atomic_add(db_ptrs, part, mask=mask_n[:, None] & mask_r[None, :], sem="relaxed")
            db_ptrs += db_step
        dy_ptrs += dy_step
        b_ptrs += b_step
    # -- store dS -----------------------------------------------------------------------------
    if COMPUTE_DS:
        ds_ptrs = ds_ptr + tl.cast(m_start, tl.int64) * stride_dsm + r_start * stride_dsr
        ds_ptrs += rm[:, None] * stride_dsm + rr[None, :] * stride_dsr
        tl.store(ds_ptrs, acc_ds * scaling, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit(do_not_specialize=["M", "M_KEY"])
def _lora_bwd_dx_kernel(
    # pointers
    dy_ptr, w_ptr, ds_ptr, a_ptr, dx_ptr, seed_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dsm, stride_dsr,
    stride_ar, stride_ak, stride_dxm, stride_dxk,
    # scalars
    keep_thresh, keep_scale,
    M_KEY,  # bucketed M: autotune key only
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    dtype = dy_ptr.dtype.element_ty
    acc_dtype = ds_ptr.dtype.element_ty
    # -- program id -> (pid_m, pid_k), GROUP_M row-blocks share a band of W in L2 --------------
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    m_start = pid_m * BLOCK_M
    k_start = pid_k * BLOCK_K
    # -- offsets: rows past M / columns past K are clamped (read, never stored); only the N and
    # r tails need load masks ------------------------------------------------------------------
    rm = tl.minimum(tl.arange(0, BLOCK_M), M - 1 - m_start)
    rk = tl.minimum(tl.arange(0, BLOCK_K), K - 1 - k_start)
    rn = tl.arange(0, BLOCK_N)
    dy_ptr += tl.cast(m_start, tl.int64) * stride_dym
    ds_ptr += tl.cast(m_start, tl.int64) * stride_dsm
    w_ptr += tl.cast(k_start, tl.int64) * stride_wk
    a_ptr += tl.cast(k_start, tl.int64) * stride_ak

    # -- LoRA term m ⊙ (dS·A) seeds the accumulator -------------------------------------------
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=acc_dtype)
    ds_ptrs = ds_ptr + rm[:, None] * stride_dsm + rn[None, :] * stride_dsr
    a_ptrs = a_ptr + rn[:, None] * stride_ar + rk[None, :] * stride_ak
    for r0 in range(0, R, BLOCK_N):
        mask_r = rn < R - r0
        ds = tl.load(ds_ptrs, mask=mask_r[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=mask_r[:, None], other=0.0)
        acc = tl.dot(ds.to(dtype), a.to(dtype), acc, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        ds_ptrs += stride_dsr * BLOCK_N
        a_ptrs += stride_ar * BLOCK_N
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        keep = dropout_keep(seed, m_start + tl.arange(0, BLOCK_M), k_start, keep_thresh, BLOCK_M, BLOCK_K)
        acc = acc * tl.where(keep, keep_scale, 0.0)  # a multiply, as torch's dropout: NaN·0 = NaN

    # -- base GEMM over N: acc += dy·W ----------------------------------------------------------
    dy_ptrs = dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn
    w_ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk
    dy_step = tl.cast(stride_dyn, tl.int64) * BLOCK_N
    w_step = tl.cast(stride_wn, tl.int64) * BLOCK_N
    for n0 in range(0, N, BLOCK_N):
        if EVEN_N:
            dy = tl.load(dy_ptrs)
            w = tl.load(w_ptrs)
        else:
            mask_n = rn < N - n0
            dy = tl.load(dy_ptrs, mask=mask_n[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        dy_ptrs += dy_step
        w_ptrs += w_step

    # -- epilogue: cast, masked store -----------------------------------------------------------
    cm = tl.arange(0, BLOCK_M)
    ck = tl.arange(0, BLOCK_K)
    dx_ptrs = dx_ptr + tl.cast(m_start, tl.int64) * stride_dxm + tl.cast(k_start, tl.int64) * stride_dxk
    dx_ptrs += cm[:, None] * stride_dxm + ck[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty),
             mask=(cm < M - m_start)[:, None] & (ck < K - k_start)[None, :])


@triton.jit
def _rank_reduce(g_ptr, v_ptr, out_ptr, seed_ptr, scale_ptr, C, R,
                 stride_gm, stride_gr, stride_vm, stride_vc, stride_or, stride_oc,
                 keep_thresh, keep_scale, pid_c, pid_r, m_begin, m_end,
                 HAS_DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr, ATOMIC: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """out[r, c] (+)= scale · Σ_{m in [m_begin, m_end)} G[m, r]·(mask ⊙ V)[m, c] for one
    [BLOCK_R, BLOCK_K] tile; G is fp32/fp64, V the compute dtype, out G's dtype."""
    dtype = v_ptr.dtype.element_ty
    acc_dtype = g_ptr.dtype.element_ty
    c_start = pid_c * BLOCK_K
    r_start = pid_r * BLOCK_R
    rm = tl.arange(0, BLOCK_M)
    rc = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    mask_c = rc < C - c_start
    mask_r = rr < R - r_start
    g_ptrs = g_ptr + tl.cast(m_begin, tl.int64) * stride_gm + r_start * stride_gr
    g_ptrs += rm[:, None] * stride_gm + rr[None, :] * stride_gr
    v_ptrs = v_ptr + tl.cast(m_begin, tl.int64) * stride_vm + tl.cast(c_start, tl.int64) * stride_vc
    v_ptrs += rm[:, None] * stride_vm + rc[None, :] * stride_vc
    g_step = tl.cast(stride_gm, tl.int64) * BLOCK_M
    v_step = tl.cast(stride_vm, tl.int64) * BLOCK_M
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=acc_dtype)
    for m0 in range(m_begin, m_end, BLOCK_M):
        mask_m = rm < m_end - m0
        g = tl.load(g_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, m0 + rm, c_start, keep_thresh, BLOCK_M, BLOCK_K)
            v = (v * tl.where(keep, keep_scale, 0.0)).to(dtype)  # multiply (NaN·0 = NaN, as torch)
        acc = tl.dot(tl.trans(g.to(dtype)), v, acc, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        g_ptrs += g_step
        v_ptrs += v_step
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr).to(acc_dtype)
    out_ptrs = out_ptr + r_start * stride_or + tl.cast(c_start, tl.int64) * stride_oc
    out_ptrs += rr[:, None] * stride_or + rc[None, :] * stride_oc
    out_mask = mask_r[:, None] & mask_c[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=out_mask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc, mask=out_mask)


@triton.jit(do_not_specialize=["M", "M_KEY"])
def _lora_bwd_da_kernel(
    # pointers
    ds_ptr, x_ptr, da_ptr, seed_ptr, s_ptr, dy_ptr, db_ptr, scale_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_dsm, stride_dsr, stride_xm, stride_xk, stride_dar, stride_dak,
    stride_sm, stride_sr, stride_dym, stride_dyn, stride_dbn, stride_dbr,
    # scalars
    keep_thresh, keep_scale,
    M_KEY,  # bucketed M: autotune key only
    # meta-parameters
    DO_DA: tl.constexpr, DO_DB: tl.constexpr, HAS_DROPOUT: tl.constexpr, ATOMIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # -- program ids: (column block, rank block × product, row slab) -------------------------
    pid_c = tl.program_id(0)
    pid_1 = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_rb = tl.cdiv(R, BLOCK_R)
    pid_r = pid_1 % n_rb
    if DO_DA and DO_DB:
        which = pid_1 // n_rb  # 0: dA, 1: dB
    elif DO_DA:
        which = 0
    else:
        which = 1
    blocks_per_slab = tl.cdiv(tl.cdiv(M, BLOCK_M), tl.num_programs(2))
    m_begin = pid_s * blocks_per_slab * BLOCK_M
    m_end = min(M, m_begin + blocks_per_slab * BLOCK_M)
    if which == 0:
        # dA[r, k] = Σ_m dS[m, r]·(m ⊙ x)[m, k]
        if pid_c * BLOCK_K < K:
            _rank_reduce(ds_ptr, x_ptr, da_ptr, seed_ptr, scale_ptr, K, R,
                         stride_dsm, stride_dsr, stride_xm, stride_xk, stride_dar, stride_dak,
                         keep_thresh, keep_scale, pid_c, pid_r, m_begin, m_end,
                         HAS_DROPOUT, False, ATOMIC, DOT_PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)
    else:
        # dBᵀ[r, n] = s·Σ_m S[m, r]·dy[m, n], stored through dB's transposed strides
        if pid_c * BLOCK_K < N:
            _rank_reduce(s_ptr, dy_ptr, db_ptr, seed_ptr, scale_ptr, N, R,
                         stride_sm, stride_sr, stride_dym, stride_dyn, stride_dbr, stride_dbn,
                         keep_thresh, keep_scale, pid_c, pid_r, m_begin, m_end,
                         False, True, ATOMIC, DOT_PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
def _slab_count(M, C, R, meta, block_r, products, device):
    """B3 row slabs: enough programs to fill the GPU (~2 per SM), never more than row blocks."""
    if device.type == "cuda":
        programs_wanted = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter: a few slabs, so that tests exercise the cross-slab atomics
        programs_wanted = 4
    tiles = cdiv(C, meta["BLOCK_K"]) * cdiv(R, block_r) * products
    return max(1, min(cdiv(programs_wanted, tiles), cdiv(M, meta["BLOCK_M"])))


def lora_linear_bwd(dy, x, weight, lora_A, lora_B, S, scale, seed=None, keep_thresh=0, keep_scale=1.0,
                    need_dx=True, need_dA=True, need_dB=True):
    """Launch B1-B3 for what is needed. Inputs must already be validated.

    Args:
        dy: ``[M, N]`` (M ≥ 1, any strides, stride 0 allowed), x's dtype.
        x, weight, lora_A, lora_B, scale, seed, keep_thresh, keep_scale: as in the forward.
        S: ``[M, r]`` saved by the forward (fp32; fp64 for fp64 x).

    Returns:
        ``(dx, dAB)``: dx ``[M, K]`` in x.dtype (None if not needed); dAB, one flat tensor in S's
        dtype holding ``dB [N, r]`` (if need_dB) followed by ``dA [r, K]`` (if need_dA), or None.

    Default mode: dB and dA are reduced over M with fp32 atomics (bits may differ between runs).
    Under ``torch.use_deterministic_algorithms(True)`` no atomics are used and every launch
    takes one fixed config, so results are bitwise reproducible across runs and processes.
    """
    dy, x, weight, lora_A, lora_B = (tile_addressable(t, n) for t, n in
                                     ((dy, "grad_output"), (x, "input"), (weight, "weight"), (lora_A, "lora_A"),
                                      (lora_B, "lora_B")))
    M, N = dy.shape
    K, R = x.shape[1], lora_A.shape[0]
    device, itemsize = x.device, x.element_size()
    acc_dtype = S.dtype
    precision = dot_precision(x.dtype)
    block_r = configs.block_r(R)
    mk = configs.m_key(M)
    deterministic = torch.are_deterministic_algorithms_enabled()
    need_ds = need_dx or need_dA
    has_dropout = seed is not None
    dummy = S.new_empty(1)  # stands in for pointers a launch does not use (never a live tensor)

    # -- workspace [dB | dA]: zeroed for the atomics, or written by plain stores ---------------
    n_db, n_da = N * R * need_dB, R * K * need_dA
    dAB = None
    if need_dB or need_dA:
        dAB = (torch.empty if deterministic else torch.zeros)(n_db + n_da, device=device, dtype=acc_dtype)
    dB_acc = dAB[:n_db].view(N, R) if need_dB else dummy.view(1, 1)
    dA_acc = dAB[n_db:].view(R, K) if need_dA else dummy.view(1, 1)
    dS = torch.empty((M, R), device=device, dtype=acc_dtype) if need_ds else dummy.view(1, 1)
    b1_db = need_dB and not deterministic

    # -- B1: dS (and, with atomics, dB) from one read of dy -----------------------------------
    if need_ds or b1_db:
        launch(
            "bwd_dy", _lora_bwd_dy_kernel,
            lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(R, block_r)), device, itemsize, fixed=deterministic,
            dy_ptr=dy, b_ptr=lora_B, s_ptr=S, ds_ptr=dS, db_ptr=dB_acc if b1_db else dummy, scale_ptr=scale,
            M=M, N=N, R=R,
            stride_dym=dy.stride(0), stride_dyn=dy.stride(1),
            stride_bn=lora_B.stride(0), stride_br=lora_B.stride(1),
            stride_sm=S.stride(0), stride_sr=S.stride(1),
            stride_dsm=dS.stride(0), stride_dsr=dS.stride(1),
            stride_dbn=dB_acc.stride(0), stride_dbr=dB_acc.stride(1),
            M_KEY=mk,
            COMPUTE_DS=need_ds, COMPUTE_DB=b1_db, DOT_PRECISION=precision, BLOCK_R=block_r,
        )

    # -- B2: dx = dy·W + m ⊙ (dS·A) ------------------------------------------------------------
    dx = None
    if need_dx:
        dx = torch.empty((M, K), device=device, dtype=x.dtype)
        launch(
            "bwd_dx", _lora_bwd_dx_kernel,
            lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_K"]),), device, itemsize,
            fixed=deterministic,
            dy_ptr=dy, w_ptr=weight, ds_ptr=dS, a_ptr=lora_A, dx_ptr=dx, seed_ptr=seed if has_dropout else dummy,
            M=M, N=N, K=K, R=R,
            stride_dym=dy.stride(0), stride_dyn=dy.stride(1),
            stride_wn=weight.stride(0), stride_wk=weight.stride(1),
            stride_dsm=dS.stride(0), stride_dsr=dS.stride(1),
            stride_ar=lora_A.stride(0), stride_ak=lora_A.stride(1),
            stride_dxm=dx.stride(0), stride_dxk=dx.stride(1),
            keep_thresh=keep_thresh, keep_scale=keep_scale, M_KEY=mk,
            HAS_DROPOUT=has_dropout, DOT_PRECISION=precision,
        )

    # -- B3: dA = dSᵀ·(m ⊙ x), and deterministically dB = s·(Sᵀ·dy)ᵀ ---------------------------
    b3_db = need_dB and deterministic
    if need_dA or b3_db:
        products = int(need_dA) + int(b3_db)
        widest = max(K if need_dA else 0, N if b3_db else 0)
        if deterministic:
            grid = lambda meta: (cdiv(widest, meta["BLOCK_K"]), cdiv(R, block_r) * products, 1)  # noqa: E731
        else:
            grid = lambda meta: (cdiv(widest, meta["BLOCK_K"]), cdiv(R, block_r) * products,  # noqa: E731
                                 _slab_count(M, widest, R, meta, block_r, products, device))
        launch(
            "bwd_da", _lora_bwd_da_kernel, grid, device, itemsize, fixed=deterministic,
            # only what this launch writes is passed live: the autotuner zeroes da_ptr and db_ptr
            # between trials, and dB may already hold B1's atomics
            ds_ptr=dS, x_ptr=x, da_ptr=dA_acc if need_dA else dummy, seed_ptr=seed if has_dropout else dummy,
            s_ptr=S, dy_ptr=dy, db_ptr=dB_acc if b3_db else dummy, scale_ptr=scale,
            M=M, N=N, K=K, R=R,
            stride_dsm=dS.stride(0), stride_dsr=dS.stride(1),
            stride_xm=x.stride(0), stride_xk=x.stride(1),
            stride_dar=dA_acc.stride(0), stride_dak=dA_acc.stride(1),
            stride_sm=S.stride(0), stride_sr=S.stride(1),
            stride_dym=dy.stride(0), stride_dyn=dy.stride(1),
            stride_dbn=dB_acc.stride(0), stride_dbr=dB_acc.stride(1),
            keep_thresh=keep_thresh, keep_scale=keep_scale, M_KEY=mk,
            DO_DA=need_dA, DO_DB=b3_db, HAS_DROPOUT=has_dropout, ATOMIC=not deterministic,
            DOT_PRECISION=precision, BLOCK_R=block_r,
        )
    return dx, dAB
