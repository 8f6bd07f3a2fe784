"""Launching fastlora's kernels: interpreter config, fixed config, or a measured choice.

``LAUNCH_COUNTS`` counts launches per kernel name; tests use it to check the launch budget
without a GPU profiler.

Config choice (``launch``): under ``TRITON_INTERPRET=1`` the large-block interpreter config;
in deterministic mode, with ``FASTLORA_AUTOTUNE=0``, or while a CUDA graph is being captured
and nothing is known yet for the key, the first candidate of the architecture (never timed, never
remembered); otherwise the candidates are timed once per key (fresh output buffers per trial, so
nothing the caller owns is written by a trial) and the fastest is remembered for the process.

The key is everything the best tile can depend on: the kernel, device, the constexpr flags and
dot precisions, the sizes except M (bucketed to a power of two), which strides are 1 (a
transposed weight is another kernel), and the dtypes of the tensor arguments.

The timer is pluggable (:func:`set_timer`) so that the choice logic is tested without a GPU.
"""
import collections
import contextlib
import os
import threading

import torch
import triton
import triton.language as tl
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
    """``tl.dot`` input precision of the base GEMM: tf32 for fp32 operands iff torch allows tf32
    matmuls (what cuBLAS would do), else ieee."""
    if dtype == torch.float32 and tf32_allowed():
        return "tf32"
    return "ieee"


def lora_precision(dtype):
    """``tl.dot`` input precision of LoRA matmuls whose operands are in ``dtype``: for fp32, tf32
    iff torch allows tf32 matmuls, else ieee (PEFT's fp32 adapters get fp32 matmuls)."""
    return dot_precision(dtype)


_HALF = (torch.float16, torch.bfloat16)


def _tl(dtype):
    return configs.tl_dtype(dtype)


def stream_lora_args(dtype, lora_dtype):
    """Constexprs of the LoRA products in the streaming kernels (shrink, dS/dB, dA) for compute
    dtype ``dtype`` and LoRA dtype ``lora_dtype``: fp32 LoRA math on a 16-bit model uses the exact
    operand split of kernels/precision.py (pieces of the model dtype on tensor cores), anything
    else rounds both operands to the LoRA dtype."""
    if lora_dtype == torch.float32 and dtype in _HALF:
        return dict(LORA_DTYPE=_tl(dtype), LORA_PRECISION="ieee", PIECES=3 if dtype == torch.bfloat16 else 2)
    return dict(LORA_DTYPE=_tl(lora_dtype), LORA_PRECISION=lora_precision(lora_dtype), PIECES=1)


def epilogue_lora_args(dtype, lora_dtype):
    """Constexprs of the LoRA term the GEMM-shaped kernels add to a tile they round to the model
    dtype (``(s·S)·Bᵀ`` into y, ``dS·A`` into dx): both operands fp32 for fp32 LoRA math on a
    16-bit model, where ``tf32x3`` (about 2⁻²¹ relative) is far below the output's rounding."""
    if lora_dtype == torch.float32 and dtype in _HALF:
        return dict(EPI_DTYPE=tl.float32, EPI_PRECISION="tf32" if tf32_allowed() else "tf32x3")
    return dict(EPI_DTYPE=_tl(lora_dtype), EPI_PRECISION=lora_precision(lora_dtype))


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


def cdiv(a, b):
    return triton.cdiv(a, b)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def _cuda_timer(fn):
    """Median ms of ``fn`` (CUDA events, L2 flushed between repetitions), a short budget: the
    config choice of one kernel launch."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


def _event_timer(fn):
    """ms of one call of ``fn`` measured with CUDA events on the current stream: one sample of a
    whole forward or backward (the path choice takes the median of interleaved samples)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


_TIMERS = {"config": _cuda_timer, "path": _event_timer}


def set_timer(timer):
    """Replace the functions ``timer(fn) -> milliseconds`` that compare kernel configs and paths
    (``None`` restores CUDA-event timing). Returns the previous pair. Tests inject a fake."""
    previous = dict(_TIMERS)
    if timer is None:
        _TIMERS.update(config=_cuda_timer, path=_event_timer)
    elif isinstance(timer, dict):
        _TIMERS.update(timer)
    else:
        _TIMERS.update(config=timer, path=timer)
    return previous


