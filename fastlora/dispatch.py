"""Which Triton path a call takes: the fused GEMMs, or cuBLAS for the big GEMMs + Triton LoRA kernels.

Two paths compute the same function with the same dropout masks and save the same tensors for
backward (kernels/lora_forward.py, kernels/lora_backward.py):

* ``fused``: the LoRA work rides inside Triton GEMMs (forward: shrink + one GEMM over K+r;
  backward: dS/dB pass, one dx GEMM, dA pass). Fewest bytes; as fast as the Triton GEMM is.
* ``hybrid``: cuBLAS computes ``x·Wᵀ + b`` and ``dy·W`` (torch.addmm / torch.mm), Triton the LoRA
  side (shrink, the rank-r update of y, dS/dB, and one pass that adds ``m ⊙ (dS·A)`` into dx and
  computes dA). One extra read and write of y and of dx; cuBLAS's GEMM speed.

Which is faster depends on the GPU, the shape and the dtype, so it is measured: the first call
of each key (GPU, compute and LoRA dtypes, M bucket, N, K, r bucket, dropout on/off, weight and
input layouts, bias, torch's fp32 matmul precision when fp32 is involved, and for the backward
which gradients are needed) times both paths on the call's
own tensors (a few ms: one warm-up each, which also tunes their kernels, then interleaved timed
repetitions), keeps the faster in memory and in a JSON file under the user's cache directory
(``$FASTLORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastlora``, else ``~/.cache/fastlora``), one per
GPU name and keyed by the torch, triton and fastlora versions. A file that cannot be read, or
that another version wrote, is ignored with a warning and rewritten. Forward and backward are
chosen separately (they share only what the forward saves, which both paths produce alike).

Fixed choices, never timed: ``FASTLORA_PATH=fused|hybrid`` (``auto``, the default, measures;
both paths have a deterministic mode: no atomics, fixed configs, and for cuBLAS torch's
``CUBLAS_WORKSPACE_CONFIG``); ``torch.use_deterministic_algorithms(True)`` without a forced
path: fused (cuBLAS would need ``CUBLAS_WORKSPACE_CONFIG``); during CUDA-graph capture with
nothing known for the key: hybrid, not remembered (timing would be recorded into the graph);
the backward of r > ``MAX_FULL_RANK``: fused (the hybrid dA pass keeps all of r per program);
under the Triton interpreter (no GPU to time): fused. :func:`explain_path` says what a call
takes and why.
"""
import contextlib
import dataclasses
import json
import os
import re
import statistics
import threading
import warnings

import torch

PATHS = ("fused", "hybrid")
_ENV = "FASTLORA_PATH"
# Testing hook: time the paths even where no GPU is (the Triton interpreter on a CPU), so that the
# measuring logic runs in CI with an injected timer (kernels.launch.set_timer).
MEASURE_WITHOUT_GPU = False
_LOCK = threading.Lock()
_MEMORY = {}  # (gpu, key) -> Decision
_LOADED = set()  # gpu names whose cache file was read


@dataclasses.dataclass(frozen=True)
class Decision:
    """A path and why. ``times_ms``: the measured medians, when measured."""
    path: str
    reason: str
    times_ms: tuple = ()


def forced_path():
    """The path ``FASTLORA_PATH`` forces, or None for ``auto`` / unset. Raises ValueError for any
    other value (read at each call)."""
    value = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if value == "auto":
        return None
    if value not in PATHS:
        raise ValueError(f"{_ENV}: expected one of fused, hybrid, auto, got {value!r}")
    return value


def cache_dir():
    """Directory of the dispatch cache files."""
    if os.environ.get("FASTLORA_CACHE_DIR"):
        return os.environ["FASTLORA_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastlora")


def _versions():
    import triton

    from . import __version__
    return {"torch": torch.__version__, "triton": triton.__version__, "fastlora": __version__}


def cache_file(gpu):
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", gpu).strip("_") or "gpu"
    return os.path.join(cache_dir(), f"dispatch-{slug}.json")


def _load(gpu):
    """Read the GPU's cache file into memory once per process (ignoring a bad or stale one)."""
    if gpu in _LOADED:
        return
    _LOADED.add(gpu)
    path = cache_file(gpu)
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("choices"), dict):
            raise ValueError("not a fastlora dispatch cache")
        if data.get("gpu") != gpu or data.get("versions") != _versions():
            warnings.warn(f"fastlora: ignoring {path}: written for {data.get('gpu')!r} with {data.get('versions')}, "
                          f"this is {gpu!r} with {_versions()}; paths will be measured again", stacklevel=3)
            return
        for key, entry in data["choices"].items():
            if entry.get("path") not in PATHS:
                raise ValueError(f"entry {key!r} has path {entry.get('path')!r}")
            times = tuple(float(t) for t in entry.get("times_ms", ()))
            _MEMORY[(gpu, key)] = Decision(entry["path"], f"measured earlier (cache {path})", times)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        warnings.warn(f"fastlora: ignoring the unreadable dispatch cache {path} ({e}); paths will be measured "
                      "again", stacklevel=3)


def _save(gpu):
    """Write the GPU's measured choices (atomically: a temporary file, then a rename)."""
    path = cache_file(gpu)
    choices = {k: {"path": d.path, "times_ms": list(d.times_ms)} for (g, k), d in _MEMORY.items()
               if g == gpu and d.times_ms}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"gpu": gpu, "versions": _versions(), "choices": choices}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not break training
        warnings.warn(f"fastlora: could not write the dispatch cache {path} ({e})", stacklevel=3)


def key_of(kind, x, weight, lora_A, lora_dtype, has_bias, dropout, extra=(), dtype=None):
    """The dispatch key of a call (a string, as stored in the cache file); ``dtype``: the compute
    dtype if not x's (autocast)."""
    import triton
    K = x.shape[-1]
    M = x.numel() // max(K, 1)
    N, r = weight.shape[0], lora_A.shape[0]
    from .kernels.launch import tf32_allowed
    layout = "t" if weight.stride(0) == 1 and weight.stride(1) != 1 else "n"
    x_layout = "c" if x.stride(-1) == 1 else "s"
    fp32 = torch.float32 in (dtype or x.dtype, lora_dtype)
    parts = [kind, str(dtype or x.dtype).removeprefix("torch."), str(lora_dtype).removeprefix("torch."),
             f"M{triton.next_power_of_2(max(M, 1))}", f"N{N}", f"K{K}", f"r{max(16, triton.next_power_of_2(r))}",
             f"p{int(dropout)}", f"W{layout}", f"x{x_layout}", f"b{int(has_bias)}",
             *(["tf32" if tf32_allowed() else "ieee"] if fp32 else []), *extra]
    return "|".join(parts)


