"""Pure-torch LoRA linear: the test oracle, the CPU fallback and the benchmarks' baseline.

Math (PEFT layouts, ``peft/tuners/lora/layer.py``; FIELD.md §1)::

    x̃  = m ⊙ x                          m ∈ {0, 1/(1-p)}^{M×K}   (inverted dropout, LoRA branch only)
    S  = x̃·Aᵀ                           [M, r]
    y  = x·Wᵀ + b + s·S·Bᵀ              [M, N]
    dS = s·dy·B          dB = s·dyᵀ·S   dA = dSᵀ·x̃     dx = dy·W + m ⊙ (dS·A)     db = Σ_M dy

:func:`lora_linear_ref` is the plain differentiable formula (autograd derives its gradients):
run it in float64 for the oracle. :func:`lora_forward` / :func:`lora_backward` are the explicit
two-pass form the kernels compute, in as few passes over the big tensors as torch ops allow (the
CPU path): the base GEMM in the compute dtype T (x's dtype); the LoRA products' operands in the
LoRA dtype L (PEFT: the adapters' dtype outside autocast, so fp32 adapters on a bf16 model give
fp32 LoRA math; the autocast dtype under autocast); the dropped-out input formed as
``keep ⊙ x`` (exact) with the dropout scale applied to the product; S kept in the accumulation
dtype (fp32, fp64 when T or L is fp64); the LoRA terms added in place into the base output and
dx, or (T ≠ L) summed in L and rounded to T, PEFT's order. With float64 inputs they are exact
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


def dora_linear_ref(x, weight, lora_A, lora_B, magnitude, scaling, bias=None, mask=None):
    """Differentiable DoRA reference (PEFT ``DoraLinearLayer`` without dropout on the base term;
    fastlora/dora.py): ``g ⊙ (x·Wᵀ + s·((m ⊙ x)·Aᵀ)·Bᵀ) + b`` with ``g = magnitude / ‖W + s·B·A‖₂``
    per row, the norm detached. Same shapes as :func:`lora_linear_ref` plus magnitude ``[N]``; all
    tensors in one dtype."""
    norm = torch.linalg.vector_norm(weight + scaling * (lora_B @ lora_A), dim=1).detach()
    z = lora_linear_ref(x, weight, lora_A, lora_B, scaling, None, mask)
    y = z * (magnitude / norm)
    return y if bias is None else y + bias


def _in(t, dtype, acc):
    """Round ``t`` to ``dtype``, then widen it to the accumulation dtype."""
    return _as(_as(t, dtype), acc)


def _as(t, dtype):
    """``t.to(dtype)``, skipping the call when it would return ``t`` (it costs ~1 µs per call,
    which adds up on the decode path)."""
    return t if t.dtype == dtype else t.to(dtype)


def kept(x, keep):
    """``keep ⊙ x`` for a 0 / 1 mask (bool or float tensor, or a mask object with ``mul(x)``, e.g.
    the CPU path's fused C kernel; exact; a multiply, so NaN·0 = NaN as in torch's dropout), in the
    wider of the two dtypes."""
    if keep is None:
        return x
    if isinstance(keep, torch.Tensor):
        return x * keep
    return keep.mul(x)


def add_kept_(dx, term, keep, alpha):
    """``dx += alpha · keep ⊙ term`` in place (keep: None, a 0 / 1 tensor, or a mask object with
    ``addcmul_(dx, term, alpha)``)."""
    if keep is None:
        return dx.add_(term, alpha=alpha)
    if isinstance(keep, torch.Tensor):
        return dx.addcmul_(term, keep.to(term.dtype), value=alpha)
    return keep.addcmul_(dx, term, alpha)


def lora_forward(x, weight, lora_A, lora_B, scaling, bias=None, keep=None, keep_scale=1.0, lora_dtype=None):
    """Forward of the fused op on torch ops. x ``[M, K]``; keep ``[M, K]`` dropout's kept elements
    as a bool or 0 / 1 float tensor, or None; scaling a float or a 0-dim tensor.

    Returns ``(y [M, N] in x.dtype, S [M, r] in the accumulation dtype)``. y is the base output in
    T plus the LoRA term: for T = L in place (``addmm_``), else summed in L and rounded to T
    (PEFT's order: base output, then the sum).
    """
    T = x.dtype
    L = lora_dtype or T
    acc = acc_dtype_of(T, L)
    S = _as(torch.mm(_as(kept(x, keep), L), _as(lora_A, L).t()), acc)
    if keep is not None:
        S.mul_(keep_scale)
    y = torch.nn.functional.linear(x, weight, bias)
    if isinstance(scaling, torch.Tensor) and scaling.device.type == "cpu":
        scaling = float(scaling)  # a CPU scalar costs nothing to read: pass it as addmm's alpha
    if isinstance(scaling, float) and L == acc:  # (s·S)·Bᵀ = s·(S·Bᵀ) in the same fp32 / fp64 ops
        if L == T:
            return y.addmm_(S, _as(lora_B, L).t(), alpha=scaling), S
        return torch.addmm(_as(y, L), S, _as(lora_B, L).t(), alpha=scaling).to(T), S
    term = _as(S * scaling, L)
    if L == T:
        y.addmm_(term, _as(lora_B, L).t())
    else:
        y = torch.addmm(_as(y, L), term, _as(lora_B, L).t()).to(T)
    return y, S


def lora_backward(dy, x, weight, lora_A, lora_B, S, scaling, keep=None, keep_scale=1.0,
                  need_dx=True, need_dA=True, need_dB=True, out_dtype=None, lora_dtype=None, dx_out=None):
    """Backward of the fused op on torch ops for dy ``[M, N]``; returns ``(dx, dA, dB)``: dx in x's
    dtype, dA and dB in the dtypes of lora_A / lora_B, or ``out_dtype`` if given (None where not
    requested). ``dx_out``: an ``[M, K]`` tensor in x's dtype that this call's dx is added into
    (in place, and returned as dx): a group of siblings fed one input (fastlora/group.py) sums
    its dx in one buffer, the base term by ``addmm_`` with beta = 1 (no M×K temporary for it)."""
    T = x.dtype
    L = lora_dtype or T
    acc = acc_dtype_of(T, L)
    dyL = _as(dy, L)
    dx = dA = dB = None
    if need_dx or need_dA:
        dS = _as(_as(torch.mm(dyL, _as(lora_B, L)), acc) * scaling, L)
    if need_dB:  # (Sᵀ·dy)ᵀ: the skinny product with the long reduction inside (4x faster on CPU)
        dB = _as(_as(torch.mm(_as(S, L).t(), dyL).t(), acc) * scaling, out_dtype or lora_B.dtype)
    if need_dx:
        if dx_out is not None and L != T:  # the LoRA term is summed in L first: add the whole dx
            return (dx_out.add_(lora_backward(dy, x, weight, lora_A, lora_B, S, scaling, keep, keep_scale, True,
                                              False, False, out_dtype, lora_dtype)[0]),
                    *lora_backward(dy, x, weight, lora_A, lora_B, S, scaling, keep, keep_scale, False, need_dA,
                                   need_dB, out_dtype, lora_dtype)[1:])
        dx = torch.mm(_as(dy, T), weight) if dx_out is None else dx_out.addmm_(_as(dy, T), weight)
        if keep is None and L == T:  # one GEMM with beta = 1: dx is read and written once
            dx.addmm_(dS, _as(lora_A, L))
        else:
            term = torch.mm(dS, _as(lora_A, L))
            alpha = keep_scale if keep is not None else 1.0
            if L == T:
                add_kept_(dx, term, keep, alpha)
            else:
                dx = add_kept_(_as(dx, L), term, keep, alpha).to(T)
    if need_dA:
        dA = _as(torch.mm(dS.t(), _as(kept(x, keep), L)), acc)
        if keep is not None:
            dA.mul_(keep_scale)
        dA = _as(dA, out_dtype or lora_A.dtype)
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
