"""One way to launch a fastlora kernel: interpreter config, fixed config, or autotuned.

``LAUNCH_COUNTS`` counts launches per kernel name; tests use it to check the launch budget
(forward ≤ 2, backward ≤ 3) without a GPU profiler.

``FASTLORA_AUTOTUNE=0`` in the environment (read at each launch) replaces autotuning by the
first candidate config of the architecture: each new shape then costs no benchmarking, which
suits test suites with many shapes (bench/device_check.sh sets it for its test stage).
"""
import collections
import os

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from . import configs

LAUNCH_COUNTS = collections.Counter()


def is_interpreted(raw_fn):
    """True when ``raw_fn`` was decorated under ``TRITON_INTERPRET=1``."""
    return isinstance(raw_fn, InterpretedFunction)


def dot_precision(dtype):
    """``tl.dot`` input precision: tf32 for fp32 operands iff torch allows tf32 matmuls."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def launch(name, raw_fn, grid, device, itemsize, fixed=False, **kwargs):
    """Launch ``raw_fn`` (kernel ``name`` in ``configs``) on ``grid(meta)``.

    Under the interpreter the large-block ``INTERPRETER_CONFIGS[name]`` is used; with
    ``fixed=True`` (deterministic mode, whose workspaces are sized by the config) the first
    candidate of the architecture; otherwise the autotuned wrapper picks and caches the best.
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
        tuned = configs.autotuned(name, raw_fn, arch, itemsize)
        tuned[grid](**kwargs)
        return tuned.best_config.kwargs


def fixed_meta(name, raw_fn, device, itemsize):
    """The meta-parameters ``launch(..., fixed=True)`` will use (to size workspaces first)."""
    if is_interpreted(raw_fn):
        return configs.INTERPRETER_CONFIGS[name]
    arch = configs.arch_of(torch.cuda.get_device_capability(device))
    return configs.configs_for(name, arch, itemsize)[0].kwargs


def cdiv(a, b):
    return triton.cdiv(a, b)
