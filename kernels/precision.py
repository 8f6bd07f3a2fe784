"""fp32 LoRA matmuls on 16-bit tensor cores, exactly: the operand split.

PEFT keeps adapters in fp32 on a bf16 / fp16 model and, outside autocast, computes the LoRA
branch in fp32 (``peft/tuners/lora/layer.py`` casts the input to ``lora_A.weight.dtype``). On a
GPU an fp32 ``tl.dot`` either runs on FMA units ("ieee": ~1/15 of the tensor-core rate, which makes
the memory-bound LoRA kernels ALU-bound) or rounds to tf32 ("tf32": 10 mantissa bits, 100x
PEFT's error on dA / dB); ``tf32x3`` splits *both* operands and, for a wide streamed operand,
quadruples its shared-memory footprint (measured in the SASS: the shrink kernel went from 74 KiB
to 272 KiB and spilled).

Every streaming LoRA product has one operand that is exact in the model's 16-bit dtype T: the
masked input ``keep ⊙ x`` (the dropout scale is applied to the accumulator instead, a scalar
factor) or the output gradient dy. Only the other, small operand (A, B, S, dS: r × a tile) is
fp32. Split it into pieces of T::

    T = bf16 (8 significant bits, fp32's exponent range):
        a = p0 + p1 + p2,  p0 = bf16(a), p1 = bf16(a - p0), p2 = bf16(a - p0 - p1)   (24 bits: exact)
    T = fp16 (11 significant bits, narrow exponent range: the second piece is scaled by 2¹¹):
        a ≈ p0 + 2⁻¹¹·q1,  p0 = fp16(a), q1 = fp16((a - p0)·2¹¹)                    (22 bits)

Each product ``exact_T · piece`` is exact in the fp32 accumulator (8+8 or 11+11 bits), so the
result is the fp32 product up to fp32 accumulation order, i.e. PEFT's fp32 matmul, on tensor cores,
with the wide operand read and staged once in its own dtype. The pieces cost a few ALU
operations per element of the small operand only.

``PIECES``: 1 = no split (operands already in the LoRA dtype), 2 = fp16 pieces, 3 = bf16 pieces.
"""
import triton
import triton.language as tl

FP16_PIECE_SCALE = 2048.0  # 2¹¹: fp16's significand width


@triton.jit
def split(other, DTYPE: tl.constexpr, PIECES: tl.constexpr):
    """The pieces ``(p0, p1, p2)`` of ``other`` in DTYPE (see the module doc); PIECES = 1: ``other``
    rounded to DTYPE (p1, p2 unused), PIECES = 2: ``(p0, q1, q1)`` (p2 unused)."""
    if PIECES == 1:
        p0 = other.to(DTYPE)
        p1 = p0
        p2 = p0
    elif PIECES == 3:
        f = other.to(tl.float32)
        p0 = f.to(DTYPE)
        rest = f - p0.to(tl.float32)
        p1 = rest.to(DTYPE)
        p2 = (rest - p1.to(tl.float32)).to(DTYPE)
    else:
        f = other.to(tl.float32)
        p0 = f.to(DTYPE)
        p1 = ((f - p0.to(tl.float32)) * 2048.0).to(DTYPE)
        p2 = p1
    return p0, p1, p2


@triton.jit
def dot_pieces(exact, p0, p1, p2, acc, acc_lo, EXACT_LEFT: tl.constexpr, PIECES: tl.constexpr,
               PRECISION: tl.constexpr):
    """``acc (+ 2⁻¹¹·acc_lo) += exact·other`` (``EXACT_LEFT``; else ``other·exact``) for the
    pieces of ``other`` made by :func:`split`; ``exact`` must be in the pieces' dtype. PRECISION
    is the input precision of the unsplit (PIECES = 1) dot. Returns ``(acc, acc_lo)``; fold them
    with :func:`fold` once the reduction is over."""
    out_dtype = acc.dtype
    if EXACT_LEFT:
        if PIECES == 1:
            acc = tl.dot(exact, p0, acc, input_precision=PRECISION, out_dtype=out_dtype)
        else:
            acc = tl.dot(exact, p0, acc, out_dtype=out_dtype)
            if PIECES == 3:
                acc = tl.dot(exact, p1, acc, out_dtype=out_dtype)
                acc = tl.dot(exact, p2, acc, out_dtype=out_dtype)
            else:
                acc_lo = tl.dot(exact, p1, acc_lo, out_dtype=out_dtype)
    else:
        if PIECES == 1:
            acc = tl.dot(p0, exact, acc, input_precision=PRECISION, out_dtype=out_dtype)
        else:
            acc = tl.dot(p0, exact, acc, out_dtype=out_dtype)
            if PIECES == 3:
                acc = tl.dot(p1, exact, acc, out_dtype=out_dtype)
                acc = tl.dot(p2, exact, acc, out_dtype=out_dtype)
            else:
                acc_lo = tl.dot(p1, exact, acc_lo, out_dtype=out_dtype)
    return acc, acc_lo


@triton.jit
def fold(acc, acc_lo, PIECES: tl.constexpr):
    """The product accumulated by :func:`dot_pieces`: ``acc + acc_lo·2⁻¹¹`` for fp16 pieces."""
    if PIECES == 2:
        acc = acc + acc_lo * (1.0 / 2048.0)
    return acc
