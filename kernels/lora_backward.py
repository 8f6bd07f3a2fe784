"""Fused LoRA linear, backward: three launches (plus one memset or one small reduction).

Math (FIELD.md §1), given dy : [M, N] and what the forward saved (x, S = x̃·Aᵀ, the seed)::

    B1  dS = s·dy·B                   [M, r]   fp32 (fp64), kept for B2 and B3
        dB = s·dyᵀ·S                  [N, r]   fp32 (fp64) workspace, cast to B's dtype after
    B2  dx = dy·W + m ⊙ (dS·A)        [M, K]   compute dtype
    B3  dA = dSᵀ·(m ⊙ x)              [r, K]   fp32 (fp64) workspace, cast to A's dtype after

B1 grid (cdiv(M, BLOCK_M), cdiv(r, BLOCK_R)): one pass over dy. Each program runs the whole N
loop for its rows, so dS is complete in registers; every dy tile also yields the partial
dBᵀ-tile dyᵀ·S of its rows, summed over row blocks either with fp32 atomics into a zeroed
[N, r] workspace (default) or, under ``torch.use_deterministic_algorithms(True)``, stored per
row block into [cdiv(M, BLOCK_M), N, r] partials that one ``sum(0)`` reduces in a fixed order.

B2 grid cdiv(M, BLOCK_M)·cdiv(K, BLOCK_K), GROUP_M-grouped: the LoRA term dS·A is computed
first (r in BLOCK_N-wide steps), the dropout mask is regenerated for the tile and applied, and
the result seeds the accumulator of the dy·W GEMM over N (no extra pass over dx).

B3 grid (cdiv(K, BLOCK_K), cdiv(r, BLOCK_R), SPLIT): x is re-read, the mask regenerated, and
each program reduces a contiguous slab of rows; SPLIT > 1 slabs meet through atomics. In
deterministic mode SPLIT = 1 and the result is stored directly.

Skipped on demand: B1 computes only what is asked (dS needs dx or dA; dB needs lora_B's grad),
B2 runs only if the input needs a grad, B3 only if lora_A does.
"""
import torch
import triton
import triton.language as tl

from . import configs
from .dropout import dropout_keep
from .launch import cdiv, dot_precision, fixed_meta, launch


