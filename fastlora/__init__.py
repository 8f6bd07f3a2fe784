"""fastlora: a fused LoRA linear layer for PyTorch, with Triton kernels.

``y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ`` in two forward and three backward launches, with the
dropout mask regenerated from a seed instead of stored.
"""
from .backend import kernel_backend
from .dropout import dropout_mask
from .function import LoRALinearFunction
from .functional import lora_linear

__version__ = "0.1.0"

__all__ = ["lora_linear", "LoRALinearFunction", "dropout_mask", "kernel_backend", "__version__"]
