"""Which implementation runs for a device: compiled Triton, the Triton interpreter, or torch."""
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


def kernel_backend(device):
    """Implementation fastlora uses for tensors on ``device``.

    Returns:
        ``"triton"`` for NVIDIA GPUs of compute capability ≥ 8.0 (compiled kernels; their tiles
        and bf16 need Ampere or newer), ``"triton-interpreter"`` when
        ``TRITON_INTERPRET=1`` was set before fastlora's kernels were imported (any device, the
        kernels run on the CPU), otherwise ``"torch"`` (pure-torch path with the same math and
        the same dropout mask; also used when Triton is not installed, on older GPUs and on
        ROCm, whose tiles are not tuned here).
    """
    device = torch.device(device)
    if _override is not None:
        return _override
    k = kernels()
    if k is None:
        return "torch"
    if k.INTERPRETED:
        return "triton-interpreter"
    if device.type == "cuda" and torch.version.hip is None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if torch.cuda.get_device_capability(index) >= k.configs.MIN_CAPABILITY:
            return "triton"
    return "torch"


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
