"""Fused LoRA linear, backward: three launches on either path (plus one memset for the atomics).

Math (FIELD.md §1), given dy : [M, N] and what the forward saved (x, S = x̃·Aᵀ, the seed); L is
the LoRA dtype (kernels/lora_forward.py), every LoRA matmul operand is rounded to it::

    B1  dS = s·dy·B                   [M, r]   fp32 (fp64), kept for B2 and B3
        dB = s·dyᵀ·S                  [N, r]   default mode: fp32 atomics, from the same dy tiles
    B2  dx = dy·W + m ⊙ (dS·A)        [M, K]   fused path: one GEMM, rounded to T once
        or, on the hybrid path: dx = dy·W by cuBLAS (torch.mm), and B3 adds m ⊙ (dS·A) into it
    B3  dA = dSᵀ·(m ⊙ x)              [r, K]   fp32 (fp64); deterministic mode: also dB = s·Sᵀ·dy

B1 grid ``(cdiv(M, BLOCK_M), SPLIT, cdiv(r, BLOCK_R))``: one pass over dy. SPLIT = 1: each program
walks the whole N for its rows, so dS is complete in registers and stored; SPLIT > 1 (small M,
so that the grid fills the GPU): each program walks 1/SPLIT of N and adds its dS share with fp32
atomics into a zeroed dS. In the default mode every dy tile also yields its rows' share of dBᵀ,
dyᵀ·S, added with fp32 atomics; programs walk their N range starting at a block that depends
on the row block, so that concurrent programs update different slices of dB.

B2 grid ``cdiv(M, BLOCK_M)·cdiv(K, BLOCK_K)``, GROUP_M-grouped: the tile's LoRA operands (dS
``[BLOCK_M, r]``, A ``[r, BLOCK_K]``) are loaded before the N loop (its pipeline starts at once),
then ``dy·W`` over N; after the loop the LoRA term ``dS·A`` (depth BLOCK_R, r padded to a power of
two ≥ 16), the regenerated mask on it, and the sum into the accumulator: no extra pass over dx.

B3 grid ``(column blocks, rank blocks × products, row slabs)``: a reduction over M of a rank-r
operand times a wide one, ``acc[r, c] = Σ_m G[m, r]·V[m, c]``: G = dS, V = m ⊙ x (the mask
regenerated) for dA; G = s·S, V = dy for dB. Default mode: SPLIT row slabs joined by fp32 atomics
(enough programs to fill the GPU). On the hybrid path (``ADD_DX``) the same program also adds
``m ⊙ (dS·A)`` into the dx tile cuBLAS wrote: one read of x, one read and write of dx, one mask
regeneration per tile for both products (its A tile stays in registers over the M loop).
Under ``torch.use_deterministic_algorithms(True)``: no atomics anywhere; B1 runs one split and skips
dB, B3 runs one slab and computes dA and dB (second read of dy) with plain stores, so every bit
is reproducible (every launch also takes one fixed config).

DoRA (kernels/dora.py; :func:`dora_linear_bwd`): the same launches on ``dz = dy ⊙ g``, with no dz
tensor on the fused path: B1, B2 and B3's deterministic dB scale each dy tile by g as it loads
(COL_SCALE; rounded to dy's dtype, so the results equal those of a stored dz), and B1 also reads
the forward's z and writes its row block's column sums of ``dy ⊙ z`` for the magnitude's gradient
(COLSUM; [cdiv(M, BLOCK_M), N] fp32 partials, first rank block only). The hybrid path's cuBLAS dx
reads dz itself: there kernels/dora.py's D2 writes it.

The workspace [dB | dA] is one flat fp32 buffer: one memset serves both atomic reductions.
Skipped on demand: B1 computes only what is asked (dS needs dx or dA), B2 runs only if the
input needs a grad, B3 only if lora_A's grad (or, deterministically, lora_B's) is needed, or on
the hybrid path, dx's LoRA term.

Memory access as in the forward: unit-stride tile dimensions stay contiguous (a transposed W is
read along N), tails are load masks, never clamped offsets.
"""
import torch
import triton
import triton.language as tl

from . import configs
from .dora import dora_dy
from .dropout import dropout_keep
from .precision import dot_pieces, split
from .launch import cdiv, dot_precision, epilogue_lora_args, launch, stream_lora_args, tile_addressable
from .tiling import grouped_tile


@triton.jit(do_not_specialize=["M", "M_KEY"])
def _lora_bwd_dy_kernel(
    # pointers
    dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr, scale_ptr, g_ptr, z_ptr, cs_ptr,
    # sizes
    M, N, R, N_PER_SPLIT,
    # strides
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr,
    stride_dsm, stride_dsr, stride_dbn, stride_dbr, stride_zm, stride_zn,
    # scalars
    M_KEY,  # bucketed M: tuning key only
    # meta-parameters
    COMPUTE_DS: tl.constexpr, COMPUTE_DB: tl.constexpr, ATOMIC_DS: tl.constexpr, EVEN_N: tl.constexpr,
    COL_SCALE: tl.constexpr, COLSUM: tl.constexpr,
    LORA_DTYPE: tl.constexpr, LORA_PRECISION: tl.constexpr, PIECES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # the launch's num_stages (launch.py): the N loop's, stated
):
    acc_dtype = s_ptr.dtype.element_ty
    scaling = tl.load(scale_ptr).to(acc_dtype)
    # -- program ids: (row block, N split, rank block); int64 block bases, int32 in-tile offsets -
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_r = tl.program_id(2)
    m_start = pid_m * BLOCK_M
    r_start = pid_r * BLOCK_R
    n_begin = pid_n * N_PER_SPLIT  # a multiple of BLOCK_N
    n_end = tl.minimum(N, n_begin + N_PER_SPLIT)
    n_blocks = tl.cdiv(n_end - n_begin, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    rn = tl.arange(0, BLOCK_N)
    mask_m = rm < M - m_start
    mask_r = rr < R - r_start
    dy_ptr += tl.cast(m_start, tl.int64) * stride_dym
    b_ptr += r_start * stride_br
    dy_ptrs = dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn
    b_ptrs = b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br
    if COMPUTE_DB:
        # Rows past M load S = 0, so they add nothing to dB.
        s_ptrs = s_ptr + tl.cast(m_start, tl.int64) * stride_sm + r_start * stride_sr
        s = tl.load(s_ptrs + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        # loop-invariant: split once. dBᵀ = Sᵀ·dy keeps dy in the orientation of the dS product,
        # so both products read the one staged copy of the dy tile (dyᵀ·S made sm_80 load it twice)
        s0, s1, s2 = split(tl.trans(s), LORA_DTYPE, PIECES)
        db_ptrs = db_ptr + r_start * stride_dbr + rn[None, :] * stride_dbn + rr[:, None] * stride_dbr
    if COLSUM:
        # DoRA's Σ_M dy ⊙ z: this row block's column sums, [cdiv(M, BLOCK_M), N] partials, written
        # by the first rank block only (the others do not read z)
        z_ptrs = z_ptr + tl.cast(m_start, tl.int64) * stride_zm + rm[:, None] * stride_zm + rn[None, :] * stride_zn
        cs_ptrs = cs_ptr + tl.cast(pid_m, tl.int64) * N + rn
        # rows / columns this program sums: all for the first rank block, none for the others
        z_rows = rm < tl.where(pid_r == 0, M - m_start, 0)
        cs_cols = tl.where(pid_r == 0, N, 0)
    # -- N loop, from a row-block-dependent start: one read of dy feeds dS and the partial dB ---
    first = pid_m % n_blocks
    acc_ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=acc_dtype)
    # The stage count stated on the loop makes Triton's pipeliner also stage the z tile, which
    # feeds no dot (with a plain range it stayed a synchronous load in the SASS)
    for i in tl.range(0, n_blocks, num_stages=NUM_STAGES):
        j = i + first
        j = tl.where(j >= n_blocks, j - n_blocks, j)
        n0 = n_begin + j * BLOCK_N
        if EVEN_N:
            mask_n = rn < BLOCK_N
        else:
            mask_n = rn < n_end - n0
        dy = tl.load(dy_ptrs + tl.cast(n0, tl.int64) * stride_dyn, mask=mask_m[:, None] & mask_n[None, :],
                     other=0.0)
        if COLSUM:
            z = tl.load(z_ptrs + tl.cast(n0, tl.int64) * stride_zn,
                        mask=z_rows[:, None] & mask_n[None, :], other=0.0)
            tl.store(cs_ptrs + n0, tl.sum(dy.to(acc_dtype) * z.to(acc_dtype), axis=0),
                     mask=mask_n & (rn < cs_cols - n0))
        if COL_SCALE:  # DoRA: dz = dy ⊙ g, rounded to dy's dtype as the unfused dz would be
            g = tl.load(g_ptr + n0 + rn, mask=mask_n, other=0.0)
            dy = (dy.to(acc_dtype) * g[None, :]).to(dy_ptr.dtype.element_ty)
        dy = dy.to(LORA_DTYPE)
        if COMPUTE_DS:
            b = tl.load(b_ptrs + tl.cast(n0, tl.int64) * stride_bn, mask=mask_n[:, None] & mask_r[None, :],
                        other=0.0)
            b0, b1, b2 = split(b, LORA_DTYPE, PIECES)
            acc_ds = dot_pieces(dy, b0, b1, b2, acc_ds, True, PIECES, LORA_PRECISION)
        if COMPUTE_DB:
            part = tl.zeros((BLOCK_R, BLOCK_N), dtype=acc_dtype)
            part = dot_pieces(dy, s0, s1, s2, part, False, PIECES, LORA_PRECISION) * scaling
            tl.atomic_add(db_ptrs + tl.cast(n0, tl.int64) * stride_dbn, part,
                          mask=mask_r[:, None] & mask_n[None, :], sem="relaxed")
    # -- store (or add) dS ----------------------------------------------------------------------
    if COMPUTE_DS:
        ds_ptrs = ds_ptr + tl.cast(m_start, tl.int64) * stride_dsm + r_start * stride_dsr
        ds_ptrs += rm[:, None] * stride_dsm + rr[None, :] * stride_dsr
        if ATOMIC_DS:
            tl.atomic_add(ds_ptrs, acc_ds * scaling, mask=mask_m[:, None] & mask_r[None, :], sem="relaxed")
        else:
            tl.store(ds_ptrs, acc_ds * scaling, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit(do_not_specialize=["M", "M_KEY"])
def _lora_bwd_dx_kernel(
    # pointers
    dy_ptr, w_ptr, ds_ptr, a_ptr, dx_ptr, seed_ptr, g_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dsm, stride_dsr,
    stride_ar, stride_ak, stride_dxm, stride_dxk,
    # scalars
    keep_thresh, keep_scale,
    M_KEY,  # bucketed M: tuning key only
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, EVEN_N: tl.constexpr, COL_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EPI_DTYPE: tl.constexpr, EPI_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    acc_dtype = ds_ptr.dtype.element_ty
    # -- program id -> (pid_m, pid_k), GROUP_M row-blocks share a band of W in L2 --------------
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    m_start = pid_m * BLOCK_M
    k_start = pid_k * BLOCK_K
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    rn = tl.arange(0, BLOCK_N)
    mask_m = rm < M - m_start
    mask_k = rk < K - k_start
    dy_ptr += tl.cast(m_start, tl.int64) * stride_dym
    ds_ptr += tl.cast(m_start, tl.int64) * stride_dsm
    w_ptr += tl.cast(k_start, tl.int64) * stride_wk
    a_ptr += tl.cast(k_start, tl.int64) * stride_ak

    # -- LoRA operands of the tile, loaded now and used after the N loop -----------------------
    rr = tl.arange(0, BLOCK_R)
    ds_ptrs = ds_ptr + rm[:, None] * stride_dsm + rr[None, :] * stride_dsr
    a_ptrs = a_ptr + rr[:, None] * stride_ar + rk[None, :] * stride_ak
    ds = tl.load(ds_ptrs, mask=mask_m[:, None] & (rr < R)[None, :], other=0.0)
    a = tl.load(a_ptrs, mask=(rr < R)[:, None] & mask_k[None, :], other=0.0)

    # -- base GEMM over N: acc = dy·W -----------------------------------------------------------
    dy_ptrs = dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn
    w_ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk
    dy_step = tl.cast(stride_dyn, tl.int64) * BLOCK_N
    w_step = tl.cast(stride_wn, tl.int64) * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=acc_dtype)
    for n0 in range(0, N, BLOCK_N):
        if EVEN_N:
            dy = tl.load(dy_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[None, :], other=0.0)
        else:
            mask_n = rn < N - n0
            dy = tl.load(dy_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        # DoRA: the operand is dz = dy ⊙ g, rounded to dy's dtype (as unfused). g scales the A
        # operand (dy), which Hopper's wgmma may take from registers; scaling W's rows instead
        # would need the B operand, which wgmma reads from shared memory, rewritten there.
        if COL_SCALE:
            if EVEN_N:
                g = tl.load(g_ptr + n0 + rn)
            else:
                g = tl.load(g_ptr + n0 + rn, mask=rn < N - n0, other=0.0)
            dy = (dy.to(acc_dtype) * g[None, :]).to(dy_ptr.dtype.element_ty)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        dy_ptrs += dy_step
        w_ptrs += w_step

    # -- LoRA term m ⊙ (dS·A), r in BLOCK_R-deep steps -------------------------------------------
    lora = tl.dot(ds.to(EPI_DTYPE), a.to(EPI_DTYPE), input_precision=EPI_PRECISION, out_dtype=acc_dtype)
    for r0 in range(BLOCK_R, R, BLOCK_R):
        mask_r = rr < R - r0
        ds = tl.load(ds_ptrs + r0 * stride_dsr, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        a = tl.load(a_ptrs + r0 * stride_ar, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        lora = tl.dot(ds.to(EPI_DTYPE), a.to(EPI_DTYPE), lora, input_precision=EPI_PRECISION,
                      out_dtype=acc_dtype)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        keep = dropout_keep(seed, m_start + rm, k_start, keep_thresh, BLOCK_M, BLOCK_K)
        lora = lora * tl.where(keep, keep_scale, 0.0)  # a multiply, as torch's dropout: NaN·0 = NaN
    acc += lora

    # -- epilogue: cast, masked store -----------------------------------------------------------
    dx_ptrs = dx_ptr + tl.cast(m_start, tl.int64) * stride_dxm + tl.cast(k_start, tl.int64) * stride_dxk
    dx_ptrs += rm[:, None] * stride_dxm + rk[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _rank_reduce(g_ptr, v_ptr, out_ptr, seed_ptr, scale_ptr, a_ptr, dx_ptr, col_ptr, C, R,
                 stride_gm, stride_gr, stride_vm, stride_vc, stride_or, stride_oc,
                 stride_ar, stride_ak, stride_dxm, stride_dxk,
                 keep_thresh, keep_scale, pid_c, pid_r, m_begin, m_end,
                 REDUCE: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr, ATOMIC: tl.constexpr,
                 ADD_DX: tl.constexpr, COL_SCALE: tl.constexpr, LORA_DTYPE: tl.constexpr, LORA_PRECISION: tl.constexpr,
                 PIECES: tl.constexpr, EPI_DTYPE: tl.constexpr, EPI_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """``out[r, c] (+)= scale · Σ_{m in [m_begin, m_end)} G[m, r]·(mask ⊙ V)[m, c]`` for one
    ``[BLOCK_R, BLOCK_K]`` tile (G in the accumulator dtype, V in the compute dtype, operands
    rounded to LORA_DTYPE). With ADD_DX it is accumulated transposed, ``outᵀ = Vᵀ·G``: G then
    enters both this product and dx's ``G·A`` untransposed and its one staged copy serves both
    (a transposed second use made the pipeliner load it again, synchronously, in the SASS);
    without, ``Gᵀ·V`` (Vᵀ as an mma.sync A operand is reloaded synchronously on sm_80). With ``ADD_DX`` (hybrid path; BLOCK_R covers all of r) also
    ``dx[m, c] += mask ⊙ (G·A)[m, c]`` on the same rows and columns, with the same mask;
    ``REDUCE=False`` skips the reduction (dx's term only). ``COL_SCALE``: V's columns are scaled
    by ``col[c]`` as they load, rounded back to V's dtype (DoRA's dz = dy ⊙ g)."""
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
    if ADD_DX:
        a = tl.load(a_ptr + tl.cast(c_start, tl.int64) * stride_ak + rr[:, None] * stride_ar + rc[None, :] * stride_ak,
                    mask=mask_r[:, None] & mask_c[None, :], other=0.0).to(EPI_DTYPE)
        dx_ptrs = dx_ptr + tl.cast(m_begin, tl.int64) * stride_dxm + tl.cast(c_start, tl.int64) * stride_dxk
        dx_ptrs += rm[:, None] * stride_dxm + rc[None, :] * stride_dxk
        dx_step = tl.cast(stride_dxm, tl.int64) * BLOCK_M
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    if COL_SCALE:
        col = tl.load(col_ptr + c_start + rc, mask=mask_c, other=0.0)
    if ADD_DX:
        acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=acc_dtype)
    else:
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=acc_dtype)
    for m0 in range(m_begin, m_end, BLOCK_M):
        mask_m = rm < m_end - m0
        g = tl.load(g_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        if COL_SCALE:
            v = (v.to(acc_dtype) * col[None, :]).to(v_ptr.dtype.element_ty)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, m0 + rm, c_start, keep_thresh, BLOCK_M, BLOCK_K)
        if REDUCE:
            if HAS_DROPOUT:
                v = v * keep.to(v.dtype)  # exact; a multiply, so NaN·0 = NaN as in torch's dropout
            if ADD_DX:
                g0, g1, g2 = split(g, LORA_DTYPE, PIECES)
                acc = dot_pieces(tl.trans(v.to(LORA_DTYPE)), g0, g1, g2, acc, True, PIECES, LORA_PRECISION)
            else:
                g0, g1, g2 = split(tl.trans(g), LORA_DTYPE, PIECES)
                acc = dot_pieces(v.to(LORA_DTYPE), g0, g1, g2, acc, False, PIECES, LORA_PRECISION)
        if ADD_DX:
            d = tl.dot(g.to(EPI_DTYPE), a, input_precision=EPI_PRECISION, out_dtype=acc_dtype)
            if HAS_DROPOUT:
                d = d * tl.where(keep, keep_scale, 0.0)  # a multiply: NaN·0 = NaN
            dx_mask = mask_m[:, None] & mask_c[None, :]
            dx = tl.load(dx_ptrs, mask=dx_mask, other=0.0)
            tl.store(dx_ptrs, (dx.to(acc_dtype) + d).to(dx_ptr.dtype.element_ty), mask=dx_mask)
            dx_ptrs += dx_step
        g_ptrs += g_step
        v_ptrs += v_step
    if REDUCE:
        if HAS_DROPOUT:
            acc = acc * keep_scale
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr).to(acc_dtype)
        out_ptrs = out_ptr + r_start * stride_or + tl.cast(c_start, tl.int64) * stride_oc
        if ADD_DX:
            out_ptrs += rc[:, None] * stride_oc + rr[None, :] * stride_or
            out_mask = mask_c[:, None] & mask_r[None, :]
        else:
            out_ptrs += rr[:, None] * stride_or + rc[None, :] * stride_oc
            out_mask = mask_r[:, None] & mask_c[None, :]
        if ATOMIC:
            tl.atomic_add(out_ptrs, acc, mask=out_mask, sem="relaxed")
        else:
            tl.store(out_ptrs, acc, mask=out_mask)


@triton.jit(do_not_specialize=["M", "M_KEY"])
def _lora_bwd_da_kernel(
    # pointers
    ds_ptr, x_ptr, da_ptr, seed_ptr, s_ptr, dy_ptr, db_ptr, scale_ptr, a_ptr, dx_ptr, g_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_dsm, stride_dsr, stride_xm, stride_xk, stride_dar, stride_dak,
    stride_sm, stride_sr, stride_dym, stride_dyn, stride_dbn, stride_dbr,
    stride_ar, stride_ak, stride_dxm, stride_dxk,
    # scalars
    keep_thresh, keep_scale,
    M_KEY,  # bucketed M: tuning key only
    # meta-parameters
    DO_DA: tl.constexpr, DO_DB: tl.constexpr, ADD_DX: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    COL_SCALE: tl.constexpr, ATOMIC: tl.constexpr, LORA_DTYPE: tl.constexpr, LORA_PRECISION: tl.constexpr, PIECES: tl.constexpr,
    EPI_DTYPE: tl.constexpr, EPI_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # -- program ids: (column block, rank block × product, row slab) -------------------------
    pid_c = tl.program_id(0)
    pid_1 = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_rb = tl.cdiv(R, BLOCK_R)
    pid_r = pid_1 % n_rb
    if (DO_DA or ADD_DX) and DO_DB:
        which = pid_1 // n_rb  # 0: dA and / or dx's LoRA term, 1: dB
    elif DO_DA or ADD_DX:
        which = 0
    else:
        which = 1
    blocks_per_slab = tl.cdiv(tl.cdiv(M, BLOCK_M), tl.num_programs(2))
    m_begin = pid_s * blocks_per_slab * BLOCK_M
    m_end = tl.minimum(M, m_begin + blocks_per_slab * BLOCK_M)
    if which == 0:
        # dA[r, k] = Σ_m dS[m, r]·(m ⊙ x)[m, k]  (+ dx[m, k] += m ⊙ (dS·A)[m, k] on the hybrid path)
        if pid_c * BLOCK_K < K:
            _rank_reduce(ds_ptr, x_ptr, da_ptr, seed_ptr, scale_ptr, a_ptr, dx_ptr, g_ptr, K, R,
                         stride_dsm, stride_dsr, stride_xm, stride_xk, stride_dar, stride_dak,
                         stride_ar, stride_ak, stride_dxm, stride_dxk,
                         keep_thresh, keep_scale, pid_c, pid_r, m_begin, m_end,
                         DO_DA, HAS_DROPOUT, False, ATOMIC, ADD_DX, False, LORA_DTYPE, LORA_PRECISION, PIECES, EPI_DTYPE,
                         EPI_PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)
    else:
        # dBᵀ[r, n] = s·Σ_m S[m, r]·dy[m, n], stored through dB's transposed strides
        if pid_c * BLOCK_K < N:
            _rank_reduce(s_ptr, dy_ptr, db_ptr, seed_ptr, scale_ptr, a_ptr, dx_ptr, g_ptr, N, R,
                         stride_sm, stride_sr, stride_dym, stride_dyn, stride_dbr, stride_dbn,
                         stride_ar, stride_ak, stride_dxm, stride_dxk,
                         keep_thresh, keep_scale, pid_c, pid_r, m_begin, m_end,
                         True, False, True, ATOMIC, False, COL_SCALE, LORA_DTYPE, LORA_PRECISION, PIECES, EPI_DTYPE,
                         EPI_PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
def lora_linear_bwd(dy, x, weight, lora_A, lora_B, S, scale, seed=None, keep_thresh=0, keep_scale=1.0,
                    need_dx=True, need_dA=True, need_dB=True, lora_dtype=None, path="fused", dx_out=None):
    """Launch B1-B3 for what is needed. Inputs must already be validated.

    Args:
        dy: ``[M, N]`` (M ≥ 1, any strides, stride 0 allowed), x's dtype T.
        x, weight, lora_A, lora_B, scale, seed, keep_thresh, keep_scale, lora_dtype: as in the forward.
        S: ``[M, r]`` saved by the forward (fp32; fp64 for fp64).
        path: ``"fused"`` (B1, B2, B3) or ``"hybrid"`` (B1, cuBLAS ``dy·W``, B3 adding dx's LoRA term).
        dx_out: None, or an ``[M, K]`` tensor in T with unit column stride that dx is added into (a
            group of siblings fed one input, fastlora/group.py): the hybrid path's cuBLAS GEMM
            accumulates into it (beta = 1) and B3 adds the LoRA term there, so no M×K temporary; the
            fused path writes dx as usual and adds it (B2 has no accumulating epilogue yet).

    Returns:
        ``(dx, dAB)``: dx ``[M, K]`` in T (None if not needed); dAB, one flat tensor in S's dtype
        holding ``dB [N, r]`` (if need_dB) followed by ``dA [r, K]`` (if need_dA), or None.

    Default mode: dB and dA are reduced over M with fp32 atomics (bits may differ between runs).
    Under ``torch.use_deterministic_algorithms(True)`` no atomics are used and every launch
    takes one fixed config, so results are bitwise reproducible across runs and processes.
    """
    dx, dAB = _backward(dy, x, weight, lora_A, lora_B, S, scale, seed, keep_thresh, keep_scale, need_dx, need_dA,
                        need_dB, lora_dtype, path, dx_out=dx_out if path == "hybrid" else None)[:2]
    if dx_out is not None and dx is not None and dx is not dx_out:
        dx = dx_out.add_(dx)
    return dx, dAB


def _backward(dy, x, weight, lora_A, lora_B, S, scale, seed, keep_thresh, keep_scale, need_dx, need_dA, need_dB,
              lora_dtype, path, g=None, z=None, need_colsum=False, dx_out=None):
    lora_dtype = lora_dtype or x.dtype
    dy, x, weight, lora_A, lora_B = (tile_addressable(t, n) for t, n in
                                     ((dy, "grad_output"), (x, "input"), (weight, "weight"), (lora_A, "lora_A"),
                                      (lora_B, "lora_B")))
    M, N = dy.shape
    K, R = x.shape[1], lora_A.shape[0]
    device, itemsize = x.device, x.element_size()
    acc_dtype = S.dtype
    block_r = configs.block_r(R)
    mk = configs.m_key(M)
    deterministic = torch.are_deterministic_algorithms_enabled()
    need_ds = need_dx or need_dA
    has_dropout = seed is not None
    hybrid = path == "hybrid"
    if hybrid and R > configs.MAX_FULL_RANK:
        raise ValueError(f"path: the hybrid backward needs r <= {configs.MAX_FULL_RANK}, got r = {R}")
    dummy = S.new_empty(1)  # stands in for pointers a launch does not use (never a live tensor)
    stream = stream_lora_args(x.dtype, lora_dtype)
    epi = epilogue_lora_args(x.dtype, lora_dtype)

    # -- DoRA: where g goes (see dora_linear_bwd) ----------------------------------------------
    b1_db = need_dB and not deterministic  # B1 also yields dB (with atomics)
    colsum = None
    if g is not None and hybrid and need_dx:  # cuBLAS reads dz: D2 writes it, with the sums
        dy, colsum = dora_dy(dy, z, g, scale_dy=True, colsum=need_colsum)
        g, need_colsum = None, False
    col_scale = g is not None
    if need_colsum and not (need_ds or b1_db):  # B1 does not run: D2 sums alone
        colsum = dora_dy(dy, z, g, scale_dy=False, colsum=True)[1]
        need_colsum = False
    g_arg = g if col_scale else dummy
    z_arg = tile_addressable(z, "z") if need_colsum else dummy.view(1, 1)

    # -- workspace [dB | dA]: zeroed for the atomics, or written by plain stores ---------------
    n_db, n_da = N * R * need_dB, R * K * need_dA
    dAB = None
    if need_dB or need_dA:
        dAB = (torch.empty if deterministic else torch.zeros)(n_db + n_da, device=device, dtype=acc_dtype)
    dB_acc = dAB[:n_db].view(N, R) if need_dB else dummy.view(1, 1)
    dA_acc = dAB[n_db:].view(R, K) if need_dA else dummy.view(1, 1)

    # -- B1: dS (and, with atomics, dB) from one read of dy -----------------------------------
    dS = dummy.view(1, 1)
    if need_ds or b1_db:
        def b1_outputs(meta, trial):
            ds = dummy.view(1, 1)
            if need_ds:
                ds = (torch.zeros if meta["SPLIT"] > 1 else torch.empty)((M, R), device=device, dtype=acc_dtype)
            cs = torch.empty((cdiv(M, meta["BLOCK_M"]), N), device=device, dtype=acc_dtype) if need_colsum else dummy
            return dict(ds_ptr=ds, db_ptr=(torch.zeros_like(dB_acc) if trial else dB_acc) if b1_db else dummy,
                        cs_ptr=cs)

        _, outs = launch(
            "bwd_dy", _lora_bwd_dy_kernel,
            lambda a: (cdiv(M, a["BLOCK_M"]), a["SPLIT"], cdiv(R, block_r)), device, itemsize,
            dict(dy_ptr=dy, b_ptr=lora_B, s_ptr=S, scale_ptr=scale, g_ptr=g_arg, z_ptr=z_arg,
                 M=M, N=N, R=R,
                 stride_dym=dy.stride(0), stride_dyn=dy.stride(1),
                 stride_bn=lora_B.stride(0), stride_br=lora_B.stride(1),
                 stride_sm=S.stride(0), stride_sr=S.stride(1),
                 stride_dsm=R if need_ds else 1, stride_dsr=1,
                 stride_dbn=dB_acc.stride(0), stride_dbr=dB_acc.stride(1),
                 stride_zm=z_arg.stride(0), stride_zn=z_arg.stride(1),
                 M_KEY=mk, COMPUTE_DS=need_ds, COMPUTE_DB=b1_db, COL_SCALE=col_scale, COLSUM=need_colsum,
                 BLOCK_R=block_r, DETERMINISTIC=deterministic, **stream),
            b1_outputs, fixed=deterministic)
        dS = outs["ds_ptr"]
        if need_colsum:
            colsum = outs["cs_ptr"].sum(0)

    # -- B2: dx = dy·W + m ⊙ (dS·A) (fused), or dx = dy·W by cuBLAS (hybrid) -------------------
    dx = None
    if need_dx and hybrid:
        dx = torch.mm(dy, weight) if dx_out is None else dx_out.addmm_(dy, weight)
    elif need_dx:
        dx = torch.empty((M, K), device=device, dtype=x.dtype)
        launch(
            "bwd_dx", _lora_bwd_dx_kernel,
            lambda a: (cdiv(M, a["BLOCK_M"]) * cdiv(K, a["BLOCK_K"]),), device, itemsize,
            dict(dy_ptr=dy, w_ptr=weight, ds_ptr=dS, a_ptr=lora_A, seed_ptr=seed if has_dropout else dummy,
                 g_ptr=g_arg, M=M, N=N, K=K, R=R,
                 stride_dym=dy.stride(0), stride_dyn=dy.stride(1),
                 stride_wn=weight.stride(0), stride_wk=weight.stride(1),
                 stride_dsm=dS.stride(0), stride_dsr=dS.stride(1),
                 stride_ar=lora_A.stride(0), stride_ak=lora_A.stride(1),
                 stride_dxm=dx.stride(0), stride_dxk=dx.stride(1),
                 keep_thresh=keep_thresh, keep_scale=keep_scale, M_KEY=mk,
                 HAS_DROPOUT=has_dropout, COL_SCALE=col_scale, DOT_PRECISION=dot_precision(x.dtype),
                 BLOCK_R=configs.GEMM_BLOCK_R, **epi),
            lambda meta, trial: dict(dx_ptr=torch.empty_like(dx) if trial else dx), fixed=deterministic)

    # -- B3: dA = dSᵀ·(m ⊙ x) (+ dx's LoRA term on the hybrid path); deterministically dB too ----
    b3_db = need_dB and deterministic
    add_dx = need_dx and hybrid
    if need_dA or b3_db or add_dx:
        products = int(need_dA or add_dx) + int(b3_db)
        widest = max(K if (need_dA or add_dx) else 0, N if b3_db else 0)
        r_block = block_r  # on the hybrid path one block covers all of r (R ≤ MAX_FULL_RANK, checked above)
        dx_arg = dx if add_dx else dummy.view(1, 1)

        def b3_outputs(meta, trial):
            return dict(da_ptr=(torch.zeros_like(dA_acc) if trial else dA_acc) if need_dA else dummy,
                        db_ptr=(torch.zeros_like(dB_acc) if trial else dB_acc) if b3_db else dummy,
                        dx_ptr=dx_arg.clone() if trial and add_dx else dx_arg)

        launch(
            "bwd_da", _lora_bwd_da_kernel,
            lambda a: (cdiv(widest, a["BLOCK_K"]), cdiv(R, r_block) * products, a["SPLIT"]), device, itemsize,
            dict(ds_ptr=dS, x_ptr=x, seed_ptr=seed if has_dropout else dummy, s_ptr=S, dy_ptr=dy,
                 scale_ptr=scale, a_ptr=lora_A, g_ptr=g_arg,
                 M=M, N=N, K=K, R=R,
                 stride_dsm=dS.stride(0), stride_dsr=dS.stride(1),
                 stride_xm=x.stride(0), stride_xk=x.stride(1),
                 stride_dar=dA_acc.stride(0), stride_dak=dA_acc.stride(1),
                 stride_sm=S.stride(0), stride_sr=S.stride(1),
                 stride_dym=dy.stride(0), stride_dyn=dy.stride(1),
                 stride_dbn=dB_acc.stride(0), stride_dbr=dB_acc.stride(1),
                 stride_ar=lora_A.stride(0), stride_ak=lora_A.stride(1),
                 stride_dxm=dx_arg.stride(0), stride_dxk=dx_arg.stride(1),
                 keep_thresh=keep_thresh, keep_scale=keep_scale, M_KEY=mk,
                 DO_DA=need_dA, DO_DB=b3_db, ADD_DX=add_dx, HAS_DROPOUT=has_dropout, COL_SCALE=col_scale and b3_db,
                 BLOCK_R=r_block,
                 DETERMINISTIC=deterministic, WIDEST=widest, PRODUCTS=products, SM_COUNT=configs.sm_count(device),
                 **stream, **epi),
            b3_outputs, fixed=deterministic)
    return dx, dAB, colsum


def dora_linear_bwd(dy, z, g, x, weight, lora_A, lora_B, S, scale, seed=None, keep_thresh=0, keep_scale=1.0,
                    need_dx=True, need_dA=True, need_dB=True, need_dm=True, lora_dtype=None, path="fused"):
    """DoRA's backward (kernels/dora.py's math): LoRA's B1-B3 on ``dz = dy ⊙ g`` and the
    magnitude's column sums ``Σ_M dy ⊙ z``, with no dz tensor where the path allows.

    Fused path: every kernel that reads dy scales its tile by g as it loads it (rounded to dy's
    dtype, as a stored dz would be), and B1, which walks all of N for its row block, also reads
    z and writes the column sums of ``dy ⊙ z`` per row block ([cdiv(M, BLOCK_M), N] fp32
    partials, summed by torch: no atomics); D2 then never runs, unless B1 does not (only the
    magnitude needs a gradient), where D2 computes the sums alone. Hybrid path: cuBLAS's
    ``dz·W`` needs dz itself, so D2 writes it (and the sums) when dx is needed.

    Args: dy ``[M, N]``, z ``[M, N]`` (T, saved by the forward; unused unless need_dm), g ``[N]``
    contiguous in S's dtype; the rest as :func:`lora_linear_bwd`.

    Returns: ``(dx, dAB, colsum)``: as :func:`lora_linear_bwd`, and ``Σ_M dy ⊙ z`` ``[N]`` in S's
    dtype (None unless need_dm).
    """
    return _backward(dy, x, weight, lora_A, lora_B, S, scale, seed, keep_thresh, keep_scale, need_dx, need_dA,
                     need_dB, lora_dtype, path, g=g, z=z, need_colsum=need_dm)
