"""Tile configurations per GPU architecture family, and the autotune wrappers.

Every raw ``@triton.jit`` kernel stays callable with an explicit config (the interpreter, the
deterministic mode and the compile-only tests do that); the ``triton.autotune`` wrappers are
built lazily, one per (kernel, architecture family, itemsize), because the candidates depend on
the architecture and autotuning several configs needs a GPU driver.

Status of the numbers: no GPU was available when these lists were written, so they are
*candidates*, not measurements. Every one of them is compiled on the CPU for sm_80, sm_86 and
sm_90 by ``tests/test_kernel_configs.py`` (``python -m bench.kernel_resources`` prints the
table), which asserts zero register spills, shared memory within the family's per-block limit
(sm_80: 163 KiB, sm_86/89: 99 KiB, sm_90: 227 KiB) and tensor-core instructions (``wgmma`` on
sm_90 for the GEMM kernels). ``triton.autotune`` picks among them on the user's GPU, keyed by
bucketed M, N, K, r and the dtypes. Replace these comments with measured numbers once
``bench/`` has run on a GPU.
"""
import functools

import triton

# Meta-parameters used under TRITON_INTERPRET=1: large blocks, because interpreter time grows
# with programs × loop iterations (FIELD.md §4: 256³ at 64³ blocks ~0.4 s).
INTERPRETER_CONFIGS = {
    "shrink": dict(BLOCK_M=64, BLOCK_K=64),
    "fwd": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=4),
    "bwd_dy": dict(BLOCK_M=64, BLOCK_N=64),
    "bwd_dx": dict(BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, GROUP_M=4),
    "bwd_da": dict(BLOCK_M=64, BLOCK_K=64),
}

# Largest rank block; r beyond it is tiled over a grid axis (each tile re-reads its operand, so
# r = 128 streams x twice in F1/B3 and dy twice in B1). Compiled for sm_80/sm_90 with
# BLOCK_R = 128, the streaming kernels spilled (up to 13 KB) or exceeded shared memory in most
# configs, because the fp32 adapter tile [BLOCK_K, BLOCK_R] is pipelined like the big operand;
# 64 keeps every shipped config spill-free (tests/test_kernel_configs.py).
MAX_BLOCK_R = 64
# Adapters are PEFT's fp32 by default: budget their tiles at 4 bytes per element.
ADAPTER_ITEMSIZE = 4


def _c(num_warps, num_stages, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def _gemm(rows, out_names):
    """GEMM-shaped configs from (BLOCK_M, BLOCK_OUT, BLOCK_RED, num_warps, num_stages) rows."""
    out, red = out_names
    return [_c(w, s, BLOCK_M=m, **{out: o, red: k}, GROUP_M=8) for m, o, k, w, s in rows]


def _stream(rows, red):
    """Streaming configs from (BLOCK_M, BLOCK_RED, num_warps, num_stages) rows."""
    return [_c(w, s, BLOCK_M=m, **{red: k}) for m, k, w, s in rows]


# Candidate lists per kernel, architecture family and operand itemsize. Each row survived the
# compile-only check (tests/test_kernel_configs.py, via bench/kernel_resources.py) in its
# heaviest and its lightest variant: no register spills, shared memory within the family's
# limit; rows that failed it were removed (e.g. sm_90 F2 128x256x64/8 warps: 28 B spilled and 240 KiB of shared
# memory; sm_90 B2 128x128x64/4 warps: 592 B spilled). None is *tuned* yet: that needs a GPU.
#
# F2 (y tile [BLOCK_M, BLOCK_N] over K) and B2 (dx tile [BLOCK_M, BLOCK_K] over N): 128x128x64,
# 8 warps, 3 stages is the usual Hopper bf16 start; 64-wide tiles cover small M and narrow N.
_FWD_16 = {
    "sm90": [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 5)],
    "sm80": [(128, 256, 32, 8, 3), (128, 128, 32, 4, 4), (128, 128, 64, 8, 3), (64, 128, 32, 4, 4),
             (128, 64, 32, 4, 4), (64, 64, 32, 4, 5)],
    "sm86": [(128, 128, 32, 8, 3), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (64, 64, 32, 4, 4)],
}
_DX_16 = {
    "sm90": [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 64, 64, 4, 5)],
    # sm_80: 128x128x64/8 warps spilled 556 B with bf16 adapters and no tail masks; BLOCK_N 32
    # with a 4th stage does not (244-254 registers, 96 KiB)
    "sm80": [(128, 128, 32, 8, 4), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 64, 32, 4, 5)],
    "sm86": [(128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 64, 32, 4, 4)],
}
_GEMM_32 = [(128, 128, 32, 8, 3), (64, 128, 32, 4, 3), (64, 64, 32, 4, 4)]  # fp32: tf32 / ieee
_GEMM_64 = [(32, 32, 16, 4, 2)]  # fp64: correctness path on FMA units

