"""``LoRALinearFunction``: the autograd Function under :func:`fastlora.lora_linear`.

Forward: 2 kernel launches (shrink ``S = x̃·Aᵀ``, then one GEMM over K+r). Backward: 3 launches
(``dS, dB`` from one read of dy; ``dx``; ``dA``) plus one memset or one small reduction; see
kernels/lora_forward.py and kernels/lora_backward.py for the math and the fusion plan.

Saved for backward: the input tensor itself (no copy), weight, lora_A, lora_B (parameters, no
copy), ``S`` ``[M, r]`` in fp32 and the seed: nothing else of size M×K or M×N. The dropout mask
is regenerated from the seed wherever it is needed.
"""
import torch
from torch.autograd.function import once_differentiable

from . import reference
from ._checks import check_inputs, check_scaling
from .backend import kernel_backend, kernels
from .dropout import check_dropout_p, check_seed, draw_seed, keep_bits, keep_params


def _seed_tensor(seed, device):
    """int64 ``[1]`` seed tensor on ``device``; ``None`` draws it from that device's generator
    (so ``torch.manual_seed`` and checkpoint recomputation reproduce it)."""
    if seed is None:
        return draw_seed(device)
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(f"seed: expected an int or a one-element int64 tensor, got {seed.dtype} "
                            f"tensor of shape {tuple(seed.shape)}")
        return seed.reshape(1).to(device)
    value = check_seed(seed)
    return torch.tensor([value - (1 << 64) if value >= (1 << 63) else value], dtype=torch.int64, device=device)


def _mask(seed_t, M, K, keep_thresh, keep_scale, device):
    """fp32 ``[M, K]`` dropout mask for the torch path (the same bits the kernels use)."""
    if seed_t is None:
        return None
    keep = keep_bits(M, K, int(seed_t.item()), keep_thresh, device)
    return keep.to(torch.float32) * keep_scale


class LoRALinearFunction(torch.autograd.Function):
    """Fused ``y = input·weightᵀ + bias + scaling·(dropout(input)·lora_Aᵀ)·lora_Bᵀ``.

    ``apply(input, weight, lora_A, lora_B, scaling=1.0, bias=None, dropout_p=0.0, seed=None)``:

    Args:
        input: ``[..., K]``, float16 / bfloat16 / float32 / float64.
        weight: ``[N, K]`` in input's dtype. bias: ``[N]`` in input's dtype, or None.
        lora_A: ``[r, K]``, lora_B: ``[N, r]``: any float dtype; computed in input's dtype.
        scaling: finite float (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` for rsLoRA).
        dropout_p: dropout probability in [0, 1) applied to the LoRA input (0 disables it; the
            caller decides training vs eval).
        seed: None (drawn from the device's torch generator), an int, or an int64 one-element
            tensor on input's device.

    Returns ``[..., N]`` in input's dtype. Gradients come back in each tensor's own dtype; dW
    and db are computed (with torch ops) only if weight / bias require grad. No autocast
    handling here: :func:`fastlora.lora_linear` does that. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, input, weight, lora_A, lora_B, scaling=1.0, bias=None, dropout_p=0.0, seed=None):
        M, N, K, r = check_inputs(input, weight, lora_A, lora_B, bias)
        scaling = check_scaling(scaling)
        p = check_dropout_p(dropout_p)
        device = input.device
        seed_t = _seed_tensor(seed, device) if p > 0 else None
        keep_thresh, keep_scale = keep_params(p) if p > 0 else (0, 1.0)
        backend = kernel_backend(device)

        x = input.reshape(M, K)
        if M == 0:
            y = input.new_empty((M, N))
            S = input.new_empty((0, r), dtype=reference.acc_dtype_of(input.dtype))
        elif backend == "torch":
            with torch.autocast(device.type, enabled=False):
                mask = _mask(seed_t, M, K, keep_thresh, keep_scale, device)
                y, S = reference.lora_forward(x, weight, lora_A, lora_B, scaling, bias, mask)
        else:
            y, S = kernels().lora_linear_fwd(x, weight, lora_A, lora_B, scaling, bias, seed_t, keep_thresh, keep_scale)

        ctx.save_for_backward(input, weight, lora_A, lora_B, S, seed_t)
        ctx.scaling, ctx.keep = scaling, (keep_thresh, keep_scale)
        ctx.backend = backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*input.shape[:-1], N)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        input, weight, lora_A, lora_B, S, seed_t = ctx.saved_tensors
        need_dx, need_dW, need_dA, need_dB, _, need_db = (tuple(ctx.needs_input_grad) + (False,) * 6)[:6]
        N, K = weight.shape
        x = input.reshape(-1, K)
        M = x.shape[0]
        dy = dy.reshape(M, N).to(input.dtype)
        keep_thresh, keep_scale = ctx.keep
        dx = dW = dA = dB = db = None
        if M == 0:
            dx = torch.zeros_like(x) if need_dx else None
            dA = torch.zeros_like(lora_A) if need_dA else None
            dB = torch.zeros_like(lora_B) if need_dB else None
        elif need_dx or need_dA or need_dB:
            if ctx.backend == "torch":
                with torch.autocast(input.device.type, enabled=False):
                    mask = _mask(seed_t, M, K, keep_thresh, keep_scale, input.device)
                    dx, dA, dB = reference.lora_backward(dy, x, weight, lora_A, lora_B, S, ctx.scaling, mask,
                                                         need_dx, need_dA, need_dB)
            else:
                dx, dA, dB = kernels().lora_linear_bwd(dy, x, weight, lora_A, lora_B, S, ctx.scaling, seed_t,
                                                     keep_thresh, keep_scale, need_dx, need_dA, need_dB)
        with torch.autocast(input.device.type, enabled=False):
            if need_dW:
                dW = (dy.t() @ x).to(weight.dtype)
            if need_db:
                db = dy.sum(0).to(ctx.bias_dtype)
        if dx is not None:
            dx = dx.view(input.shape)
        return dx, dW, dA, dB, None, db, None, None
