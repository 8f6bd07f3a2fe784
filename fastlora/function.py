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


class _Call:
    """The validated constants of one call (what the backward needs besides tensors)."""
    __slots__ = ("M", "N", "K", "r", "lora_dtype", "scaling", "scale", "p", "keep_thresh", "keep_scale", "backend")

    def __init__(self, input, weight, lora_A, lora_B, scaling, bias, dropout_p, lora_dtype, shapes=None,
                 resolve=False):
        self.M, self.N, self.K, self.r = shapes or check_inputs(input, weight, lora_A, lora_B, bias)
        self.lora_dtype = check_lora_dtype(lora_dtype, lora_A)
        self.scaling, self.scale = check_scaling(scaling, input.device)
        self.p = check_dropout_p(dropout_p)
        self.keep_thresh, self.keep_scale = keep_params(self.p) if self.p > 0 else (0, 1.0)
        # "" = decided by the operator at run time (torch.compile graphs); ``resolve``: decided now,
        # once for the forward and the backward (eager calls). A forced backend that cannot compute
        # this raises.
        self.backend = forced_backend()
        if self.backend or resolve:
            self.backend = select_backend(input.device, input.dtype, self.lora_dtype)[0]


_LEAN_DTYPES = (torch.float32, torch.float64)  # S in the input's dtype: no accumulation-dtype round trip


def _cpu_torch_path(input):
    """Whether this call runs on the torch path of a CPU tensor."""
    return input.device.type == "cpu" and (forced_backend() or select_backend(input.device)[0]) == "torch"


def forward_no_grad(input, weight, lora_A, lora_B, scaling=1.0, bias=None, dropout_p=0.0, seed=None,
                    lora_dtype=None, shapes=None):
    """y alone, without autograd or the operator dispatch: for calls that need no gradient (eval,
    ``torch.no_grad``, decoding), where those layers cost more than the math at small M. Same
    seed draw and result as :class:`LoRALinearFunction`. Contract: :func:`fastlora.lora_linear`
    (the only caller) has validated every argument; ``shapes`` is the ``(M, N, K, r)`` of its
    :func:`check_inputs`. With ``shapes``, fp32/fp64 tensors of one dtype, no dropout and the torch
    backend on a CPU (decode steps), the call object and operator plumbing are skipped: the same
    ops as ``reference.lora_forward``, so the same bits."""
    if dropout_p == 0 and shapes is not None and lora_dtype is None and input.dtype in _LEAN_DTYPES \
            and input.dtype == lora_A.dtype == lora_B.dtype and _cpu_torch_path(input):
        # The CPU decode step (``shapes``: validated by lora_linear): reference.lora_forward's ops
        # for L = T = fp32/fp64 inlined (calling it cost 1-2 µs more per call in a timing loop; the
        # bit-equality is tested), without the call object and the operator plumbing.
        M, N, K, _ = shapes
        if M == 0:
            return input.new_empty((*input.shape[:-1], N))
        s = scaling if type(scaling) is float else float(scaling)  # validated by lora_linear
        x = input if input.dim() == 2 else input.reshape(M, K)
        y = torch.nn.functional.linear(x, weight, bias).addmm_(torch.mm(x, lora_A.t()), lora_B.t(), alpha=s)
        return y if input.dim() == 2 else y.view(*input.shape[:-1], N)
    c = _Call(input, weight, lora_A, lora_B, scaling, bias, dropout_p, lora_dtype, shapes, resolve=True)
    seed_t = _seed_tensor(seed, input.device) if c.p > 0 else None
    if c.M == 0:
        return input.new_empty((*input.shape[:-1], c.N))
    y, _, _ = ops.forward_impl(input.reshape(c.M, c.K), weight, lora_A, lora_B, c.scaling, c.scale, bias, seed_t,
                               c.keep_thresh, c.keep_scale, c.lora_dtype, c.backend, "")
    return y.view(*input.shape[:-1], c.N)


def _forward(c, input, weight, lora_A, lora_B, bias, seed, empty_seed=True):
    """``(y, S, seed, mask)`` for the call ``c``: y is not a view in autograd's eyes
    (``_unsafe_view``), so in-place ops on it work; no dropout: an empty seed (torch.func
    mishandles None outputs; None with ``empty_seed=False``); mask: the torch path's packed dropout
    mask on a CPU, else empty."""
    if c.p > 0:
        seed_t = _seed_tensor(seed, input.device)
    else:
        seed_t = input.new_empty(0, dtype=torch.int64) if empty_seed else None
    if c.M == 0:
        y = input.new_empty((0, c.N))
        S = input.new_empty((0, c.r), dtype=acc_dtype_of(input.dtype, c.lora_dtype))
        mask = input.new_empty(0, dtype=torch.uint8)
    else:
        x = input if input.dim() == 2 else input.reshape(c.M, c.K)
        y, S, mask = ops.forward(x, weight, lora_A, lora_B, c.scaling, c.scale, bias, seed_t if c.p > 0 else None,
                                 c.keep_thresh, c.keep_scale, c.lora_dtype, c.backend, "")
    if input.dim() != 2:
        y = torch.ops.aten._unsafe_view(y, (*input.shape[:-1], c.N))
    return y, S, seed_t, mask


def _save(ctx, c, input, weight, lora_A, lora_B, bias, S, seed_t, mask):
    # optional tensors saved by position (torch.func's saved-tensor handling does not keep Nones)
    ctx.has_seed, ctx.has_scale = seed_t is not None and seed_t.numel() > 0, c.scale is not None
    ctx.save_for_backward(input, weight, lora_A, lora_B, S, mask,
                          *(t for t in (seed_t if ctx.has_seed else None, c.scale) if t is not None))
    ctx.scaling, ctx.keep, ctx.backend, ctx.lora_dtype = c.scaling, (c.keep_thresh, c.keep_scale), c.backend, \
        c.lora_dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.bias_slot = 5  # LoRALinearCore's inputs; _LoRALinearEager's put bias at 4


