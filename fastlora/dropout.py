"""fastlora's dropout mask in pure torch: the same bits the Triton kernels regenerate.

The mask is a pure function of ``(seed, row, column)`` of the flattened ``[M, K]`` LoRA input
(bit layout: kernels/dropout.py). This module rebuilds it with int64 torch ops on any device
(and, on the CPU, with the C kernel of fastlora/cpu.py), for the CPU path, for tests, and for
users who want PEFT's eager formula with fastlora's mask.
"""
import math
import numbers
import struct

import torch

from . import cpu

_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1
# Philox4x32 constants (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as
# 1, 2, 3", SC'11; identical to triton.language.random).
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
# Rows of the mask generated per chunk, to bound the int64 temporaries (~8 live [rows, K/8]).
_GROUPS_PER_CHUNK = 1 << 21


def _mulhilo32(a, b):
    """(hi, lo) 32-bit words of ``a · b`` for a Python constant ``a < 2³²`` and an int64 tensor
    ``b`` holding values in [0, 2³²). The 64-bit product may wrap past 2⁶³ in int64: the wrapped
    value has the same 64 bits as the unsigned product (two's complement), so the words are
    exact (checked by the Random123 known-answer test in tests/test_dropout.py)."""
    p = b * a
    return (p >> 32) & _U32, p & _U32


def philox4x32(c0, c1, c2, c3, k0, k1, rounds=10):
    """Philox4x32-``rounds`` on int64 tensors holding uint32 values; returns the four words."""
    for _ in range(rounds):
        hi0, lo0 = _mulhilo32(_PHILOX_ROUND_A, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_ROUND_B, c2)
        c0, c1, c2, c3 = hi1.bitwise_xor_(c1).bitwise_xor_(k0), lo1, hi0.bitwise_xor_(c3).bitwise_xor_(k1), lo0
        k0 = (k0 + _PHILOX_KEY_A) & _U32
        k1 = (k1 + _PHILOX_KEY_B) & _U32
    return c0, c1, c2, c3


def check_dropout_p(p, name="dropout_p"):
    """Validate a dropout probability: a real number in [0, 1). Raises TypeError / ValueError
    naming the argument ``name``."""
    if type(p) is float and 0.0 <= p < 1.0:
        return p  # the common case without the numbers.Real ABC check (this runs on every call)
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name}: expected a float in [0, 1), got {type(p).__name__} {p!r}")
    if not (0.0 <= float(p) < 1.0):  # also rejects NaN
        raise ValueError(f"{name}: expected a float in [0, 1), got {p!r}")
    return float(p)


def check_seed_tensor(seed):
    """Validate a seed tensor: one int64 element. Returns it (no read, no synchronisation)."""
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError(f"seed: expected an int or a one-element int64 tensor, got {seed.dtype} "
                        f"tensor of shape {tuple(seed.shape)}")
    return seed


def check_seed(seed):
    """Validate a seed: a Python int (not bool) in [-2⁶³, 2⁶⁴), or a one-element int64 tensor;
    returns it as an unsigned 64-bit int (reading a CUDA tensor synchronises)."""
    if isinstance(seed, torch.Tensor):
        seed = int(check_seed_tensor(seed).item())
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed: expected an int or None, got {type(seed).__name__} {seed!r}")
    seed = int(seed)
    if not (-(1 << 63) <= seed < (1 << 64)):
        raise ValueError(f"seed: expected an int in [-2**63, 2**64), got {seed}")
    return seed & _U64


def draw_seed(device):
    """A 64-bit seed as an int64 ``[1]`` tensor on ``device``, drawn from torch's default
    generator of that device (so ``torch.manual_seed`` reproduces it and
    ``torch.utils.checkpoint`` recomputation, which restores the RNG state, draws it again)."""
    return torch.randint(-(1 << 63), (1 << 63) - 1, (1,), dtype=torch.int64, device=device)


def keep_params(p):
    """``(keep_thresh, keep_scale)`` for dropout probability ``p``: an element is kept iff its
    16-bit random value is ``< keep_thresh = round((1 - p)·2¹⁶)``; kept values are scaled by
    ``keep_scale = float32(1 / (1 - p))``."""
    p = check_dropout_p(p)
    thresh = min(65536, max(0, int(round((1.0 - p) * 65536))))
    scale = struct.unpack("f", struct.pack("f", 1.0 / (1.0 - p)))[0]  # float32 rounding, no tensor
    return thresh, scale


