"""Tile configurations per GPU architecture family, per-launch grid splits, derived meta-parameters.

Every raw ``@triton.jit`` kernel stays callable with an explicit config (the interpreter, the
deterministic mode and the compile-only tests do that); ``kernels/launch.py`` times the
candidates of a launch once per key on the GPU and keeps the fastest.

Status of the numbers: no GPU has run these lists yet, so they are *candidates* chosen from
compile facts, not measurements. Every one is compiled on the CPU for sm_80, sm_86, sm_90 and
sm_120 by ``tests/test_kernel_configs.py`` (``python -m bench.kernel_resources`` prints the
table), which gates on the SASS: no register spills, shared memory within the family's limit and
for the CTAs per SM the tile is meant to run at, no scalar 8/16-bit global loads, ``cp.async``
for every streamed operand, tensor-core instructions (``wgmma`` on sm_90 for the GEMMs).

Grid splits (``SPLIT``, a launcher-only meta-parameter): the shrink (over K), the dS pass (over N)
and the dA pass (over M) are reductions whose natural grid (row blocks, or column blocks) leaves
most SMs idle at small M; their candidates add a split that reaches ~2 programs per SM, joined by
fp32 atomics, and the timing decides. Deterministic mode takes the first candidate, which never
splits.
"""
import functools

import torch
import triton
import triton.language as tl

# Meta-parameters used under TRITON_INTERPRET=1: large blocks, because interpreter time grows
# with programs × loop iterations (FIELD.md §4: 256³ at 64³ blocks ~0.4 s).
INTERPRETER_CONFIGS = {
    "shrink": dict(BLOCK_M=64, BLOCK_K=64),
    "fwd": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=4),
    "expand": dict(BLOCK_M=64, BLOCK_N=64, GROUP_M=4),
    "bwd_dy": dict(BLOCK_M=64, BLOCK_N=64),
    "bwd_dx": dict(BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, GROUP_M=4),
    "bwd_da": dict(BLOCK_M=64, BLOCK_K=64),
}
KERNELS = tuple(INTERPRETER_CONFIGS)

# Largest rank block of the streaming kernels; r beyond it is tiled over a grid axis (each tile
# re-reads its operand, so r = 128 streams x twice in F1/B3 and dy twice in B1). Compiled with
# BLOCK_R = 128, the streaming kernels spilled or exceeded shared memory in most configs (the
# fp32 adapter tile [BLOCK_K, BLOCK_R] is pipelined like the big operand).
MAX_BLOCK_R = 64
# The rank step of the GEMM-shaped kernels' LoRA term ((s·S)·Bᵀ into y, dS·A into dx): r in
# 16-deep dots (the tensor cores' depth), not padded to the main loop's BLOCK_K.
GEMM_BLOCK_R = 16
# The hybrid path's B3 keeps all of r in one program (its dx tile needs the whole dS·A): r up to
# this; beyond it the backward takes the fused path (compiled with its A tile, dS tile and dA
# accumulator all of r wide, the hybrid B3 spilled at r = 64: 8-636 B on every architecture).
MAX_FULL_RANK = 32


