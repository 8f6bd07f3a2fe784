"""Dequantizing a frozen bitsandbytes base weight for the LoRA kernels (QLoRA, LLM.int8()).

Math (bitsandbytes 0.50 layouts; the same bits as its CUDA and CPU kernels)::

    4-bit (NF4 / FP4), W : [N, K], e = n·K + k its row-major element index
      q       : [ceil(N·K / 2)] uint8     two 4-bit codes per byte: element 2i in the high nibble,
                                          2i+1 in the low one
      code    : [16] fp32                 the NF4 or FP4 value of each code (FP4's code 8 is -0.0,
                                          as bitsandbytes' kernels decode it)
      absmax  : [ceil(N·K / BLOCKSIZE)]   per block of BLOCKSIZE consecutive elements, fp32; or,
                                          double-quantized (``compress_statistics``):
                absmax[j] = code2[qabsmax[j]] · absmax2[j // BLOCKSIZE2] + offset
                (qabsmax uint8, code2 [256] fp32, absmax2 fp32, offset fp32: two fp32 roundings,
                never fused into an FMA, as bitsandbytes' two separate operations)
      W[e]    = round_T(code[q_e] · absmax[e // BLOCKSIZE])        one fp32 product, one rounding

    LLM.int8(), W : [N, K]
      CB      : [N, K] int8, SCB : [N] fp32 (row-wise absmax)
      W[n, k] = round_T((CB[n, k] · SCB[n]) · 0.0078740157)        (``int8_vectorwise_dequant``)

Grids: 4-bit ``cdiv(ceil(N·K/8), BLOCK_WORDS)`` programs, each reading BLOCK_WORDS 32-bit words
(8 codes each) and writing a ``[BLOCK_WORDS, 8]`` tile of consecutive outputs (the 16-entry code
table and the absmax of each word's quant block are gathered from L1); int8
``cdiv(N, BLOCK_N)·cdiv(K, BLOCK_K)`` tiles. Both are bandwidth-bound: 0.5 (1) byte read and
``T.itemsize`` bytes written per element.

fastlora.quant feeds the dequantized W, a transient ``[N, K]`` buffer in the compute dtype, to the
fused or hybrid LoRA path (fastlora.dispatch chooses by measurement) and frees it; the backward
dequantizes again for dx. Nothing of size N×K lives between forward and backward.
"""
import torch
import triton
import triton.language as tl

from .launch import LAUNCH_COUNTS, cdiv, is_interpreted

# 1/127 as bitsandbytes writes it (``int8_vectorwise_dequant``), applied in fp32
INT8_RECIPROCAL = tl.constexpr(7.874015718698502e-3)


@triton.jit
def _round_to_out(v, out_ptr, BF16_BY_BITS: tl.constexpr):
    """fp32 ``v`` rounded to nearest-even in the output's dtype. ``BF16_BY_BITS`` (set under the
    interpreter only, whose fp32 -> bf16 cast truncates): the same rounding in integer ops on the
    bit pattern (finite values; a dequantized weight has no inf / NaN). Compiled, the plain cast
    is cvt.rn.bf16.f32, round-to-nearest-even."""
    if out_ptr.dtype.element_ty == tl.bfloat16 and BF16_BY_BITS:
        u = v.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(out_ptr.dtype.element_ty)


