"""Argument validation shared by the functional op, the autograd Function and the layer.

Every check runs before any launch or allocation and raises a TypeError / ValueError that
names the argument, what was expected and what came.
"""
import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _tensor(name, t, ndim=None):
    if type(t) in _PLAIN and t.dtype in FLOAT_DTYPES and t.layout == torch.strided and (ndim is None or t.dim() == ndim):
        return  # the common case in one test (this runs for every tensor of every call)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), "
                        f"got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got {t.dim()}-D with shape {tuple(t.shape)}")
    if t.is_sparse or t.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    if type(t).__name__ == "DTensor":
        raise TypeError(f"{name}: got a sharded DTensor {tuple(t.shape)}; fastlora needs the full tensor "
                        "(call the FSDP-wrapped module, whose forward unshards its parameters)")


def check_scaling(scaling, device=None):
    """``scaling``: a finite real Python number (not bool), or a one-element floating tensor on
    ``device``. Returns ``(float_value, None)`` or ``(0.0, tensor)``. A tensor's value is not
    checked (that would synchronise with the GPU)."""
    if type(scaling) is float and math.isfinite(scaling):
        return scaling, None  # the common case without the numbers.Real ABC check
    if isinstance(scaling, torch.Tensor):
        if not scaling.is_floating_point() or scaling.numel() != 1:
            raise TypeError(f"scaling: expected a float or a one-element floating tensor, got a {scaling.dtype} "
                            f"tensor of shape {tuple(scaling.shape)}")
        if device is not None and scaling.device != device:
            raise ValueError(f"scaling: expected a tensor on input's device {device}, got {scaling.device}")
        if scaling.requires_grad:
            raise ValueError("scaling: a tensor that requires grad; fastlora treats the scaling as a constant "
                             "(pass scaling.detach(), or learn lora_A / lora_B instead)")
        return 0.0, scaling
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling: expected a finite float, got {type(scaling).__name__} {scaling!r}")
    value = float(scaling)
    if not math.isfinite(value):
        raise ValueError(f"scaling: expected a finite float, got {value}")
    return value, None


def check_inputs(input, weight, lora_A, lora_B, bias, same_dtype=True):
    """Validate the tensors of ``lora_linear``; returns ``(M, N, K, r)``.

    ``same_dtype=False`` skips the input/weight/bias dtype equality (autocast casts them after).
    """
    _tensor("input", input)
    if input.dim() < 1:
        raise ValueError("input: expected shape [..., K] with at least 1 dim, got a 0-D tensor")
    _tensor("weight", weight, 2)
    _tensor("lora_A", lora_A, 2)
    _tensor("lora_B", lora_B, 2)
    if bias is not None:
        _tensor("bias", bias, 1)
    K = input.shape[-1]
    N, r = weight.shape[0], lora_A.shape[0]
    if K < 1:
        raise ValueError(f"input: expected K = input.shape[-1] >= 1, got shape {tuple(input.shape)}")
    if weight.shape[1] != K or N < 1:
        raise ValueError(f"weight: expected shape [N, K] = [N >= 1, {K}] (K from input {tuple(input.shape)}), "
                         f"got {tuple(weight.shape)}")
    if r < 1 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A: expected shape [r, K] = [r >= 1, {K}], got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B: expected shape [N, r] = [{N}, {r}] (N from weight, r from lora_A), "
                         f"got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias: expected shape [N] = [{N}], got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and t.device != input.device:
            raise ValueError(f"{name}: expected a tensor on input's device {input.device}, got {t.device}")
    if same_dtype:
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != input.dtype:
                raise TypeError(f"{name}: expected dtype {input.dtype} (input's dtype; outside autocast, as "
                                f"for nn.Linear), got {t.dtype}")
    M = input.numel() // K
    return M, N, K, r


def check_lora_dtype(lora_dtype, lora_A):
    """``lora_dtype``: None (lora_A's dtype, PEFT's rule) or a floating ``torch.dtype``."""
    if lora_dtype is None:
        return lora_A.dtype
    if not isinstance(lora_dtype, torch.dtype) or lora_dtype not in FLOAT_DTYPES:
        raise TypeError(f"lora_dtype: expected None or one of float16, bfloat16, float32, float64, got {lora_dtype!r}")
    return lora_dtype


def autocast_enabled(device_type):
    """``torch.is_autocast_enabled(device_type)``; False for device types autocast does not know
    (``meta``: shape inference runs as outside autocast)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False
