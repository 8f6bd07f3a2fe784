"""Pure-torch LoRA linear: the test oracle, the CPU fallback and the benchmarks' baseline.

Math (PEFT layouts, ``peft/tuners/lora/layer.py``; FIELD.md §1)::

    x̃  = m ⊙ x                          m ∈ {0, 1/(1-p)}^{M×K}   (inverted dropout, LoRA branch only)
    S  = x̃·Aᵀ                           [M, r]
    y  = x·Wᵀ + b + s·S·Bᵀ              [M, N]
    dS = s·dy·B          dB = s·dyᵀ·S   dA = dSᵀ·x̃     dx = dy·W + m ⊙ (dS·A)     db = Σ_M dy

:func:`lora_linear_ref` is the plain differentiable formula (autograd derives its gradients):
run it in float64 for the oracle. :func:`lora_forward` / :func:`lora_backward` are the explicit
two-pass form the kernels implement, with the kernels' rounding points: the base GEMM's operands
in the compute dtype T (x's dtype); the LoRA products' operands in the LoRA dtype L (PEFT: the
adapters' dtype outside autocast, so fp32 adapters on a bf16 model give fp32 LoRA math; the
autocast dtype under autocast); the dropped-out input formed as ``keep ⊙ x`` (exact) with the
dropout scale applied to the product; accumulation in fp32 (fp64 when T or L is fp64); S and dS
kept in the accumulation dtype; each output rounded once. With float64 inputs they are exact
float64 math.
"""
import torch


def acc_dtype_of(dtype, lora_dtype=None):
    """Accumulation dtype: float64 when the compute (or LoRA) dtype is float64, else float32."""
    return torch.float64 if torch.float64 in (dtype, lora_dtype) else torch.float32


def lora_linear_ref(x, weight, lora_A, lora_B, scaling, bias=None, mask=None):
    """Differentiable reference ``x·Wᵀ + b + s·((m ⊙ x)·Aᵀ)·Bᵀ`` in the inputs' own dtype.

    Shapes: x ``[..., K]``, weight ``[N, K]``, lora_A ``[r, K]``, lora_B ``[N, r]``, bias ``[N]``,
    mask broadcastable to x (None: no dropout). All tensors in one dtype (cast them first).
    """
    y = torch.nn.functional.linear(x, weight, bias)
    xd = x if mask is None else x * mask.to(x.dtype)
    return y + scaling * ((xd @ lora_A.t()) @ lora_B.t())


def _in(t, dtype, acc):
    """Round ``t`` to ``dtype``, then widen it to the accumulation dtype."""
    return t.to(dtype).to(acc)


def kept(x, keep):
    """``keep ⊙ x`` (exact in x's dtype; a multiply, so NaN·0 = NaN as in torch's dropout)."""
    return x if keep is None else x * keep.to(x.dtype)


def lora_forward(x, weight, lora_A, lora_B, scaling, bias=None, keep=None, keep_scale=1.0, lora_dtype=None):
    """Forward of the fused op. x ``[M, K]``; keep ``[M, K]`` bool (dropout's kept elements) or None.

    Returns ``(y [M, N] in x.dtype, S [M, r] in the accumulation dtype)``.
    """
    T = x.dtype
    L = lora_dtype or T
    acc = acc_dtype_of(T, L)
    S = kept(x, keep).to(L).to(acc) @ _in(lora_A, L, acc).t()
    if keep is not None:
        S = S * keep_scale
    y = x.to(acc) @ _in(weight, T, acc).t()
    y = y + _in(S * scaling, L, acc) @ _in(lora_B, L, acc).t()
    if bias is not None:
        y = y + _in(bias, T, acc)
    return y.to(T), S


def lora_backward(dy, x, weight, lora_A, lora_B, S, scaling, keep=None, keep_scale=1.0,
                  need_dx=True, need_dA=True, need_dB=True, out_dtype=None, lora_dtype=None):
    """Backward of the fused op for dy ``[M, N]``; returns ``(dx, dA, dB)``: dx in x's dtype, dA
    and dB in the dtypes of lora_A / lora_B, or ``out_dtype`` if given (None where not requested)."""
    T = x.dtype
    L = lora_dtype or T
    acc = acc_dtype_of(T, L)
    dyL = _in(dy, L, acc)
    dx = dA = dB = None
    if need_dx or need_dA:
        dS = scaling * (dyL @ _in(lora_B, L, acc))
        dSc = _in(dS, L, acc)
    if need_dB:
        dB = (scaling * (dyL.t() @ _in(S, L, acc))).to(out_dtype or lora_B.dtype)
    if need_dx:
        lora = dSc @ _in(lora_A, L, acc)
        if keep is not None:
            lora = lora * (keep.to(acc) * keep_scale)
        dx = (lora + _in(dy, T, acc) @ _in(weight, T, acc)).to(T)
    if need_dA:
        dA = dSc.t() @ kept(x, keep).to(L).to(acc)
        if keep is not None:
            dA = dA * keep_scale
        dA = dA.to(out_dtype or lora_A.dtype)
    return dx, dA, dB


class SeededDropout(torch.nn.Module):
    """Eager dropout that applies fastlora's mask: for checking fastlora against PEFT with the
    same dropout. It draws its seed exactly as :func:`fastlora.lora_linear` does with
    ``seed=None`` (:func:`fastlora.dropout.draw_seed`), so after the same ``torch.manual_seed``
    and the same sequence of calls both see the same masks.

    Input ``[..., K]``, any float dtype; output ``x * dropout_mask(x.shape, p, seed)`` in x's
    dtype (rounded once, as PEFT's dropout output is). Identity in eval mode or at ``p = 0``.
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
        return (x.to(mask.dtype) * mask).to(x.dtype)

    def extra_repr(self):
        return f"p={self.p}"
