"""In-kernel dropout keep-mask, regenerated from (seed, element index); never stored.

The mask is a pure function of ``(seed, m, k)`` where ``m`` is the row of the flattened
``[M, K]`` LoRA input and ``k`` its column, so every kernel that touches ``x̃ = m ⊙ x`` (the
shrink ``S = x̃·Aᵀ``, the input gradient ``dx``, the gradient ``dA = dSᵀ·x̃``) rebuilds exactly
the same mask whatever its tiling.

Bit layout (the contract shared with :func:`fastlora.dropout_mask`, which rebuilds it in
pure torch):

* one Philox4x32-10 call (Salmon et al., SC'11; ``tl.randint4x``) per group of 8 columns:
  counter ``(c0, c1, c2, c3) = (k // 8, m, 0, 0)``, key ``(seed mod 2³², seed >> 32)``;
* it returns four 32-bit words ``w0..w3``; column ``k = 8·g + 2·j + h`` takes the 16-bit half
  ``h`` (0 = low, 1 = high) of word ``w_j``;
* the element is kept iff that 16-bit value ``< keep_thresh = round((1 - p)·2¹⁶)``; kept values
  are multiplied by ``keep_scale = float32(1 / (1 - p))`` (inverted dropout).

Using 16 of the 32 random bits per element gives 8 elements per Philox call instead of 1 (what
``tl.rand`` does) or 4 (what ``torch.nn.functional.dropout`` on CUDA does); the price is that
``p`` is realised to the nearest multiple of 2⁻¹⁶ (|Δp| ≤ 7.7e-6).
"""
import triton
import triton.language as tl


@triton.jit
def dropout_keep(seed, offs_m, k_start, keep_thresh, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Boolean ``[BLOCK_M, BLOCK_K]`` keep-mask for rows ``offs_m`` and columns
    ``k_start .. k_start + BLOCK_K`` (``k_start`` and ``BLOCK_K`` multiples of 8)."""
    tl.static_assert(BLOCK_K % 8 == 0, "BLOCK_K must be a multiple of 8 for the dropout mask")
    GROUPS: tl.constexpr = BLOCK_K // 8
    group = (k_start // 8 + tl.arange(0, GROUPS)).to(tl.int64)
    # randint4x takes a 64-bit offset as (c0, c1) = (low word, high word): (k // 8, m).
    counter = (offs_m.to(tl.int64)[:, None] << 32) | group[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, counter)
    # join(join(w0, w2), join(w1, w3))[..., a, b] = w_{2a+b}; a last join over the half h makes
    # the flattened trailing index 2·j + h, i.e. column k % 8.
    lo = tl.join(tl.join(w0 & 0xFFFF, w2 & 0xFFFF), tl.join(w1 & 0xFFFF, w3 & 0xFFFF))
    hi = tl.join(tl.join(w0 >> 16, w2 >> 16), tl.join(w1 >> 16, w3 >> 16))
    bits16 = tl.reshape(tl.join(lo, hi), (BLOCK_M, BLOCK_K))
    return bits16.to(tl.int32) < keep_thresh