def _c(num_warps, num_stages, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def _gemm(rows, out_names):
    """GEMM-shaped configs from (BLOCK_M, BLOCK_OUT, BLOCK_RED, num_warps, num_stages[, ctas])
    rows; ``ctas`` (default 1) is how many CTAs per SM the row is meant to run at."""
    out, red = out_names
    cfgs = []
    for m, o, k, w, s, *ctas in rows:
        cfg = _c(w, s, BLOCK_M=m, **{out: o, red: k}, GROUP_M=8)
        cfg.intended_ctas = ctas[0] if ctas else 1
        cfgs.append(cfg)
    return cfgs


def intended_ctas(cfg):
    """CTAs per SM a config is meant to run at (1 unless its table row says otherwise): the
    compile-only gates check that its shared memory and registers allow it."""
    return getattr(cfg, "intended_ctas", 1)


def _stream(rows, red):
    """Streaming configs from (BLOCK_M, BLOCK_RED, num_warps, num_stages) rows."""
    return [_c(w, s, BLOCK_M=m, **{red: k}) for m, k, w, s in rows]


# F2 (y tile [BLOCK_M, BLOCK_N] over K) and B2 (dx tile [BLOCK_M, BLOCK_K] over N): 128x128x64,
# 8 warps, 3-4 stages is the usual Hopper bf16 start (4 stages: 1 CTA per SM; 3 stages: ~100 KiB,
# 2 CTAs per SM, so that one CTA's epilogue (LoRA term, mask, store) overlaps the other's main
# loop); 64-wide tiles cover small M and narrow N.
_FWD_16 = {
    "sm90": [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3, 2), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
             (64, 64, 64, 4, 5)],
    "sm80": [(128, 128, 32, 8, 4), (128, 128, 64, 8, 3), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 64, 32, 4, 5)],
    "sm86": [(128, 128, 32, 8, 3), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (64, 64, 32, 4, 4)],
}
_DX_16 = {
    # (no 2-CTA row: the masked LoRA term's [BLOCK_M, BLOCK_K] fp32 tile after the N loop takes
    # 128x128x64/8 warps to 219 registers, 1 CTA per SM, even at 3 stages)
    "sm90": [(128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 5)],
    # sm_80: 128x128x32/8 warps spilled 8 B with fp32 LoRA math (its tf32x3 epilogue)
    "sm80": [(128, 64, 32, 8, 4), (64, 128, 32, 8, 4), (128, 64, 64, 8, 3), (64, 64, 32, 4, 5)],
    "sm86": [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 4, 4)],
}
# DoRA's forward epilogue also rounds and stores z = x·Wᵀ + s·(x̃·Aᵀ)·Bᵀ; with it these (BLOCK_M,
# BLOCK_N) spilled 8 B: 128x128x32/8 warps bf16 on sm_120 (255 registers without it already),
# 32x64x32/4 warps fp32 on sm_86 (ptxas capped it at 128 registers)
_DORA_FWD_DROP = {("sm86", 2): {(128, 128)}, ("sm86", 4): {(32, 64)}}
# B1 with DoRA's sums (COLSUM: a z tile staged beside dy's, both widened to fp32): (BLOCK_M,
# BLOCK_N) rows that spilled when compiled (bench/kernel_resources.py, triton 3.9): 128x64 / 8 warps
# bf16 on sm_80 (16 B), sm_86 (24 B) and sm_120 (40 B); fp32 64x16 on sm_80 (4 B, r 16) and sm_90
# (12 B, r 64)
# B2 with DoRA's g on the dy tile (COL_SCALE: dy widened, scaled and rounded in registers before
# the MMA): 128x64x32 / 8 warps bf16 on sm_86 spilled 4 B (ptxas held it at 128 registers)
_DORA_DX_DROP = {("sm86", 2): {(128, 64)}}
_DORA_DY_DROP = {("sm80", 2): {(128, 64)}, ("sm86", 2): {(128, 64)}, ("sm80", 4): {(64, 16)},
                 ("sm90", 4): {(64, 16)}, ("sm86", 4): {(64, 16)}}
# fp32 operands: tf32 tensor cores when torch allows them, FMA units otherwise (torch's default),
# whose operands and accumulators live in registers: small tiles.
_GEMM_32 = [(64, 64, 32, 8, 3), (64, 64, 16, 4, 4), (32, 64, 32, 4, 3)]  # sm_120: 64x64x32/4 warps spilled
_GEMM_64 = [(32, 32, 16, 4, 2)]  # fp64: correctness path on FMA units
# H1 (hybrid path, y += (s·S)·Bᵀ): a streaming read-modify-write of y; one tile per program.
_EXPAND = {2: [(64, 128, 4, 1), (128, 64, 4, 1), (64, 64, 4, 1)], 4: [(32, 64, 4, 1), (32, 32, 4, 1)],
           8: [(32, 32, 4, 1)]}