def timer(kind="path"):
    return _TIMERS[kind]


def capturing(device):
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def autotune_enabled():
    return os.environ.get("FASTLORA_AUTOTUNE", "1") != "0"


# ----------------------------------------------------------------------------------------------
# Config choice
# ----------------------------------------------------------------------------------------------
_BEST = {}  # tuning key -> triton.Config, per process
_TUNE_LOCK = threading.Lock()  # autograd runs one backward thread per GPU


def tuning_key(name, device, args):
    """What the best config of ``name`` can depend on (see the module docstring): tensor dtypes
    and 16-byte alignment, which strides are 1 or multiples of 16 (Triton specialises on both),
    and every upper-case argument (sizes, flags, precisions) but the raw M."""
    key = [name, str(device)]
    for k, v in sorted(args.items()):
        if isinstance(v, torch.Tensor):
            key.append((k, str(v.dtype), v.data_ptr() % 16 == 0))
        elif k.startswith("stride_"):
            key.append((k, v == 1, v % 16 == 0))
        elif k.isupper() and k != "M":
            key.append((k, str(v)))
    return tuple(key)


def _arch(device):
    return configs.arch_of(torch.cuda.get_device_capability(device))


def _device_context(device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def choose_config(name, device, arch, itemsize, args, trial, fixed=False):
    """The config to launch kernel ``name`` with on ``device`` (config family ``arch``);
    ``trial(cfg)`` returns a function that runs it once on scratch outputs (allocated once per
    candidate, so that the timing measures the kernel, not the allocation)."""
    cands = configs.candidates(name, arch, itemsize, args, device)
    if fixed or not autotune_enabled() or len(cands) == 1:
        return cands[0]
    key = tuning_key(name, device, args)
    best = _BEST.get(key)
    if best is not None:
        return best
    if capturing(device):
        return cands[0]  # timing inside a capture would record the trials into the graph
    with _TUNE_LOCK:
        best = _BEST.get(key)
        if best is None:
            times = [_TIMERS["config"](trial(c)) for c in cands]
            best = cands[min(range(len(cands)), key=times.__getitem__)]
            _BEST[key] = best
    return best


def launch(name, raw_fn, grid, device, itemsize, args, outputs=None, fixed=False):
    """Launch ``raw_fn`` (kernel ``name`` of ``configs``) on ``grid(meta)``.

    Args:
        args: the keyword arguments that do not depend on the config (inputs, sizes, strides,
            flags). They key the config choice.
        outputs: ``outputs(meta, trial) -> dict`` of the remaining keyword arguments: the buffers
            the kernel writes, allocated for config ``meta`` (zeroed where it accumulates with
            atomics); with ``trial=True``, scratch buffers (copies of anything updated in place),
            so that timing a config never writes what the caller owns.
        fixed: take the architecture's first candidate (deterministic mode).

    Returns:
        ``(meta, outs)``: the config's meta-parameters and the dict ``outputs`` returned for the
        real launch.
    """
    LAUNCH_COUNTS[name] += 1
    outputs = outputs or (lambda meta, trial: {})
    names = set(raw_fn.arg_names)

    def run(meta, warps_stages, outs):
        full = {**args, **outs, **meta}
        full.update(configs.derived_meta(name, full))
        if "NUM_STAGES" in names:  # kernels that state their loop's stage count (num_stages, or 1 interpreted)
            full["NUM_STAGES"] = warps_stages.get("num_stages", 1)
        kernel_args = {k: v for k, v in full.items() if k in names}
        raw_fn[grid(full)](**kernel_args, **warps_stages)

    if is_interpreted(raw_fn):
        meta = configs.interpreter_config(name, args)
        outs = outputs(meta, False)
        run(meta, {}, outs)
        return meta, outs
    def trial(c):
        outs = outputs(c.kwargs, True)
        return lambda: run(c.kwargs, dict(num_warps=c.num_warps, num_stages=c.num_stages), outs)

    with _device_context(device):
        cfg = choose_config(name, device, _arch(device), itemsize, args, trial, fixed)
        outs = outputs(cfg.kwargs, False)
        run(cfg.kwargs, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages), outs)
    return cfg.kwargs, outs


def reset_tuning():
    """Forget every remembered config (tests; after changing GPU clocks)."""
    _BEST.clear()