@triton.jit(do_not_specialize=["M", "M_KEY"])
def _lora_bwd_dy_kernel(
    # pointers
    dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr, scale_ptr,
    # sizes
    M, N, R,
    # strides
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr,
    stride_dsm, stride_dsr, stride_dbp, stride_dbn, stride_dbr,
    # scalars
    M_KEY,  # bucketed M: autotune key only
    # meta-parameters
    COMPUTE_DS: tl.constexpr, COMPUTE_DB: tl.constexpr, DB_ATOMIC: tl.constexpr, EVEN_N: tl.constexpr,
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
        if not DB_ATOMIC:
            db_ptrs += tl.cast(pid_m, tl.int64) * stride_dbp
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
            db_mask = mask_n[:, None] & mask_r[None, :]
            if DB_ATOMIC:
                tl.atomic_add(db_ptrs, part, mask=db_mask, sem="relaxed")
            else:
                tl.store(db_ptrs, part, mask=db_mask)
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
    # -- program id -> (pid_m, pid_k), grouped ------------------------------------------------
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    num_pid_in_group = GROUP_M * num_pid_k
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_k = (pid % num_pid_in_group) // group_size_m
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


@triton.jit(do_not_specialize=["M", "M_KEY"])
def _lora_bwd_da_kernel(
    # pointers
    ds_ptr, x_ptr, da_ptr, seed_ptr,
    # sizes
    M, K, R,
    # strides
    stride_dsm, stride_dsr, stride_xm, stride_xk, stride_dar, stride_dak,
    # scalars
    keep_thresh, keep_scale,
    M_KEY,  # bucketed M: autotune key only
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, DA_ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    dtype = x_ptr.dtype.element_ty
    acc_dtype = ds_ptr.dtype.element_ty
    # -- program ids: (column block, rank block, row slab) ------------------------------------
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    blocks_per_slab = tl.cdiv(tl.cdiv(M, BLOCK_M), tl.num_programs(2))
    m_begin = pid_s * blocks_per_slab * BLOCK_M
    m_end = min(M, m_begin + blocks_per_slab * BLOCK_M)
    k_start = pid_k * BLOCK_K
    r_start = pid_r * BLOCK_R
    # -- offsets ------------------------------------------------------------------------------
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    mask_k = rk < K - k_start
    mask_r = rr < R - r_start
    ds_ptrs = ds_ptr + tl.cast(m_begin, tl.int64) * stride_dsm + r_start * stride_dsr
    ds_ptrs += rm[:, None] * stride_dsm + rr[None, :] * stride_dsr
    x_ptrs = x_ptr + tl.cast(m_begin, tl.int64) * stride_xm + tl.cast(k_start, tl.int64) * stride_xk
    x_ptrs += rm[:, None] * stride_xm + rk[None, :] * stride_xk
    ds_step = tl.cast(stride_dsm, tl.int64) * BLOCK_M
    x_step = tl.cast(stride_xm, tl.int64) * BLOCK_M
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    # -- M loop over the slab: acc += dSᵀ·(m ⊙ x) ---------------------------------------------
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=acc_dtype)
    for m0 in range(m_begin, m_end, BLOCK_M):
        mask_m = rm < m_end - m0
        ds = tl.load(ds_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, m0 + rm, k_start, keep_thresh, BLOCK_M, BLOCK_K)
            x = (x * tl.where(keep, keep_scale, 0.0)).to(dtype)  # multiply (NaN·0 = NaN, as torch)
        acc = tl.dot(tl.trans(ds.to(dtype)), x, acc, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        ds_ptrs += ds_step
        x_ptrs += x_step
    # -- epilogue -----------------------------------------------------------------------------
    da_ptrs = da_ptr + r_start * stride_dar + tl.cast(k_start, tl.int64) * stride_dak
    da_ptrs += rr[:, None] * stride_dar + rk[None, :] * stride_dak
    da_mask = mask_r[:, None] & mask_k[None, :]
    if DA_ATOMIC:
        tl.atomic_add(da_ptrs, acc, mask=da_mask, sem="relaxed")
    else:
        tl.store(da_ptrs, acc, mask=da_mask)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
def _slab_count(M, K, R, meta, block_r, device):
    """B3 row slabs: enough programs to fill the GPU (~2 per SM), never more than row blocks."""
    if device.type == "cuda":
        programs_wanted = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter: a few slabs, so that tests exercise the cross-slab atomics
        programs_wanted = 4
    tiles = cdiv(K, meta["BLOCK_K"]) * cdiv(R, block_r)
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
        One buffer, so that one memset (or one reduction) serves both.

    Reductions over M (dB in B1, dA in B3) use fp32 atomics, unless
    ``torch.are_deterministic_algorithms_enabled()``: then dB partials are summed in a fixed
    order and B3 runs unsplit, so results are bitwise reproducible.
    """
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

    # -- workspace: [dB | dA], zeroed for atomics, or filled by stores and one fixed-order sum --
    dS = torch.empty((M, R), device=device, dtype=acc_dtype) if need_ds else S
    n_db, n_da = N * R * need_dB, R * K * need_dA
    dAB = None
    if need_dB or need_dA:
        dAB = (torch.empty if deterministic else torch.zeros)(n_db + n_da, device=device, dtype=acc_dtype)
    dA_acc = dAB[n_db:].view(R, K) if need_dA else None
    if need_dB and deterministic:
        bm = fixed_meta("bwd_dy", _lora_bwd_dy_kernel, device, itemsize)["BLOCK_M"]
        db = torch.empty((cdiv(M, bm), N, R), device=device, dtype=acc_dtype)
    elif need_dB:
        db = dAB[:n_db].view(1, N, R)
    else:
        db = S.view(1, M, R)  # unused

    # -- B1: dS and dB from one read of dy --------------------------------------------------
    if need_ds or need_dB:
        launch(
            "bwd_dy", _lora_bwd_dy_kernel,
            lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(R, block_r)), device, itemsize,
            fixed=deterministic,
            dy_ptr=dy, b_ptr=lora_B, s_ptr=S, ds_ptr=dS, db_ptr=db, scale_ptr=scale,
            M=M, N=N, R=R,
            stride_dym=dy.stride(0), stride_dyn=dy.stride(1),
            stride_bn=lora_B.stride(0), stride_br=lora_B.stride(1),
            stride_sm=S.stride(0), stride_sr=S.stride(1),
            stride_dsm=dS.stride(0), stride_dsr=dS.stride(1),
            stride_dbp=db.stride(0), stride_dbn=db.stride(1), stride_dbr=db.stride(2),
            M_KEY=mk,
            COMPUTE_DS=need_ds, COMPUTE_DB=need_dB, DB_ATOMIC=not deterministic,
            DOT_PRECISION=precision, BLOCK_R=block_r,
        )
    if need_dB and deterministic:
        torch.sum(db, 0, out=dAB[:n_db].view(N, R))

    # -- B2: dx = dy·W + m ⊙ (dS·A) ------------------------------------------------------------
    dx = None
    if need_dx:
        dx = torch.empty((M, K), device=device, dtype=x.dtype)
        launch(
            "bwd_dx", _lora_bwd_dx_kernel,
            lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_K"]),), device, itemsize,
            dy_ptr=dy, w_ptr=weight, ds_ptr=dS, a_ptr=lora_A, dx_ptr=dx,
            seed_ptr=seed if has_dropout else dS,
            M=M, N=N, K=K, R=R,
            stride_dym=dy.stride(0), stride_dyn=dy.stride(1),
            stride_wn=weight.stride(0), stride_wk=weight.stride(1),
            stride_dsm=dS.stride(0), stride_dsr=dS.stride(1),
            stride_ar=lora_A.stride(0), stride_ak=lora_A.stride(1),
            stride_dxm=dx.stride(0), stride_dxk=dx.stride(1),
            keep_thresh=keep_thresh, keep_scale=keep_scale, M_KEY=mk,
            HAS_DROPOUT=has_dropout, DOT_PRECISION=precision,
        )

    # -- B3: dA = dSᵀ·(m ⊙ x) ------------------------------------------------------------------
    if need_dA:
        if deterministic:
            grid = lambda meta: (cdiv(K, meta["BLOCK_K"]), cdiv(R, block_r), 1)  # noqa: E731
        else:
            grid = lambda meta: (cdiv(K, meta["BLOCK_K"]), cdiv(R, block_r),  # noqa: E731
                                 _slab_count(M, K, R, meta, block_r, device))
        launch(
            "bwd_da", _lora_bwd_da_kernel, grid, device, itemsize,
            ds_ptr=dS, x_ptr=x, da_ptr=dA_acc, seed_ptr=seed if has_dropout else dS,
            M=M, K=K, R=R,
            stride_dsm=dS.stride(0), stride_dsr=dS.stride(1),
            stride_xm=x.stride(0), stride_xk=x.stride(1),
            stride_dar=dA_acc.stride(0), stride_dak=dA_acc.stride(1),
            keep_thresh=keep_thresh, keep_scale=keep_scale, M_KEY=mk,
            HAS_DROPOUT=has_dropout, DA_ATOMIC=not deterministic, DOT_PRECISION=precision,
            BLOCK_R=block_r,
        )
    return dx, dAB
