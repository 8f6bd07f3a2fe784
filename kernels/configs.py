"""Tile configurations per GPU architecture, pruning, and the autotune wrappers.

Every raw ``@triton.jit`` kernel stays callable with an explicit config (the interpreter and
the compile-only tests do that); the ``triton.autotune`` wrappers are built lazily, one per
(kernel, architecture), because the candidate list depends on the architecture and autotuning
with several configs needs a GPU driver.

Status of the numbers: no GPU was available when these lists were written, so they are
*candidates*, not measurements. Each was chosen from the shared-memory budget
``(BLOCK_M·BLOCK_K + BLOCK_K·BLOCK_N)·itemsize·num_stages`` against the architecture's
per-block limit (sm_80: 163 KiB, sm_86/89: 99 KiB, sm_90: 227 KiB), and every one of them is
compiled on the CPU for sm_80 and sm_90 by ``tests/test_kernel_configs.py``, which asserts zero
register spills, shared memory within the limit, and tensor-core instructions (``wgmma`` on
sm_90). ``triton.autotune`` picks among them on the user's GPU, keyed by bucketed M, N, K, r and
the dtypes. Replace these comments with measured numbers once ``bench/`` has run on a GPU.
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

# Largest rank block; r beyond it is tiled over a grid axis (each tile re-reads its operand).
# 128 keeps the fp32 [BLOCK_M, BLOCK_R] accumulator at ≤ 64 registers/thread for BLOCK_M=64,
# 4 warps.
MAX_BLOCK_R = 128


def _c(num_warps, num_stages, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# GEMM-shaped kernels (F2: y tile [BLOCK_M, BLOCK_N] over K; B2: dx tile [BLOCK_M, BLOCK_K]
# over N). 128x128x64 with 8 warps / 3 stages is the usual Hopper bf16 starting point; the
# 64-wide tiles cover small M (decode-like batches) and narrow N (k/v projections).
_GEMM_16 = {
    "sm90": [
        _c(8, 3, BM=128, BN=128, BK=64, GROUP_M=8),
        _c(8, 3, BM=128, BN=256, BK=64, GROUP_M=8),
        _c(4, 4, BM=128, BN=128, BK=64, GROUP_M=8),
        _c(4, 4, BM=64, BN=128, BK=64, GROUP_M=8),
        _c(4, 4, BM=128, BN=64, BK=64, GROUP_M=8),
        _c(4, 5, BM=64, BN=64, BK=64, GROUP_M=8),
    ],
    "sm80": [
        _c(8, 3, BM=128, BN=256, BK=32, GROUP_M=8),
        _c(4, 4, BM=128, BN=128, BK=32, GROUP_M=8),
        _c(8, 3, BM=128, BN=128, BK=64, GROUP_M=8),
        _c(4, 4, BM=64, BN=128, BK=32, GROUP_M=8),
        _c(4, 4, BM=128, BN=64, BK=32, GROUP_M=8),
        _c(4, 5, BM=64, BN=64, BK=32, GROUP_M=8),
    ],
}
_GEMM_32 = [  # fp32 operands: half the BLOCK_K for the same bytes per stage
    _c(8, 3, BM=128, BN=128, BK=32, GROUP_M=8),
    _c(4, 3, BM=64, BN=128, BK=32, GROUP_M=8),
    _c(4, 4, BM=64, BN=64, BK=32, GROUP_M=8),
]
_GEMM_64 = [_c(4, 2, BM=32, BN=32, BK=16, GROUP_M=8)]  # fp64: correctness path, FMA units

# Streaming kernels (F1 over x, B1 over dy, B3 over x): a [BLOCK_M, BLOCK_K] tile of the big
# operand per step, a thin rank-r dot. Enough rows in flight per SM matters more than tile shape.
_STREAM_16 = [
    _c(4, 4, BM=64, BK=64),
    _c(4, 3, BM=64, BK=128),
    _c(4, 4, BM=32, BK=128),
    _c(8, 3, BM=128, BK=64),
    _c(4, 4, BM=16, BK=256),
]
_STREAM_32 = [
    _c(4, 3, BM=64, BK=32),
    _c(4, 3, BM=32, BK=64),
]
_STREAM_64 = [_c(4, 2, BM=32, BK=16)]

# Names of the meta-parameters of each kernel, in the abbreviations used above.
_NAMES = {
    "shrink": dict(BM="BLOCK_M", BK="BLOCK_K"),
    "fwd": dict(BM="BLOCK_M", BN="BLOCK_N", BK="BLOCK_K", GROUP_M="GROUP_M"),
    "bwd_dy": dict(BM="BLOCK_M", BK="BLOCK_N"),
    "bwd_dx": dict(BM="BLOCK_M", BN="BLOCK_K", BK="BLOCK_N", GROUP_M="GROUP_M"),
    "bwd_da": dict(BM="BLOCK_M", BK="BLOCK_K"),
}
_SHAPE = {"shrink": "stream", "fwd": "gemm", "bwd_dy": "stream", "bwd_dx": "gemm", "bwd_da": "stream"}

SHARED_LIMIT = {"sm80": 163 * 1024, "sm86": 99 * 1024, "sm90": 227 * 1024}


def arch_of(capability):
    """Config family for a CUDA compute capability ``(major, minor)``."""
    major, minor = capability
    if major >= 9:
        return "sm90"
    if (major, minor) in ((8, 6), (8, 7), (8, 9)):
        return "sm86"  # sm_80 tiles, pruned to the 99 KiB shared-memory budget
    return "sm80"


def configs_for(kernel, arch, itemsize):
    """Candidate ``triton.Config`` list of ``kernel`` for ``arch`` and an operand itemsize."""
    family = _SHAPE[kernel]
    if family == "gemm":
        raw = {2: _GEMM_16["sm90" if arch == "sm90" else "sm80"], 4: _GEMM_32, 8: _GEMM_64}[itemsize]
    else:
        raw = {2: _STREAM_16, 4: _STREAM_32, 8: _STREAM_64}[itemsize]
    names = _NAMES[kernel]
    out = []
    for cfg in raw:
        meta = {names[k]: v for k, v in cfg.kwargs.items() if k in names}
        c = triton.Config(meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if shared_bytes_estimate(kernel, c.kwargs, itemsize, c.num_stages) <= SHARED_LIMIT[arch]:
            out.append(c)
    return out


def shared_bytes_estimate(kernel, meta, itemsize, num_stages, block_r=MAX_BLOCK_R):
    """Pipelined operand bytes per block (an upper-bound model, checked against the compiler)."""
    if kernel == "fwd":
        per_stage = (meta["BLOCK_M"] + meta["BLOCK_N"]) * meta["BLOCK_K"]
    elif kernel == "bwd_dx":
        per_stage = (meta["BLOCK_M"] + meta["BLOCK_K"]) * meta["BLOCK_N"]
    elif kernel == "bwd_dy":
        per_stage = meta["BLOCK_M"] * meta["BLOCK_N"] + meta["BLOCK_N"] * block_r
    else:
        per_stage = meta["BLOCK_M"] * meta["BLOCK_K"] + meta["BLOCK_K"] * block_r
    return per_stage * itemsize * num_stages


def block_r(r):
    """Rank block: r padded to a power of two ≥ 16 (``tl.dot`` needs dims ≥ 16), ≤ MAX_BLOCK_R."""
    return min(max(16, triton.next_power_of_2(r)), MAX_BLOCK_R)


def m_key(M):
    """Autotune bucket of M: the next power of two, so varying token counts share a config."""
    return triton.next_power_of_2(max(int(M), 1))


def _prune(kernel):
    """Drop configs whose row block is far larger than M (they waste a whole tile)."""

    def prune(configs, named_args, **kwargs):
        M = named_args["M_KEY"]
        keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(M, 16) * 2]
        return keep or configs[-1:]

    return prune


_AUTOTUNE_KEYS = {
    "shrink": ["M_KEY", "K", "R", "HAS_DROPOUT"],
    "fwd": ["M_KEY", "N", "K", "R", "HAS_BIAS"],
    "bwd_dy": ["M_KEY", "N", "R", "COMPUTE_DS", "COMPUTE_DB"],
    "bwd_dx": ["M_KEY", "N", "K", "R", "HAS_DROPOUT"],
    "bwd_da": ["M_KEY", "K", "R", "HAS_DROPOUT"],
}
_RESET = {"bwd_dy": ["db_ptr"], "bwd_da": ["da_ptr"]}


@functools.lru_cache(maxsize=None)
def autotuned(kernel, raw_fn, arch, itemsize):
    """The ``triton.autotune`` wrapper of ``raw_fn`` for ``arch`` (built once, cached).

    Atomically accumulated workspaces are reset to zero between trials (``reset_to_zero``)."""
    return triton.autotune(
        configs=configs_for(kernel, arch, itemsize),
        key=_AUTOTUNE_KEYS[kernel],
        prune_configs_by={"early_config_prune": _prune(kernel)},
        reset_to_zero=_RESET.get(kernel),
    )(raw_fn)
