"""fastlora's Triton kernels (installed as ``fastlora.kernels``).

Knows nothing of nn.Module, autograd or PEFT: callers pass validated 2-D tensors.
``TRITON_INTERPRET=1`` must be set before this package is imported for the kernels to run under
the Triton interpreter (Triton reads it when the kernels are decorated).
"""
from . import configs, dequant, dora
from .launch import LAUNCH_COUNTS, is_interpreted
from .lora_backward import lora_linear_bwd
from .lora_forward import _lora_shrink_kernel, lora_linear_fwd

INTERPRETED = is_interpreted(_lora_shrink_kernel)
PATHS = ("fused", "hybrid")

__all__ = ["dequant", "dora", "lora_linear_fwd", "lora_linear_bwd", "LAUNCH_COUNTS", "INTERPRETED", "PATHS", "configs"]
