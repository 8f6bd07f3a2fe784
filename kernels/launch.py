"""One way to launch a fastlora kernel: interpreter config, fixed config, or autotuned.

``LAUNCH_COUNTS`` counts launches per kernel name; tests use it to check the launch budget
(forward ≤ 2, backward ≤ 3) without a GPU profiler.

``FASTLORA_AUTOTUNE=0`` in the environment (read at each launch) replaces autotuning by the
first candidate config of the architecture: each new shape then costs no benchmarking, which
suits test suites with many shapes (bench/device_check.sh sets it for its test stage).
"""
import collections
import os
import threading

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from . import configs

LAUNCH_COUNTS = collections.Counter()


def is_interpreted(raw_fn):
    """True when ``raw_fn`` was decorated under ``TRITON_INTERPRET=1``."""
    return isinstance(raw_fn, InterpretedFunction)


def tf32_allowed():
    """Whether torch allows TF32 for fp32 CUDA matmuls, read through the API the user set:
    ``torch.backends.cuda.matmul.fp32_precision`` ("tf32" / "ieee"), else the legacy
    ``allow_tf32`` (reading it raises once the new API was used, hence the order)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return False


def dot_precision(dtype):
    """``tl.dot`` input precision: tf32 for fp32 operands iff torch allows tf32 matmuls."""
    if dtype == torch.float32 and tf32_allowed():
        return "tf32"
    return "ieee"


# In-tile offsets are int32 (block bases are int64): a tile spans at most MAX_BLOCK rows and
# columns, so every stride times MAX_BLOCK must stay below 2³¹.
MAX_BLOCK = 256


def tile_addressable(t, name):
    """``t``, or a contiguous copy if one of its strides is too large for int32 in-tile offsets
    (e.g. a transposed input with more than 8M rows). Raises ValueError when even the
    contiguous layout is too large (rows of more than 8M elements)."""
    def fits(u):
        return all(abs(s) * MAX_BLOCK < 2 ** 31 for s in u.stride())
    if fits(t):
        return t
    t = t.contiguous()
    if not fits(t):
        raise ValueError(f"{name}: rows of {t.shape[-1]} elements are too long for fastlora's kernels "
                         f"(limit {(2 ** 31) // MAX_BLOCK - 1})")
    return t


_TUNE_LOCK = threading.Lock()


def launch(name, raw_fn, grid, device, itemsize, fixed=False, **kwargs):
    """Launch ``raw_fn`` (kernel ``name`` in ``configs``) on ``grid(meta)``.

    Under the interpreter the large-block ``INTERPRETER_CONFIGS[name]`` is used; with
    ``fixed=True`` (deterministic mode: the config must not depend on timing) the first
    candidate of the architecture; otherwise the autotuned wrapper of this device picks and
    caches the best (under a lock: autograd runs one backward thread per GPU).
    """
    LAUNCH_COUNTS[name] += 1
    if is_interpreted(raw_fn):
        meta = configs.INTERPRETER_CONFIGS[name]
        raw_fn[grid(meta)](**kwargs, **meta, **configs.derived_meta(name, {**kwargs, **meta}))
        return meta
    arch = configs.arch_of(torch.cuda.get_device_capability(device))
    fixed = fixed or os.environ.get("FASTLORA_AUTOTUNE", "1") == "0"
    with torch.cuda.device(device):
        if fixed:
            cfg = configs.configs_for(name, arch, itemsize)[0]
            derived = configs.derived_meta(name, {**kwargs, **cfg.kwargs})
            raw_fn[grid(cfg.kwargs)](**kwargs, **cfg.kwargs, **derived, num_warps=cfg.num_warps,
                                     num_stages=cfg.num_stages)
            return cfg.kwargs
        tuned = configs.autotuned(name, raw_fn, arch, itemsize, device.index)
        with _TUNE_LOCK:
            tuned[grid](**kwargs)
            return tuned.best_config.kwargs


def cdiv(a, b):
    return triton.cdiv(a, b)