def _core_forward(input, weight, lora_A, lora_B, scaling=1.0, bias=None, dropout_p=0.0, seed=None, lora_dtype=None):
    c = _Call(input, weight, lora_A, lora_B, scaling, bias, dropout_p, lora_dtype)
    return _forward(c, input, weight, lora_A, lora_B, bias, seed)


def _setup_context(ctx, inputs, output):
    input, weight, lora_A, lora_B, scaling, bias, dropout_p, _, lora_dtype = inputs
    c = _Call(input, weight, lora_A, lora_B, scaling, bias, dropout_p, lora_dtype,
              shapes=(0, 0, 0, 0))  # validated by the forward already
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero "gradients" for S and the seed
    _save(ctx, c, input, weight, lora_A, lora_B, bias, *output[1:])


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
    need = tuple(ctx.needs_input_grad)  # (input, weight, lora_A, lora_B, ..., bias at ctx.bias_slot, ...)
    dx, dW, dA, dB, db = grads(ctx, dy, input, weight, lora_A, lora_B, S, mask, seed_t, scale, *need[:4],
                               need[ctx.bias_slot])
    return dx, dW, dA, dB, None, db, None, None, None


def grads(ctx, dy, input, weight, lora_A, lora_B, S, mask, seed_t, scale, need_dx, need_dW, need_dA, need_dB,
          need_db, dx_out=None):
    """``(dx, dW, dA, dB, db)`` of one call (None where not needed) from what its forward saved
    (``ctx``: scaling, dropout constants, backend, LoRA dtype, bias dtype; see :func:`_save`).
    ``dx_out`` (eager calls, fastlora/group.py): a 2-D ``[M, K]`` buffer in input's dtype that dx
    is added into; dx is then that buffer, 2-D."""
    N, K = weight.shape
    r = lora_A.shape[0]
    x = input if input.dim() == 2 else input.reshape(-1, K)
    M = x.shape[0]
    if dy.dim() != 2:
        dy = dy.reshape(M, N)
    if dy.dtype != input.dtype:
        dy = dy.to(input.dtype)
    dx = dW = dA = dB = db = None
    if M == 0:
        dx = (torch.zeros_like(x) if dx_out is None else dx_out) if need_dx else None
        dA = torch.zeros_like(lora_A) if need_dA else None
        dB = torch.zeros_like(lora_B) if need_dB else None
    elif dx_out is not None:
        dx, dA, dB = ops.backward_parts(dy, x, weight, lora_A, lora_B, S, mask, ctx.scaling, scale, seed_t,
                                        *ctx.keep, need_dx, need_dA, need_dB, ctx.lora_dtype, ctx.backend, "",
                                        dx_out if need_dx else None)
    elif need_dx or need_dA or need_dB:
        dx, dA, dB = ops.backward(dy, x, weight, lora_A, lora_B, S, mask, ctx.scaling, scale, seed_t, *ctx.keep,
                                  need_dx, need_dA, need_dB, ctx.lora_dtype, ctx.backend, "")
        if dB is not None and dB.dtype != lora_B.dtype:
            dB = dB.to(lora_B.dtype)
        if dA is not None and dA.dtype != lora_A.dtype:
            dA = dA.to(lora_A.dtype)
    if need_dW or need_db:
        with torch.autocast(input.device.type, enabled=False):
            if need_dW:
                dW = (dy.t() @ x).to(weight.dtype)
            if need_db:
                db = dy.sum(0).to(ctx.bias_dtype)
    if dx is not None and input.dim() != 2 and dx_out is None:
        dx = dx.view(input.shape)
    return dx, dW, dA, dB, db


class _LoRALinearEager(torch.autograd.Function):
    """The same Function for plain eager calls, in ctx style: torch binds the arguments of a
    ``setup_context``-style Function with ``inspect.signature`` at every call (~60 µs, more than
    a small layer's whole forward), so eager calls outside torch.func and torch.compile use this."""

    @staticmethod
    def forward(ctx, input, weight, lora_A, lora_B, bias, seed, c):
        y, S, seed_t, mask = _forward(c, input, weight, lora_A, lora_B, bias, seed, empty_seed=False)
        ctx.set_materialize_grads(False)
        _save(ctx, c, input, weight, lora_A, lora_B, bias, S, seed_t, mask)
        ctx.bias_slot = 4
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        dx, dW, dA, dB, _, db, _, _, _ = _backward(ctx, dy)
        return dx, dW, dA, dB, db, None, None


def _apply(input, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, lora_dtype, shapes=None):
    """y of the call through autograd: the ctx-style Function for eager calls, LoRALinearCore under
    torch.func and torch.compile (``shapes``: an earlier :func:`check_inputs`'s result)."""
    if ops.need_operator() or _forward_mode_ad():
        return core().apply(input, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, lora_dtype)[0]
    c = _Call(input, weight, lora_A, lora_B, scaling, bias, dropout_p, lora_dtype, shapes, resolve=True)
    return _LoRALinearEager.apply(input, weight, lora_A, lora_B, bias, seed, c)


class LoRALinearCore(torch.autograd.Function):
    """The autograd Function under :class:`LoRALinearFunction`: ``apply`` returns ``(y, S, seed,
    mask)`` (S, the seed drawn for the dropout mask and, on the CPU's torch path, the bit-packed
    mask are what the backward needs, non-differentiable; returning them is how torch.func's
    ``setup_context`` protocol lets them be saved)."""

    generate_vmap_rule = True
    forward = staticmethod(_core_forward)
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
        return _apply(input, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, lora_dtype)