def keep_bits(M, K, seed, keep_thresh, device=None, row0=0):
    """Boolean ``[M, K]`` keep-mask (True = kept) of rows ``row0 .. row0 + M`` for ``seed``: on
    the CPU by fastlora's C kernel (fastlora/cpu.py) when it could be built, else (and on other
    devices) by :func:`keep_bits_torch`. Both give the same bits."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cpu" and cpu.library() is not None:
        return cpu.unpack(cpu.packed_keep_c(M, K, check_seed(seed), keep_thresh, row0), K, torch.bool)
    return keep_bits_torch(M, K, seed, keep_thresh, device, row0)


def packed_keep(M, K, seed, keep_thresh, row0=0):
    """:func:`keep_bits` of the CPU bit-packed: uint8 ``[M, ceil(K / 8)]``, bit b of byte g =
    column 8g + b (1 = kept), for the unsigned 64-bit ``seed``: by the C kernel, or torch ops
    when it is unavailable (the same bits)."""
    out = cpu.packed_keep_c(M, K, seed, keep_thresh, row0)
    if out is None:
        G = -(-K // 8)
        bits = keep_bits_torch(M, G * 8, seed, keep_thresh, "cpu", row0).view(M, G, 8).to(torch.uint8)
        out = (bits << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    return out


def keep_bits_torch(M, K, seed, keep_thresh, device=None, row0=0):
    """:func:`keep_bits` in int64 torch ops, on any device (in chunks of rows, to bound the int64
    temporaries)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    seed = check_seed(seed)
    k0, k1 = seed & _U32, seed >> 32
    groups = -(-K // 8)
    out = torch.empty((M, K), dtype=torch.bool, device=device)
    rows_per_chunk = max(1, _GROUPS_PER_CHUNK // groups)
    g = torch.arange(groups, dtype=torch.int64, device=device)[None, :]
    for m0 in range(0, M, rows_per_chunk):
        m = row0 + torch.arange(m0, min(M, m0 + rows_per_chunk), dtype=torch.int64, device=device)[:, None]
        c0 = g.expand(m.shape[0], groups)
        c1 = m.expand(m.shape[0], groups)
        zero = torch.zeros_like(c0)
        words = torch.stack(philox4x32(c0, c1, zero, zero, k0, k1), dim=-1)  # [rows, G, 4]
        halves = torch.stack((words & 0xFFFF, words >> 16), dim=-1)  # [rows, G, 4, 2]
        out[m0:m0 + m.shape[0]] = halves.reshape(m.shape[0], groups * 8)[:, :K] < keep_thresh
    return out


def dropout_mask(shape, p, seed, device=None, dtype=torch.float32):
    """The exact dropout mask fastlora's kernels apply for ``(p, seed)``.

    Args:
        shape: shape of the LoRA input, ``[..., K]``; leading dims are flattened row-major into
            the M rows the kernels index, as ``input.reshape(-1, K)`` does.
        p: dropout probability in [0, 1).
        seed: int in [-2⁶³, 2⁶⁴) (the value passed to ``lora_linear(seed=...)``).
        device: where to build the mask (default CPU).
        dtype: float dtype of the result (default float32).

    Returns:
        Tensor of ``shape`` with values 0 or ``float32(1 / (1 - p))`` (inverted dropout, as
        ``torch.nn.Dropout``), so that ``dropout(x) = x * mask``.

    Raises:
        TypeError / ValueError for a non-int seed, p outside [0, 1) or an empty ``shape``.

    The keep decision uses 16 random bits per element (see kernels/dropout.py), so the realised
    keep probability is ``round((1 - p)·2¹⁶) / 2¹⁶``, within 7.7e-6 of ``1 - p``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        raise ValueError("shape: expected at least one dimension [..., K], got ()")
    thresh, scale = keep_params(p)
    K = shape[-1]
    M = math.prod(shape[:-1])
    keep = keep_bits(M, K, seed, thresh, device)
    return (keep.to(dtype) * torch.tensor(scale, dtype=torch.float32).to(dtype)).reshape(shape)
