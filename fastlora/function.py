"""``LoRALinearFunction``: the autograd entry point under :func:`fastlora.lora_linear`
(``LoRALinearCore`` is the ``torch.autograd.Function``).

Forward: 2 Triton launches (shrink ``S = x̃·Aᵀ``, then one GEMM over K+r, or cuBLAS's GEMM and a
rank-r update); backward: 3 (``dS, dB`` from one read of dy; ``dx``; ``dA``) or 2 + cuBLAS, plus
memsets for atomic reductions (none in deterministic mode); see kernels/lora_forward.py,
kernels/lora_backward.py and fastlora/dispatch.py for the math, the fusion plan and the choice. Both go
through the ``torch.library`` operators of fastlora/ops.py, so ``torch.compile`` traces this
Function with no graph break.

Saved for backward: the input tensor itself (no copy), weight, lora_A, lora_B (parameters, no
copy), ``S`` ``[M, r]`` in fp32 and the seed: nothing else of size M×K or M×N. The Triton kernels
regenerate the dropout mask from the seed wherever it is needed; the torch path on a CPU keeps
it bit-packed (M·K/8 bytes, 1/32 of an fp32 input) instead.
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


def _prepare(input, weight, lora_A, lora_B, scaling, bias, dropout_p, lora_dtype):
    """Validated call constants: ``(M, N, K, r, lora_dtype, scaling float, scale tensor or None,
    p, keep_thresh, keep_scale, backend)``."""
    M, N, K, r = check_inputs(input, weight, lora_A, lora_B, bias)
    lora_dtype = check_lora_dtype(lora_dtype, lora_A)
    scaling, scale = check_scaling(scaling, input.device)
    p = check_dropout_p(dropout_p)
    keep_thresh, keep_scale = keep_params(p) if p > 0 else (0, 1.0)
    backend = forced_backend()  # "" = decided by the operator; the backward uses the same
    return M, N, K, r, lora_dtype, scaling, scale, p, keep_thresh, keep_scale, backend


def forward_no_grad(input, weight, lora_A, lora_B, scaling=1.0, bias=None, dropout_p=0.0, seed=None,
                    lora_dtype=None, shapes=None):
    """y alone, without autograd or the operator dispatch: for calls that need no gradient (eval,
    ``torch.no_grad``, decoding), where those layers cost more than the math at small M. Same
    validation (``shapes``: the ``(M, N, K, r)`` of an earlier :func:`check_inputs`), seed draw and
    result as :class:`LoRALinearFunction`."""
    M, N, K, r = shapes or check_inputs(input, weight, lora_A, lora_B, bias)
    lora_dtype = check_lora_dtype(lora_dtype, lora_A)
    scaling, scale = check_scaling(scaling, input.device)
    p = check_dropout_p(dropout_p)
    keep_thresh, keep_scale = keep_params(p) if p > 0 else (0, 1.0)
    backend = forced_backend()
    if backend:
        select_backend(input.device, input.dtype, lora_dtype)  # a forced backend that cannot compute this raises
    seed_t = _seed_tensor(seed, input.device) if p > 0 else None
    if M == 0:
        return input.new_empty((*input.shape[:-1], N))
    y, _, _ = ops.forward_impl(input.reshape(M, K), weight, lora_A, lora_B, scaling, scale, bias, seed_t,
                               keep_thresh, keep_scale, lora_dtype, backend, "")
    return y.view(*input.shape[:-1], N)


def _forward(input, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, lora_dtype):
    M, N, K, r, lora_dtype, scaling, scale, p, keep_thresh, keep_scale, backend = _prepare(
        input, weight, lora_A, lora_B, scaling, bias, dropout_p, lora_dtype)
    seed_t = _seed_tensor(seed, input.device) if p > 0 else None
    if backend:
        select_backend(input.device, input.dtype, lora_dtype)  # a forced backend that cannot compute this raises
    if M == 0:
        y = input.new_empty((M, N))
        S = input.new_empty((0, r), dtype=acc_dtype_of(input.dtype, lora_dtype))
        mask = input.new_empty(0, dtype=torch.uint8)
    else:
        y, S, mask = ops.forward(input.reshape(M, K), weight, lora_A, lora_B, scaling, scale, bias, seed_t,
                                         keep_thresh, keep_scale, lora_dtype, backend, "")
    # _unsafe_view: the result is not a view in autograd's eyes, so in-place ops on it work.
    # No dropout: an empty seed (torch.func mishandles None outputs).
    seed_out = seed_t if seed_t is not None else input.new_empty(0, dtype=torch.int64)
    return torch.ops.aten._unsafe_view(y, (*input.shape[:-1], N)), S, seed_out, mask


def _setup_context(ctx, inputs, output):
    input, weight, lora_A, lora_B, scaling, bias, dropout_p, _, lora_dtype = inputs
    _, S, seed_t, mask = output
    seed_t = seed_t if seed_t.numel() else None
    _, _, _, _, lora_dtype, scaling, scale, _, keep_thresh, keep_scale, backend = _prepare(
        input, weight, lora_A, lora_B, scaling, bias, dropout_p, lora_dtype)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero "gradients" for S and the seed
    # optional tensors saved by position (torch.func's saved-tensor handling does not keep Nones)
    ctx.has_seed, ctx.has_scale = seed_t is not None, scale is not None
    ctx.save_for_backward(input, weight, lora_A, lora_B, S, mask, *(t for t in (seed_t, scale) if t is not None))
    ctx.scaling, ctx.keep, ctx.backend, ctx.lora_dtype = scaling, (keep_thresh, keep_scale), backend, lora_dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _no_jvp(ctx, *tangents):
    raise NotImplementedError("fastlora.lora_linear: forward-mode AD (torch.func.jvp, torch.func.jacfwd, "
                              "torch.autograd.forward_ad) is not supported; use reverse mode (torch.func.grad, "
                              "vjp, jacrev, or .backward())")


def _backward(ctx, dy, _dS=None, _dseed=None, _dmask=None):
    if dy is None:  # y did not reach the loss (grads are not materialised as zeros)
        return (None,) * 9
    input, weight, lora_A, lora_B, S, mask, *rest = ctx.saved_tensors
    seed_t = rest.pop(0) if ctx.has_seed else None
    scale = rest.pop(0) if ctx.has_scale else None
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
        dx, dAB = ops.backward(dy, x, weight, lora_A, lora_B, S, mask, ctx.scaling, scale, seed_t, *ctx.keep,
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


class LoRALinearCore(torch.autograd.Function):
    """The autograd Function under :class:`LoRALinearFunction`: ``apply`` returns ``(y, S, seed,
    mask)`` (S, the seed drawn for the dropout mask and, on the CPU's torch path, the bit-packed
    mask are what the backward needs, non-differentiable; returning them is how torch.func's
    ``setup_context`` protocol lets them be saved)."""

    generate_vmap_rule = True
    forward = staticmethod(_forward)
    setup_context = staticmethod(_setup_context)
    backward = staticmethod(once_differentiable(_backward))


class _ForwardModeCore(LoRALinearCore):
    """LoRALinearCore under forward-mode AD: its ``jvp`` raises fastlora's error (a custom jvp
    on LoRALinearCore itself would stop torch.compile from tracing it)."""

    jvp = staticmethod(_no_jvp)


def _forward_mode_ad():
    """Whether a forward-mode AD transform is active (torch.func.jvp / jacfwd, forward_ad)."""
    if torch.compiler.is_compiling():
        return False
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    try:
        stack = torch._C._functorch.get_interpreter_stack() or []
        return any(i.key() == torch._C._functorch.TransformType.Jvp for i in stack)
    except AttributeError:  # a torch without these internals: torch's own error will do
        return False


def core():
    """The Function class to apply: LoRALinearCore, or its forward-mode variant that explains."""
    return _ForwardModeCore if _forward_mode_ad() else LoRALinearCore


class LoRALinearFunction:
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

    Returns ``[..., N]`` in input's dtype: a tensor of its own (not a view), so in-place ops on it
    (``nn.ReLU(inplace=True)``, ``out += ...``) work as on ``nn.Linear``'s output. Gradients come
    back in each tensor's own dtype; dW and db are computed (with torch ops) only if weight /
    bias require grad. No autocast handling here: :func:`fastlora.lora_linear` does that. Not
    twice differentiable.

    ``torch.func``: ``grad``, ``vjp``, ``jacrev``, ``vmap`` (over any argument: one call per
    sample; dropout follows vmap's ``randomness`` mode, "error" by default) and
    ``functional_call`` work; forward-mode AD (``jvp``, ``jacfwd``) raises NotImplementedError.

    The ``torch.autograd.Function`` itself is :class:`LoRALinearCore` (its ``apply`` also returns
    the saved S and seed); this class is the entry point that returns y alone.
    """

    @staticmethod
    def apply(input, weight, lora_A, lora_B, scaling=1.0, bias=None, dropout_p=0.0, seed=None, lora_dtype=None):
        # core().apply, not super(): torch.func re-enters the class it was called on
        return core().apply(input, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, lora_dtype)[0]
