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
    T = fp16 (11 significant bits, exponents only down to 2⁻¹⁴, up to 65504): the tile is first
        scaled by a power of two c that brings its largest magnitude to [0.5, 1) (exact), then
        c·a ≈ p0 + 2⁻¹¹·q1,  p0 = fp16(c·a), q1 = fp16((c·a - p0)·2¹¹)                 (22 bits)
        and the tile's product is divided by c before it joins the accumulator. Elements down
        to 2⁻¹⁴ of the tile's largest keep all 22 bits; smaller ones contribute below 2⁻³⁶ of it.

Each product ``exact_T · piece`` is exact in the fp32 accumulator (8+8 or 11+11 bits), so the
result is the fp32 product up to fp32 accumulation order (2⁻²² relative per element for fp16),
i.e. PEFT's fp32 matmul, on tensor cores, with the wide operand read and staged once in its own
dtype. The pieces cost a few ALU operations per element of the small operand only.

``PIECES``: 1 = no split (operands already in the LoRA dtype), 2 = fp16 pieces, 3 = bf16 pieces.
"""
import triton
import triton.language as tl


@triton.jit
def _pow2_scale(f):
    """``(c, 1/c)``: powers of two with ``max|c·f|`` in [0.5, 1) (1 for an all-zero tile), built
    from the fp32 exponent bits of the tile's largest magnitude (exact)."""
    amax = tl.max(tl.max(tl.abs(f), axis=1), axis=0)
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126  # amax in [2^(e-1), 2^e)
    e = tl.where(amax > 0, e, 0)
    e = tl.minimum(tl.maximum(e, -125), 125)
    c = ((127 - e) << 23).to(tl.float32, bitcast=True)
    inv = ((127 + e) << 23).to(tl.float32, bitcast=True)
    return c, inv


@triton.jit
def split(other, DTYPE: tl.constexpr, PIECES: tl.constexpr):
    """The pieces ``(p0, p1, p2)`` of ``other`` (see the module doc): PIECES = 1: ``other`` rounded
    to DTYPE (p1, p2 unused); 3: the bf16 pieces; 2: ``(p0, q1, 1/c)`` of the scaled fp16 split."""
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
        c, inv = _pow2_scale(f)
        f = f * c
        p0 = f.to(DTYPE)
        p1 = ((f - p0.to(tl.float32)) * 2048.0).to(DTYPE)
        p2 = inv
    return p0, p1, p2


@triton.jit
def dot_pieces(exact, p0, p1, p2, acc, EXACT_LEFT: tl.constexpr, PIECES: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + exact·other`` (``EXACT_LEFT``; else ``acc + other·exact``) for the pieces of
    ``other`` made by :func:`split`; ``exact`` must be in the pieces' dtype. PRECISION is the
    input precision of the unsplit (PIECES = 1) dot."""
    out_dtype = acc.dtype
    if PIECES == 1:
        if EXACT_LEFT:
            acc = tl.dot(exact, p0, acc, input_precision=PRECISION, out_dtype=out_dtype)
        else:
            acc = tl.dot(p0, exact, acc, input_precision=PRECISION, out_dtype=out_dtype)
    elif PIECES == 3:
        if EXACT_LEFT:
            acc = tl.dot(exact, p0, acc, out_dtype=out_dtype)
            acc = tl.dot(exact, p1, acc, out_dtype=out_dtype)
            acc = tl.dot(exact, p2, acc, out_dtype=out_dtype)
        else:
            acc = tl.dot(p0, exact, acc, out_dtype=out_dtype)
            acc = tl.dot(p1, exact, acc, out_dtype=out_dtype)
            acc = tl.dot(p2, exact, acc, out_dtype=out_dtype)
    else:
        if EXACT_LEFT:
            hi = tl.dot(exact, p0, out_dtype=out_dtype)
            lo = tl.dot(exact, p1, out_dtype=out_dtype)
        else:
            hi = tl.dot(p0, exact, out_dtype=out_dtype)
            lo = tl.dot(p1, exact, out_dtype=out_dtype)
        acc = acc + (hi + lo * (1.0 / 2048.0)) * p2  # p2 = 1/c: undo the tile's power-of-two scale
    return acc
