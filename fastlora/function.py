"""``LoRALinearFunction``: the autograd Function under :func:`fastlora.lora_linear`.

Forward: 2 kernel launches (shrink ``S = x̃·Aᵀ``, then one GEMM over K+r). Backward: 3 launches
(``dS, dB`` from one read of dy; ``dx``; ``dA``) plus one memset (none in deterministic mode); see
kernels/lora_forward.py and kernels/lora_backward.py for the math and the fusion plan. Both go
through the ``torch.library`` operators of fastlora/ops.py, so ``torch.compile`` traces this
Function with no graph break.

Saved for backward: the input tensor itself (no copy), weight, lora_A, lora_B (parameters, no
copy), ``S`` ``[M, r]`` in fp32 and the seed: nothing else of size M×K or M×N. The dropout mask
is regenerated from the seed wherever it is needed.
"""
import torch
from torch.autograd.function import once_differentiable

from . import ops
from ._checks import check_inputs, check_lora_dtype, check_scaling
from .backend import forced_backend, select_backend
from .dropout import check_dropout_p, check_seed, check_seed_tensor, draw_seed, keep_params
from .reference import acc_dtype_of


def _seed_tensor(seed, device):
    """int64 ``[1]`` seed tensor on ``device``; ``None`` draws it from that device's generator
    (so ``torch.manual_seed`` and checkpoint recomputation reproduce it)."""
    if seed is None:
        return draw_seed(device)
    if isinstance(seed, torch.Tensor):
        return check_seed_tensor(seed).reshape(1).to(device)
    value = check_seed(seed)
    value = value - (1 << 64) if value >= (1 << 63) else value
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.full((1,), value, dtype=torch.int64, device=device)  # a host copy cannot be captured
    return torch.tensor([value], dtype=torch.int64, device=device)  # a copy, no kernel launch


class LoRALinearFunction(torch.autograd.Function):
    """Fused ``y = input·weightᵀ + bias + scaling·(dropout(input)·lora_Aᵀ)·lora_Bᵀ``.

    ``apply(input, weight, lora_A, lora_B, scaling=1.0, bias=None, dropout_p=0.0, seed=None,
    lora_dtype=None)``:

    Args:
        input: ``[..., K]``, float16 / bfloat16 / float32 / float64.
        weight: ``[N, K]`` in input's dtype. bias: ``[N]`` in input's dtype, or None.
        lora_A: ``[r, K]``, lora_B: ``[N, r]``: any float dtype.
        scaling: finite float (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` for rsLoRA), or a
            one-element float tensor on input's device (read by the kernels, so changing its
            value needs no recompilation under ``torch.compile``).
        dropout_p: dropout probability in [0, 1) applied to the LoRA input (0 disables it; the
            caller decides training vs eval).
        seed: None (drawn from the device's torch generator), an int, or an int64 one-element
            tensor on input's device (used as the 64-bit seed, two's complement).
        lora_dtype: dtype of the LoRA matmuls' operands; None: lora_A's dtype (PEFT casts the
            LoRA input to ``lora_A.weight.dtype``, so fp32 adapters on a bf16 model get fp32 LoRA
            math). :func:`fastlora.lora_linear` passes the autocast dtype under autocast.

    Returns ``[..., N]`` in input's dtype. Gradients come back in each tensor's own dtype; dW
    and db are computed (with torch ops) only if weight / bias require grad. No autocast
    handling here: :func:`fastlora.lora_linear` does that. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, input, weight, lora_A, lora_B, scaling=1.0, bias=None, dropout_p=0.0, seed=None, lora_dtype=None):
        M, N, K, r = check_inputs(input, weight, lora_A, lora_B, bias)
        lora_dtype = check_lora_dtype(lora_dtype, lora_A)
        scaling, scale = check_scaling(scaling, input.device)
        p = check_dropout_p(dropout_p)
        seed_t = _seed_tensor(seed, input.device) if p > 0 else None
        keep_thresh, keep_scale = keep_params(p) if p > 0 else (0, 1.0)
        x = input.reshape(M, K)
        backend = forced_backend()  # "" = decided by the operator; the backward uses the same
        if backend:
            select_backend(input.device, input.dtype, lora_dtype)  # a forced backend that cannot compute this raises
        if M == 0:
            y = input.new_empty((M, N))
            S = input.new_empty((0, r), dtype=acc_dtype_of(input.dtype, lora_dtype))
        else:
            y, S = ops.lora_linear_fwd(x, weight, lora_A, lora_B, scaling, scale, bias, seed_t, keep_thresh,
                                       keep_scale, lora_dtype, backend, "")
        ctx.save_for_backward(input, weight, lora_A, lora_B, S, seed_t, scale)
        ctx.scaling, ctx.keep, ctx.backend, ctx.lora_dtype = scaling, (keep_thresh, keep_scale), backend, lora_dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*input.shape[:-1], N)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        input, weight, lora_A, lora_B, S, seed_t, scale = ctx.saved_tensors
        need_dx, need_dW, need_dA, need_dB, _, need_db = (tuple(ctx.needs_input_grad) + (False,) * 6)[:6]
        N, K = weight.shape
        r = lora_A.shape[0]
        x = input.reshape(-1, K)
        M = x.shape[0]
        dy = dy.reshape(M, N).to(input.dtype)
        dx = dW = dA = dB = db = None
        if M == 0:
            dx = torch.zeros_like(x) if need_dx else None
            dA = torch.zeros_like(lora_A) if need_dA else None
            dB = torch.zeros_like(lora_B) if need_dB else None
        elif need_dx or need_dA or need_dB:
            dx, dAB = ops.lora_linear_bwd(dy, x, weight, lora_A, lora_B, S, ctx.scaling, scale, seed_t, *ctx.keep,
                                          need_dx, need_dA, need_dB, ctx.lora_dtype, ctx.backend, "")
            n_db = N * r if need_dB else 0
            dx = dx if need_dx else None
            dB = dAB[:n_db].view(N, r).to(lora_B.dtype) if need_dB else None
            dA = dAB[n_db:].view(r, K).to(lora_A.dtype) if need_dA else None
        with torch.autocast(input.device.type, enabled=False):
            if need_dW:
                dW = (dy.t() @ x).to(weight.dtype)
            if need_db:
                db = dy.sum(0).to(ctx.bias_dtype)
        if dx is not None:
            dx = dx.view(input.shape)
        return dx, dW, dA, dB, None, db, None, None, None