# F1 (x over K), B1 (dy over N), B3 (x over M): a [BLOCK_M, BLOCK_RED] tile of the big operand
# per step and a thin rank-BLOCK_R dot; enough bytes in flight per SM matters most.
_STREAM_16 = {
    "shrink": {"sm90": [(64, 64, 4, 4), (32, 128, 4, 4), (128, 64, 8, 3)],
               "sm80": [(64, 64, 4, 4), (32, 128, 4, 4), (128, 64, 8, 3)],
               "sm86": [(64, 64, 4, 3), (128, 64, 8, 2), (32, 64, 4, 4)]},
    "bwd_dy": {"sm90": [(64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 3)],
               "sm80": [(64, 64, 4, 4), (128, 64, 8, 3)],
               "sm86": [(64, 64, 4, 3), (128, 64, 8, 2)]},
    "bwd_da": {"sm90": [(64, 64, 4, 4), (32, 128, 4, 4), (128, 64, 8, 3), (16, 256, 4, 4)],
               "sm80": [(64, 64, 4, 4), (32, 128, 4, 4), (128, 64, 8, 3)],
               "sm86": [(64, 64, 4, 3), (32, 128, 4, 3), (128, 64, 8, 2)]},
}
_STREAM_32 = [(64, 32, 4, 3), (32, 64, 4, 3)]
_STREAM_64 = [(32, 16, 8, 2)]  # 4 warps spilled 428 B in B3 on sm_86

_RED = {"shrink": "BLOCK_K", "bwd_dy": "BLOCK_N", "bwd_da": "BLOCK_K"}
_GEMM_NAMES = {"fwd": ("BLOCK_N", "BLOCK_K"), "bwd_dx": ("BLOCK_K", "BLOCK_N")}

SHARED_LIMIT = {"sm80": 163 * 1024, "sm86": 99 * 1024, "sm90": 227 * 1024}
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


def configs_for(kernel, arch, itemsize):
    """Candidate ``triton.Config`` list of ``kernel`` for an arch family and operand itemsize."""
    if kernel in _GEMM_NAMES:
        table = _FWD_16 if kernel == "fwd" else _DX_16
        rows = {2: table[arch], 4: _GEMM_32, 8: _GEMM_64}[itemsize]
        return _gemm(rows, _GEMM_NAMES[kernel])
    rows = {2: _STREAM_16[kernel][arch], 4: _STREAM_32, 8: _STREAM_64}[itemsize]
    return _stream(rows, _RED[kernel])


def block_r(r):
    """Rank block: r padded to a power of two ≥ 16 (``tl.dot`` needs dims ≥ 16), ≤ MAX_BLOCK_R."""
    return min(max(16, triton.next_power_of_2(r)), MAX_BLOCK_R)


def m_key(M):
    """Autotune bucket of M: the next power of two, so varying token counts share a config."""
    return triton.next_power_of_2(max(int(M), 1))


def _prune(kernel):
    """Drop configs whose row block is far larger than M (they waste most of a tile)."""

    def prune(configs, named_args, **kwargs):
        # fastlora launches with keyword arguments only, which Triton passes here as **kwargs
        M = {**named_args, **kwargs}["M_KEY"]
        keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(M, 16) * 2]
        return keep or configs[-1:]

    return prune


_AUTOTUNE_KEYS = {
    "shrink": ["M_KEY", "K", "R", "HAS_DROPOUT"],
    "fwd": ["M_KEY", "N", "K", "R", "HAS_BIAS"],
    "bwd_dy": ["M_KEY", "N", "R", "COMPUTE_DS", "COMPUTE_DB"],
    "bwd_dx": ["M_KEY", "N", "K", "R", "HAS_DROPOUT"],
    "bwd_da": ["M_KEY", "N", "K", "R", "HAS_DROPOUT", "DO_DA", "DO_DB"],
}
_RESET = {"bwd_dy": ["db_ptr"], "bwd_da": ["da_ptr", "db_ptr"]}

# Meta-parameters derived from the sizes and the chosen config: the reduction loop drops its
# tail masks when its length is a multiple of the block.
HEURISTICS = {
    "shrink": {"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0},
    "fwd": {"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0},
    "bwd_dy": {"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0},
    "bwd_dx": {"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0},
    "bwd_da": {},
}


def derived_meta(kernel, args):
    """Values of ``HEURISTICS[kernel]`` for the launch arguments + config ``args``."""
    return {name: fn(args) for name, fn in HEURISTICS[kernel].items()}


@functools.lru_cache(maxsize=None)
def autotuned(kernel, raw_fn, arch, itemsize, device_index=None):
    """The ``triton.autotune`` wrapper of ``raw_fn`` for ``arch`` and one device (built once,
    cached: each GPU tunes for itself and no two devices share an autotuner's state).

    Atomically accumulated workspaces are reset to zero between trials (``reset_to_zero``)."""
    fn = triton.heuristics(HEURISTICS[kernel])(raw_fn) if HEURISTICS[kernel] else raw_fn
    return triton.autotune(
        configs=configs_for(kernel, arch, itemsize),
        key=_AUTOTUNE_KEYS[kernel],
        prune_configs_by={"early_config_prune": _prune(kernel)},
        reset_to_zero=_RESET.get(kernel),
    )(fn)
