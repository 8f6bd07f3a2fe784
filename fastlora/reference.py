"""Pure-torch LoRA linear: the test oracle, the CPU fallback and the benchmarks' baseline.

Math (PEFT layouts, ``peft/tuners/lora/layer.py``; FIELD.md §1)::

    x̃  = m ⊙ x                          m ∈ {0, 1/(1-p)}^{M×K}   (inverted dropout, LoRA branch only)
    S  = x̃·Aᵀ                           [M, r]
    y  = x·Wᵀ + b + s·S·Bᵀ              [M, N]
    dS = s·dy·B          dB = s·dyᵀ·S   dA = dSᵀ·x̃     dx = dy·W + m ⊙ (dS·A)     db = Σ_M dy

:func:`lora_linear_ref` is the plain differentiable formula (autograd derives its gradients):
run it in float64 for the oracle. :func:`lora_forward` / :func:`lora_backward` are the explicit
two-pass form the kernels implement, with the kernels' rounding points: every matmul operand in
the compute dtype (x's dtype; fp32/fp16/bf16 adapters are cast to it), accumulation in fp32
(fp64 for fp64 inputs), S and dS kept in the accumulator dtype, each output rounded once. With
float64 inputs they are exact float64 math.
"""
import torch


def acc_dtype_of(dtype):
    """Accumulation dtype for a compute dtype: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lora_linear_ref(x, weight, lora_A, lora_B, scaling, bias=None, mask=None):
    """Differentiable reference ``x·Wᵀ + b + s·((m ⊙ x)·Aᵀ)·Bᵀ`` in the inputs' own dtype.

    Shapes: x ``[..., K]``, weight ``[N, K]``, lora_A ``[r, K]``, lora_B ``[N, r]``, bias ``[N]``,
    mask broadcastable to x (None: no dropout). All tensors in one dtype (cast them first).
    """
    y = torch.nn.functional.linear(x, weight, bias)
    xd = x if mask is None else x * mask.to(x.dtype)
    return y + scaling * ((xd @ lora_A.t()) @ lora_B.t())


def _in(t, dtype, acc):
    """Round ``t`` to the compute dtype, then widen it to the accumulation dtype."""
    return t.to(dtype).to(acc)


def dropped(x, mask):
    """``m ⊙ x`` rounded to x's dtype as the kernels do (product in fp32/fp64)."""
    if mask is None:
        return x
    return (x.to(acc_dtype_of(x.dtype)) * mask).to(x.dtype)


def lora_forward(x, weight, lora_A, lora_B, scaling, bias=None, mask=None):
    """Forward of the fused op. x ``[M, K]``; mask ``[M, K]`` float or None.

    Returns ``(y [M, N] in x.dtype, S [M, r] in the accumulation dtype)``.
    """
    dtype = x.dtype
    acc = acc_dtype_of(dtype)
    S = dropped(x, mask).to(acc) @ _in(lora_A, dtype, acc).t()
    y = x.to(acc) @ _in(weight, dtype, acc).t()
    y = y + (S * scaling).to(dtype).to(acc) @ _in(lora_B, dtype, acc).t()
    if bias is not None:
        y = y + _in(bias, dtype, acc)
    return y.to(dtype), S


def lora_backward(dy, x, weight, lora_A, lora_B, S, scaling, mask=None,
                  need_dx=True, need_dA=True, need_dB=True, out_dtype=None):
    """Backward of the fused op for dy ``[M, N]``; returns ``(dx, dA, dB)``: dx in x's dtype, dA
    and dB in the dtypes of lora_A / lora_B, or ``out_dtype`` if given (None where not requested)."""
    dtype = x.dtype
    acc = acc_dtype_of(dtype)
    dyc = dy.to(dtype).to(acc)
    dx = dA = dB = None
    if need_dx or need_dA:
        dS = scaling * (dyc @ _in(lora_B, dtype, acc))
        dSc = _in(dS, dtype, acc)
    if need_dB:
        dB = (scaling * (dyc.t() @ _in(S, dtype, acc))).to(out_dtype or lora_B.dtype)
    if need_dx:
        lora = dSc @ _in(lora_A, dtype, acc)
        if mask is not None:
            lora = lora * mask
        dx = (lora + dyc @ _in(weight, dtype, acc)).to(dtype)
    if need_dA:
        dA = (dSc.t() @ dropped(x, mask).to(acc)).to(out_dtype or lora_A.dtype)
    return dx, dA, dB


class SeededDropout(torch.nn.Module):
    """Eager dropout that applies fastlora's mask: for checking fastlora against PEFT with the
    same dropout. It draws its seed exactly as :func:`fastlora.lora_linear` does with
    ``seed=None`` (:func:`fastlora.dropout.draw_seed`), so after the same ``torch.manual_seed``
    and the same sequence of calls both see the same masks.

    Input ``[..., K]``, any float dtype; output ``x * dropout_mask(x.shape, p, seed)`` in x's
    dtype (rounded once, as the kernels do). Identity in eval mode or at ``p = 0``.
    """

    def __init__(self, p):
        super().__init__()
        from .dropout import check_dropout_p
        self.p = check_dropout_p(p)

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        from .dropout import draw_seed, dropout_mask
        seed = int(draw_seed(x.device).item())
        mask = dropout_mask(x.shape, self.p, seed, device=x.device, dtype=acc_dtype_of(x.dtype))
        return dropped(x, mask)

    def extra_repr(self):
        return f"p={self.p}"