# F1 (x over K), B1 (dy over N), B3 (x over M): a [BLOCK_M, BLOCK_RED] tile of the big operand
# per step and a thin rank-BLOCK_R dot; enough bytes in flight per SM matters most. Rows with a
# short reduction block serve the large rank blocks (see _RANK_TILE).
_STREAM_16 = {
    "shrink": {"sm90": [(64, 128, 4, 4), (64, 64, 4, 4), (128, 64, 8, 3), (64, 32, 4, 4), (128, 32, 8, 4)],
               "sm80": [(64, 64, 4, 4), (32, 128, 4, 4), (128, 64, 8, 3), (64, 32, 4, 4), (128, 32, 8, 3)],
               "sm86": [(64, 64, 4, 3), (128, 64, 8, 2), (32, 64, 4, 4), (64, 32, 4, 3)]},
    "bwd_dy": {"sm90": [(64, 128, 4, 4), (64, 64, 4, 4), (128, 64, 8, 3), (64, 32, 4, 4), (128, 32, 8, 3)],
               "sm80": [(64, 64, 4, 4), (128, 64, 8, 3), (64, 32, 4, 4), (128, 32, 8, 3)],
               "sm86": [(64, 64, 4, 3), (128, 64, 8, 2), (32, 32, 4, 3)]},  # sm_120: 64x32/4 warps spilled 4 B
    "bwd_da": {"sm90": [(64, 64, 4, 4), (32, 128, 4, 4), (128, 64, 8, 3), (16, 256, 4, 4), (32, 64, 4, 4)],
               "sm80": [(64, 64, 4, 4), (32, 128, 4, 4), (128, 64, 8, 3), (32, 64, 4, 4)],
               "sm86": [(64, 64, 4, 3), (32, 128, 4, 3), (128, 64, 8, 2), (32, 64, 4, 3)]},
}
_STREAM_32 = [(32, 32, 4, 2), (16, 64, 4, 2), (64, 16, 4, 2)]
_STREAM_64 = [(32, 16, 8, 2)]  # 4 warps spilled 428 B in B3 on sm_86

_RED = {"shrink": "BLOCK_K", "bwd_dy": "BLOCK_N", "bwd_da": "BLOCK_K"}
_GEMM_NAMES = {"fwd": ("BLOCK_N", "BLOCK_K"), "bwd_dx": ("BLOCK_K", "BLOCK_N")}

SHARED_LIMIT = {"sm80": 163 * 1024, "sm86": 99 * 1024, "sm90": 227 * 1024}  # per block
SHARED_PER_SM = {"sm80": 164 * 1024, "sm86": 100 * 1024, "sm90": 228 * 1024}
ARCH_FAMILIES = tuple(SHARED_LIMIT)


def arch_of(capability):
    """Config family for a CUDA compute capability ``(major, minor)``: by shared memory per
    block, the limit that decides which tiles fit."""
    major, minor = capability
    if major in (9, 10):
        return "sm90"  # Hopper, datacenter Blackwell: 227 KiB
    if major >= 11 or (major, minor) in ((8, 6), (8, 7), (8, 9)):
        return "sm86"  # consumer Ampere/Ada/Blackwell (sm_120: ~100 KiB): the small-tile family
    return "sm80"


MIN_CAPABILITY = (8, 0)  # bf16 tensor cores; older GPUs (and ROCm) use the torch path


# Streaming kernels: the small operand's tile (A [BLOCK_K, BLOCK_R] in the shrink, B [BLOCK_N,
# BLOCK_R] in the dS pass, dS [BLOCK_M, BLOCK_R] in the dA pass) is pipelined like the big one, in
# fp32 for PEFT's default adapters: tiles past this many elements spilled or overflowed shared
# memory when compiled at BLOCK_R = 64 (e.g. the sm_90 shrink at 64x128: 208 KiB, 8 B spilled; the
# sm_80 one at 64x64: 28 B spilled).
_RANK_TILE = 2048
# The dA pass accumulates [BLOCK_R, BLOCK_K] in registers (twice with fp16 operand pieces): at most
# this many elements (sm_90 fp16 16x256 at BLOCK_R = 64 spilled 1.5 KB).
_ACC_TILE = 8192
# The hybrid dA pass (ADD_DX) holds a [BLOCK_R, BLOCK_K] accumulator, the A tile and a [BLOCK_M,
# BLOCK_K] dx tile in registers: each at most this many elements.
_FULL_RANK_TILE = 2048