def gpu_name(device):
    """The name that keys a device's decisions (``torch.cuda.get_device_name``; "cpu" elsewhere)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def measurable(device, interpreted):
    """Whether paths can be timed here: a CUDA device running compiled kernels."""
    return MEASURE_WITHOUT_GPU or (device.type == "cuda" and not interpreted)


def fixed_decision(r, kind, can_measure):
    """The decision taken without measuring, or None when the call is to be measured."""
    from .kernels import configs
    forced = forced_path()
    if kind == "bwd" and r > configs.MAX_FULL_RANK:
        if forced == "hybrid":
            return Decision("fused", f"{_ENV}=hybrid, but the hybrid backward needs r <= {configs.MAX_FULL_RANK}")
        return Decision("fused", f"the hybrid backward needs r <= {configs.MAX_FULL_RANK} (r = {r})")
    if forced is not None:
        return Decision(forced, f"forced by {_ENV}={forced}")
    if torch.are_deterministic_algorithms_enabled():
        return Decision("fused", "deterministic algorithms: the fused path's no-atomics mode")
    if not can_measure:
        return Decision("fused", "Triton interpreter: no GPU to time the paths on; fused by default")
    return None


def known(device, key):
    """The decision already taken for ``key`` on this GPU (memory or cache file), or None."""
    gpu = gpu_name(device)
    with _LOCK:
        _load(gpu)
        return _MEMORY.get((gpu, key))


def choose(device, key, r, kind, runners, interpreted=False, reps=5):
    """The path for this call. ``runners``: ``{"fused": fn, "hybrid": fn}``, each running the whole
    forward (or backward) of this call on fresh outputs, used to time it (never while capturing)."""
    from .kernels import launch
    decision = fixed_decision(r, kind, measurable(device, interpreted))
    if decision is not None:
        return decision
    decision = known(device, key)
    if decision is not None:
        return decision
    if launch.capturing(device):
        return Decision("hybrid", "CUDA-graph capture of a shape not measured yet: cuBLAS + Triton by default")
    gpu = gpu_name(device)
    with _LOCK:
        decision = _MEMORY.get((gpu, key))
        if decision is not None:
            return decision
        timer = launch.timer("path")
        with (torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()):
            # on x's device: the events of the timer are recorded on its current stream
            for fn in runners.values():
                fn()  # warm-up: compiles and tunes the path's kernels
            samples = {p: [] for p in runners}
            for _ in range(reps):  # interleaved, so that clock drift hits both alike
                for p, fn in runners.items():
                    samples[p].append(timer(fn))
        times = tuple(statistics.median(samples[p]) for p in PATHS)
        best = PATHS[min(range(len(PATHS)), key=times.__getitem__)]
        decision = Decision(best, f"measured: fused {times[0]:.4g} ms, hybrid {times[1]:.4g} ms", times)
        _MEMORY[(gpu, key)] = decision
        _save(gpu)
    return decision


def forget():
    """Drop every in-memory decision (tests; the cache files stay)."""
    with _LOCK:
        _MEMORY.clear()
        _LOADED.clear()


@dataclasses.dataclass(frozen=True)
class PathInfo:
    """What :func:`explain_path` reports."""
    backend: str
    forward: str
    backward: str
    reason: str

    def __str__(self):
        return f"backend {self.backend}: forward {self.forward}, backward {self.backward} ({self.reason})"


def explain_path(input, weight, lora_A, lora_B, bias=None, *, dropout_p=0.0, training=True, lora_dtype=None):
    """Which backend and which Triton path :func:`fastlora.lora_linear` takes for these arguments,
    and why; nothing is launched or timed.

    Args: as :func:`fastlora.lora_linear` (``lora_dtype``: as :class:`fastlora.LoRALinearFunction`;
    under ``torch.autocast`` the autocast dtype is used, as the call would). The backward's path
    is reported for the gradients the tensors' ``requires_grad`` flags ask for.

    Returns:
        :class:`PathInfo` ``(backend, forward, backward, reason)``: forward/backward are "fused",
        "hybrid", or "measured at the first call" for a shape this GPU has not timed yet ("-" on
        the torch backend).

    Raises:
        TypeError / ValueError as :func:`fastlora.lora_linear` for invalid arguments.
    """
    from ._checks import autocast_enabled, check_inputs, check_lora_dtype
    from .backend import kernels, select_backend
    device_type = input.device.type if isinstance(input, torch.Tensor) else "cpu"
    autocast = autocast_enabled(device_type)
    check_inputs(input, weight, lora_A, lora_B, bias, same_dtype=not autocast)
    if autocast:
        dtype = lora = torch.get_autocast_dtype(device_type)
    else:
        dtype, lora = input.dtype, check_lora_dtype(lora_dtype, lora_A)
    backend, why = select_backend(input.device, dtype, lora)
    if backend == "torch":
        return PathInfo("torch", "-", "-", why)
    dropout = training and dropout_p > 0
    can_measure = measurable(input.device, kernels().INTERPRETED)
    need = "dx" * input.requires_grad + "dA" * lora_A.requires_grad + "dB" * lora_B.requires_grad
    out, reasons = [], []
    for kind, extra, has_bias in (("fwd", (), bias is not None), ("bwd", (need,), False)):
        d = fixed_decision(lora_A.shape[0], kind, can_measure)
        if d is None:
            d = known(input.device, key_of(kind, input, weight, lora_A, lora, has_bias, dropout, extra, dtype))
        if d is None:
            d = Decision("measured at the first call", "not timed on this GPU yet")
        out.append(d.path)
        reasons.append(f"{kind}: {d.reason}")
    return PathInfo(backend, out[0], out[1], f"{why}; " + "; ".join(reasons))
