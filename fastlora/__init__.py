"""fastlora: a fused LoRA linear layer for PyTorch, with Triton kernels.

``y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ`` in two forward and three backward launches, with the
dropout mask regenerated from a seed instead of stored; a drop-in layer, model injection, PEFT
acceleration and PEFT-format adapters around it.
"""
from .backend import kernel_backend
from .dispatch import explain_path
from .dropout import dropout_mask
from .function import LoRALinearFunction
from .functional import lora_linear
from .group import Sibling, explain_grouped_path, grouped_lora_linear
from .layer import LoRALinear, QuantLoRALinear
from .model import inject_lora, load_adapter, save_adapter, sibling_groups
from .quant import QuantizedWeight, quantized_weight

__version__ = "0.1.0"


def patch_peft_model(model, *, group_siblings=True):
    """See :func:`fastlora.peft.patch_peft_model` (imports PEFT on first use)."""
    from .peft import patch_peft_model as patch
    return patch(model, group_siblings=group_siblings)


def unpatch_peft_model(model):
    """See :func:`fastlora.peft.unpatch_peft_model`."""
    from .peft import unpatch_peft_model as unpatch
    return unpatch(model)


def __getattr__(name):
    if name == "PatchReport":
        from .peft import PatchReport
        return PatchReport
    raise AttributeError(f"module 'fastlora' has no attribute {name!r}")


__all__ = ["lora_linear", "grouped_lora_linear", "explain_grouped_path", "Sibling", "LoRALinearFunction", "LoRALinear", "QuantLoRALinear", "QuantizedWeight", "quantized_weight", "dropout_mask", "kernel_backend", "explain_path",
           "inject_lora", "sibling_groups",
           "save_adapter", "load_adapter", "patch_peft_model", "unpatch_peft_model", "PatchReport", "__version__"]