def is_dora(meta):
    """Whether a launch's constexprs select a DoRA variant, whose register needs differ: the column
    scale g (COL_SCALE: the forward's epilogue, the backward's dy tiles), the forward GEMM storing
    z (STORE_Z), the dS pass summing dy ⊙ z (COLSUM)."""
    return bool(meta.get("STORE_Z") or meta.get("COLSUM") or meta.get("COL_SCALE"))


def configs_for(kernel, arch, itemsize, block_r=16, add_dx=False, dora=False):
    """``triton.Config`` list of ``kernel`` for an arch family, compute itemsize and rank block
    (no grid split): the candidates a launch times, and what the compile-only gates check.
    ``add_dx``: the hybrid dA pass; ``dora``: :func:`is_dora` (drops the rows that spilled with
    DoRA's extra work, per kernel: _DORA_FWD_DROP, _DORA_DX_DROP, _DORA_DY_DROP)."""
    if kernel in _GEMM_NAMES:
        table = _FWD_16 if kernel == "fwd" else _DX_16
        rows = {2: table[arch], 4: _GEMM_32, 8: _GEMM_64}[itemsize]
        if dora:
            drop = (_DORA_FWD_DROP if kernel == "fwd" else _DORA_DX_DROP).get((arch, itemsize), ())
            rows = [row for row in rows if row[:2] not in drop] or rows
        return _gemm(rows, _GEMM_NAMES[kernel])
    if kernel == "expand":
        return [_c(w, s, BLOCK_M=m, BLOCK_N=n, GROUP_M=8) for m, n, w, s in _EXPAND[itemsize]]
    rows = {2: _STREAM_16[kernel][arch], 4: _STREAM_32, 8: _STREAM_64}[itemsize]
    if dora and kernel == "bwd_dy":
        rows = [row for row in rows if row[:2] not in _DORA_DY_DROP.get((arch, itemsize), ())] or rows
    cands = _stream(rows, _RED[kernel])
    if add_dx:
        fit = [c for c in cands if block_r * c.kwargs["BLOCK_K"] <= _FULL_RANK_TILE
               and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] <= _FULL_RANK_TILE
               and c.kwargs["BLOCK_M"] * block_r <= _FULL_RANK_TILE]
        return fit or [_c(4, 3, BLOCK_M=32, BLOCK_K=max(16, _FULL_RANK_TILE // block_r))]
    side = "BLOCK_M" if kernel == "bwd_da" else _RED[kernel]
    fit = [c for c in cands if c.kwargs[side] * block_r <= _RANK_TILE
           and (kernel != "bwd_da" or c.kwargs["BLOCK_K"] * block_r <= _ACC_TILE)]
    return fit or [min(cands, key=lambda c: c.kwargs[side])]


_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


def tl_dtype(dtype):
    """The Triton dtype of a torch float dtype."""
    return _TL[dtype]


def block_r(r):
    """Rank block of the streaming kernels: r padded to a power of two ≥ 16 (``tl.dot`` needs
    dims ≥ 16), at most MAX_BLOCK_R (larger r: several blocks)."""
    return min(max(16, triton.next_power_of_2(r)), MAX_BLOCK_R)


def m_key(M):
    """Tuning bucket of M: the next power of two, so varying token counts share a config."""
    return triton.next_power_of_2(max(int(M), 1))


@functools.lru_cache(maxsize=None)
def sm_count(device):
    """Streaming multiprocessors of a CUDA device (4 elsewhere: the interpreter's grids)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_count(programs, steps, device, min_steps=4):
    """Ways to split a reduction of ``steps`` blocks so that ``programs`` × split reaches ~2
    programs per SM, each split keeping at least ``min_steps`` blocks (1 = no split)."""
    want = triton.cdiv(2 * sm_count(device), max(programs, 1))
    return max(1, min(want, steps // min_steps))


def _effective(total, block, split):
    """The number of non-empty splits when ``total`` is cut in ``split`` block-aligned pieces."""
    per = triton.cdiv(triton.cdiv(total, split), block) * block
    return triton.cdiv(total, per)


def _with_splits(cfg, splits):
    return [_c(cfg.num_warps, cfg.num_stages, **cfg.kwargs, SPLIT=s) for s in splits]


def candidates(kernel, arch, itemsize, args, device):
    """The configs a launch of ``kernel`` with arguments ``args`` may take, first = the fixed
    choice (deterministic mode, ``FASTLORA_AUTOTUNE=0``, CUDA-graph capture of a new key)."""
    cands = configs_for(kernel, arch, itemsize, args.get("BLOCK_R", 16), bool(args.get("ADD_DX")), is_dora(args))
    M = args["M_KEY"]
    keep = [c for c in cands if c.kwargs["BLOCK_M"] <= max(M, 16) * 2]  # tiles far taller than M waste
    cands = keep or cands[-1:]
    det = args.get("DETERMINISTIC", False)
    out = []
    for c in cands:
        if kernel in ("shrink", "bwd_dy"):
            total = args["K"] if kernel == "shrink" else args["N"]
            block = c.kwargs[_RED[kernel]]
            tiles = triton.cdiv(M, c.kwargs["BLOCK_M"]) * triton.cdiv(args["R"], args["BLOCK_R"])
            s = 1 if det else _effective(total, block, split_count(tiles, triton.cdiv(total, block), device))
            out += _with_splits(c, sorted({1, s}))
        else:  # (the dA pass's row split is derived from the real M at each launch: HEURISTICS)
            out.append(c)
    return out


def interpreter_config(kernel, args):
    """The interpreter's meta-parameters: large blocks, and small splits that still exercise the
    atomic reductions (not in deterministic mode)."""
    meta = dict(INTERPRETER_CONFIGS[kernel])
    det = args.get("DETERMINISTIC", False)
    if kernel == "shrink":
        meta["SPLIT"] = 1 if det else _effective(args["K"], meta["BLOCK_K"], 2)
    elif kernel == "bwd_dy":
        meta["SPLIT"] = 1 if det else _effective(args["N"], meta["BLOCK_N"], 2)
    return meta


def _per_split(total, block, split):
    return triton.cdiv(triton.cdiv(total, split), block) * block


# Meta-parameters derived from the sizes and the chosen config: reduction loops drop their tail
# masks when their length is a multiple of the block; splits give each program its range.
HEURISTICS = {
    "shrink": {"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0,
               "K_PER_SPLIT": lambda a: _per_split(a["K"], a["BLOCK_K"], a["SPLIT"]),
               "ATOMIC": lambda a: a["SPLIT"] > 1},
    "fwd": {"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0},
    "expand": {},
    "bwd_dy": {"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0,
               "N_PER_SPLIT": lambda a: _per_split(a["N"], a["BLOCK_N"], a["SPLIT"]),
               "ATOMIC_DS": lambda a: a["SPLIT"] > 1},
    "bwd_dx": {"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0},
    "bwd_da": {"SPLIT": lambda a: _row_slabs(a), "ATOMIC": lambda a: a["SPLIT"] > 1},
}


def _row_slabs(a):
    """The dA pass's row slabs for the real M: ~2 programs per SM, no empty slab (1 in
    deterministic mode)."""
    blocks = triton.cdiv(a["M"], a["BLOCK_M"])
    if a.get("DETERMINISTIC", False):
        return 1
    tiles = triton.cdiv(a["WIDEST"], a["BLOCK_K"]) * triton.cdiv(a["R"], a["BLOCK_R"]) * a["PRODUCTS"]
    want = max(1, min(triton.cdiv(2 * a["SM_COUNT"], tiles), blocks))
    return triton.cdiv(blocks, triton.cdiv(blocks, want))


def derived_meta(kernel, args):
    """Values of ``HEURISTICS[kernel]`` for the launch arguments + config ``args`` (in order: a
    later one may read an earlier one)."""
    a, out = dict(args), {}
    for name, fn in HEURISTICS[kernel].items():
        out[name] = a[name] = fn(a)
    return out