@triton.jit
def _dequant_4bit_kernel(q_ptr, code_ptr, absmax_ptr, qabsmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr,
                         n_words, n_out,
                         BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                         BLOCK_WORDS: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    # q read as 32-bit words: word w holds elements 8w..8w+7, byte b of it (little-endian) the
    # elements 8w+2b (high nibble) and 8w+2b+1 (low nibble). The tile is [BLOCK_WORDS, 8]: each
    # row is 8 consecutive outputs (a 16-byte store in 16-bit dtypes) from one word and one
    # quant block (BLOCKSIZE >= 32).
    base = tl.program_id(0).to(tl.int64) * BLOCK_WORDS
    w = base + tl.arange(0, BLOCK_WORDS)
    w_ok = w < n_words
    words = tl.load(q_ptr + w, mask=w_ok, other=0)
    j = tl.arange(0, 8)
    shift = 8 * (j // 2) + 4 * (1 - j % 2)
    nib = (words[:, None] >> shift[None, :]) & 15  # 4 bits: the sign of an arithmetic shift is masked off
    blk = (w * 8) // BLOCKSIZE
    if NESTED:
        qa = tl.load(qabsmax_ptr + blk, mask=w_ok, other=0).to(tl.int32)
        a = tl.load(code2_ptr + qa) * tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=w_ok, other=0.0)
        a = a + tl.load(offset_ptr)
    else:
        a = tl.load(absmax_ptr + blk, mask=w_ok, other=0.0)
    vals = tl.load(code_ptr + nib) * a[:, None]
    e = w[:, None] * 8 + j[None, :]
    tl.store(out_ptr + e, _round_to_out(vals, out_ptr, BF16_BY_BITS), mask=e < n_out)


@triton.jit
def _dequant_int8_kernel(cb_ptr, scb_ptr, out_ptr, N, K, stride_cn, stride_ck, stride_on, stride_ok,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rk = tl.max_contiguous(tl.multiple_of(rk, BLOCK_K), BLOCK_K)
    mask = (rn < N)[:, None] & (rk < K)[None, :]
    rn64 = rn.to(tl.int64)
    cb = tl.load(cb_ptr + rn64[:, None] * stride_cn + rk[None, :] * stride_ck, mask=mask, other=0)
    scb = tl.load(scb_ptr + rn, mask=rn < N, other=0.0)
    w = (cb.to(tl.float32) * scb[:, None]) * INT8_RECIPROCAL
    tl.store(out_ptr + rn64[:, None] * stride_on + rk[None, :] * stride_ok, _round_to_out(w, out_ptr, BF16_BY_BITS), mask=mask)


def _interpreted():
    return is_interpreted(_dequant_4bit_kernel)


def dequantize_4bit(q, code, absmax, shape, blocksize, dtype, qabsmax=None, absmax2=None, code2=None, offset=None,
                    blocksize2=256):
    """``W [N, K]`` in ``dtype`` from bitsandbytes' packed 4-bit codes (see the module doc).

    Args:
        q: uint8, ``ceil(N·K / 2)`` elements (any shape, contiguous). code: ``[16]`` fp32.
        absmax: fp32 per block, or (double quantization) None with ``qabsmax`` uint8,
            ``absmax2`` fp32, ``code2 [256]`` fp32 and ``offset`` a one-element fp32 tensor.
        shape: ``(N, K)``. blocksize: elements per block (a power of two >= 32);
            blocksize2: blocks per second-level block. dtype: fp16 / bf16 / fp32.
    Validation is the caller's (fastlora.quant)."""
    N, K = shape
    out = torch.empty((N, K), dtype=dtype, device=q.device)
    q = q.reshape(-1)
    if q.numel() % 4 or q.data_ptr() % 4:  # read as int32 words: pad a ragged end (N·K not a multiple of 8)
        q = torch.cat([q, q.new_zeros(-q.numel() % 4)]) if q.numel() % 4 else q.clone()
    words = q.view(torch.int32)
    nested = qabsmax is not None
    block_words = 4096 if _interpreted() else 256
    grid = (cdiv(words.numel(), block_words),)
    scales = qabsmax if nested else absmax
    LAUNCH_COUNTS["dequant_4bit"] += 1
    _dequant_4bit_kernel[grid](
        words, code, absmax if not nested else absmax2, scales, absmax2 if nested else scales,
        code2 if nested else code, offset if nested else code, out, words.numel(), N * K,
        BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, NESTED=nested, BLOCK_WORDS=block_words,
        BF16_BY_BITS=_interpreted(), num_warps=4, enable_fp_fusion=False)
    return out


def dequantize_int8(CB, SCB, dtype):
    """``W [N, K]`` in ``dtype`` from LLM.int8() weights ``CB [N, K]`` int8 and row scales
    ``SCB [N]`` fp32 (any strides of CB). Validation is the caller's (fastlora.quant)."""
    N, K = CB.shape
    out = torch.empty((N, K), dtype=dtype, device=CB.device)
    block_n, block_k = (64, 1024) if _interpreted() else (16, 256)
    grid = (cdiv(N, block_n), cdiv(K, block_k))
    LAUNCH_COUNTS["dequant_int8"] += 1
    _dequant_int8_kernel[grid](CB, SCB, out, N, K, CB.stride(0), CB.stride(1), out.stride(0), out.stride(1),
                               BLOCK_N=block_n, BLOCK_K=block_k, BF16_BY_BITS=_interpreted(), num_warps=4, enable_fp_fusion=False)
    return out
