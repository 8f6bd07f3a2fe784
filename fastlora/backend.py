"""Which implementation runs a call: compiled Triton, the Triton interpreter, or torch."""
import contextlib
import functools

import torch

BACKENDS = ("triton", "triton-interpreter", "torch")
_override = None


@functools.lru_cache(maxsize=None)
def kernels():
    """The ``fastlora.kernels`` module, or None when Triton cannot be imported here."""
    try:
        from fastlora import kernels as k
    except ImportError:  # no triton (e.g. macOS, Windows): the torch path serves every device
        return None
    return k


@functools.lru_cache(maxsize=None)
def _capability(index):
    return torch.cuda.get_device_capability(index)


def _device_backend(device):
    """(backend, reason) for ``device`` regardless of dtypes."""
    k = kernels()
    if k is None:
        return "torch", "triton is not installed"
    if k.INTERPRETED:
        return "triton-interpreter", "TRITON_INTERPRET=1 was set before fastlora's kernels were imported"
    if device.type == "cuda":
        if torch.version.hip is not None:
            return "torch", "ROCm: the kernels' tiles are tuned for NVIDIA GPUs only"
        index = device.index if device.index is not None else torch.cuda.current_device()
        if _capability(index) >= k.configs.MIN_CAPABILITY:
            return "triton", f"CUDA device of compute capability {_capability(index)}"
        return "torch", f"compute capability {_capability(index)} < {k.configs.MIN_CAPABILITY}"
    return "torch", f"{device.type} device: the Triton kernels need a CUDA GPU (or the interpreter)"


def _unsupported(backend, dtype, lora_dtype):
    """Why ``backend`` cannot compute this dtype pair (None if it can)."""
    if backend == "torch" or dtype is None:
        return None
    lora_dtype = lora_dtype or dtype
    if backend == "triton-interpreter" and torch.bfloat16 in (dtype, lora_dtype):
        return ("bfloat16 under the Triton interpreter: its bf16 tl.dot multiplies raw bit patterns "
                "(triton-lang/triton#11584)")
    if (dtype == torch.float64) != (lora_dtype == torch.float64):
        return f"compute dtype {dtype} with LoRA dtype {lora_dtype}: the kernels accumulate in one of fp32 / fp64"
    return None


def select_backend(device, dtype=None, lora_dtype=None):
    """``(backend, reason)`` for a call on ``device`` with compute dtype ``dtype`` and LoRA dtype
    ``lora_dtype`` (see :func:`kernel_backend`). A backend forced by :func:`force_backend` that
    cannot compute the dtypes raises ValueError instead of computing something else."""
    device = torch.device(device)
    if _override is not None:
        why = _unsupported(_override, dtype, lora_dtype)
        if why is not None:
            raise ValueError(f"backend: {_override!r} was forced, but it cannot compute this call: {why}")
        return _override, "forced by fastlora.backend.force_backend"
    backend, reason = _device_backend(device)
    why = _unsupported(backend, dtype, lora_dtype)
    if why is not None:
        return "torch", why
    return backend, reason


def kernel_backend(device, dtype=None, lora_dtype=None):
    """Implementation fastlora uses for a call on ``device``.

    Args:
        device: a ``torch.device`` or string.
        dtype: the compute dtype (the input's; the autocast dtype under autocast), or None to ask
            about the device alone.
        lora_dtype: the dtype of the LoRA matmuls (PEFT: the adapters' dtype outside autocast,
            the autocast dtype under it); default ``dtype``.

    Returns:
        ``"triton"`` for NVIDIA GPUs of compute capability ≥ 8.0 (compiled kernels; their tiles
        and bf16 need Ampere or newer), ``"triton-interpreter"`` when ``TRITON_INTERPRET=1`` was
        set before fastlora's kernels were imported (any device, the kernels run on the CPU),
        otherwise ``"torch"`` (pure-torch path with the same math and the same dropout mask; also
        used when Triton is not installed, on older GPUs, on ROCm, for bfloat16 under the
        interpreter, which computes bf16 dots wrongly, and for fp64 mixed with another dtype).
        :func:`fastlora.explain_path` also gives the reason and the Triton path.
    """
    return select_backend(device, dtype, lora_dtype)[0]


def forced_backend():
    """The backend forced by :func:`force_backend`, or "" (plain global read: traceable)."""
    return _override or ""


@contextlib.contextmanager
def force_backend(name):
    """Testing aid: run every call inside the block on backend ``name`` (a value of BACKENDS).

    ``"triton"`` still needs CUDA tensors; ``"triton-interpreter"`` needs TRITON_INTERPRET=1."""
    global _override
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous
