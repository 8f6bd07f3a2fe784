"""DoRA (weight-decomposed LoRA; Liu et al., ICML 2024; PEFT ``use_dora=True``) on fastlora's kernels.

Math (PEFT ``peft/tuners/lora/dora.py``; kernels/dora.py has the full derivation)::

    n = ‖W + s·B·A‖₂ per output row (detached)    g = m / n    z = x·Wᵀ + s·(x̃·Aᵀ)·Bᵀ
    y = g ⊙ z + b
    dz = dy ⊙ g → LoRA's backward (dx, dA, dB)     dm = Σ_M dy ⊙ z / n    db = Σ_M dy

``torch.library`` operators (opaque to ``torch.compile``, fake implementations for tracing):
``fastlora::dora_linear_fwd`` (the row norm, then LoRA's forward with DoRA's epilogue: g and the
bias applied to the GEMM's accumulator, z stored only when the magnitude needs a gradient),
``fastlora::dora_linear_bwd`` (LoRA's backward on dz = dy ⊙ g and dm's column sums Σ dy ⊙ z: on
the fused Triton path g is applied to the dy tiles as LoRA's backward kernels load them and B1
sums dy ⊙ z, so no dz tensor exists) and ``fastlora::dora_dy`` (dz and the sums from one read of
dy and z: the torch path, the hybrid path's dz for cuBLAS, a trainable W). All dispatch like
LoRA's: the torch path (CPU, old GPUs) or the Triton kernels, there the fused or the hybrid path
(fastlora/dispatch.py measures which, keyed with "dora").

Saved for backward: what LoRA saves (x, S fp32, the seed) plus z ``[M, N]`` in the compute dtype
(only if the magnitude requires grad) and n ``[N]``: PEFT keeps several M×N tensors (the base and
LoRA outputs, their scaled copies) and two N×K ones (B·A and W + s·B·A).

Differences from PEFT, by design: n is computed in fp32 (fp64 for fp64) from W, A and B without
rounding ``W + s·B·A`` to the model dtype first (PEFT rounds it to x's dtype: bf16 models see a
~2⁻⁹ relative error in g); with dropout active in training, the mask touches the LoRA branch only
(``y = g ⊙ (x·Wᵀ + s·(x̃·Aᵀ)·Bᵀ) + b``, the paper's form), where PEFT also feeds x̃ to the
magnitude's share of the base term, ``(g - 1) ⊙ (x̃·Wᵀ)``, through a second base GEMM: the two have
the same expectation, and are identical without dropout or in eval mode.
"""
import functools
from typing import Optional

import torch

from . import dispatch, ops, reference
from ._checks import check_inputs, _tensor
from .backend import kernels, select_backend
from .function import _Call, _forward_mode_ad, _no_jvp, _seed_tensor

Tensor = torch.Tensor


def check_magnitude(magnitude, N, device):
    """``magnitude``: a floating ``[N]`` tensor on ``device`` (PEFT's ``lora_magnitude_vector``)."""
    _tensor("magnitude", magnitude, 1)
    if tuple(magnitude.shape) != (N,):
        raise ValueError(f"magnitude: expected shape [N] = [{N}] (N from weight), got {tuple(magnitude.shape)}")
    if magnitude.device != device:
        raise ValueError(f"magnitude: expected a tensor on input's device {device}, got {magnitude.device}")


# ----------------------------------------------------------------------------------------------
# The row norm ‖W + s·B·A‖ (no N×K temporary on the Triton path; row chunks on the torch path)
# ----------------------------------------------------------------------------------------------
_CHUNK = 1 << 22  # torch path: elements of W + s·B·A formed at a time


def _norm_torch(weight, lora_A, lora_B, scaling, acc):
    N, K = weight.shape
    A, sB = lora_A.to(acc), lora_B.to(acc) * scaling
    rows = max(1, _CHUNK // max(K, 1))
    out = [torch.linalg.vector_norm(torch.addmm(weight[n0:n0 + rows].to(acc), sB[n0:n0 + rows], A), dim=1)
           for n0 in range(0, N, rows)]
    return torch.cat(out) if len(out) > 1 else out[0]


def weight_norm(weight, lora_A, lora_B, scaling, scale=None, acc=torch.float32, backend=""):
    """``‖W + s·B·A‖₂`` per row ``[N]`` in ``acc`` (fp32, or fp64): on the Triton path in one pass
    over W (kernels/dora.py D1), on the torch path in row chunks of about 4M elements.
    ``scaling``/``scale``: a float, or (scale) a one-element tensor."""
    device = weight.device
    with ops._no_autocast(device.type), torch.no_grad():
        if (backend or select_backend(device, weight.dtype, lora_A.dtype)[0]) == "torch":
            return _norm_torch(weight, lora_A, lora_B, ops._scaling_value(scaling, scale), acc)
        return kernels().dora.dora_norm(weight, lora_A, lora_B, ops.scale_tensor(scaling, scale, device, acc))


# ----------------------------------------------------------------------------------------------
# Operators
# ----------------------------------------------------------------------------------------------
def _torch_forward(x, weight, lora_A, lora_B, g, scaling, scale, bias, seed, keep_thresh, keep_scale, lora_dtype,
                   store_z):
    keep = None if seed is None else ops.TorchMask(seed, *x.shape, keep_thresh, x.device, lora_dtype)
    z, S = reference.lora_forward(x, weight, lora_A, lora_B, ops._scaling_value(scaling, scale), None, keep,
                                  keep_scale, lora_dtype)
    acc = g.dtype
    if not store_z and z.dtype == acc:
        y = z.mul_(g) if bias is None else z.mul_(g).add_(bias)
    else:
        zz = z.to(acc)
        y = (zz * g if bias is None else torch.addcmul(bias.to(acc), zz, g)).to(x.dtype)
    mask = keep.packed if keep is not None and keep.packed is not None else ops._NO_MASK
    return y, (z if store_z else x.new_empty(0)), S, mask


def forward_impl(x, weight, lora_A, lora_B, magnitude, scaling, scale, bias, seed, keep_thresh, keep_scale,
                 lora_dtype, backend, path, store_z):
    """The body of ``fastlora::dora_linear_fwd``."""
    acc = reference.acc_dtype_of(x.dtype, lora_dtype)
    if x.device.type == "meta":
        return _fwd_fake(x, weight, lora_A, lora_B, magnitude, scaling, scale, bias, seed, keep_thresh, keep_scale,
                         lora_dtype, backend, path, store_z)
    backend = backend or select_backend(x.device, x.dtype, lora_dtype)[0]
    norm = weight_norm(weight, lora_A, lora_B, scaling, scale, acc, backend)
    with ops._no_autocast(x.device.type):
        g = magnitude.detach().to(acc) / norm
        if backend == "torch":
            return (*_torch_forward(x, weight, lora_A, lora_B, g, scaling, scale, bias, seed, keep_thresh,
                                    keep_scale, lora_dtype, store_z), norm)
    s = ops.scale_tensor(scaling, scale, x.device, acc)

    def run(p):
        with ops._no_autocast(x.device.type):
            y, S, z = kernels().lora_forward.forward(x, weight, lora_A, lora_B, s, bias, seed, keep_thresh,
                                                     keep_scale, lora_dtype, p, g=g, store_z=store_z)
        return y, (z if z is not None else x.new_empty(0)), S

    path = ops._path("fwd", x, weight, lora_A, lora_dtype, bias is not None, seed, path,
                     {p: functools.partial(run, p) for p in dispatch.PATHS}, ("dora", "z" * store_z))
    return (*run(path), ops._NO_MASK, norm)


@torch.library.custom_op("fastlora::dora_linear_fwd", mutates_args=())
def dora_linear_fwd(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float,
                    scale: Optional[Tensor], bias: Optional[Tensor], seed: Optional[Tensor], keep_thresh: int,
                    keep_scale: float, lora_dtype: torch.dtype, backend: str, path: str,
                    store_z: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y [M, N] in x.dtype, z [M, N] in x.dtype (empty unless store_z), S [M, r] fp32/fp64,
    mask (as fastlora::lora_linear_fwd's), n [N] fp32/fp64)``."""
    return forward_impl(x, weight, lora_A, lora_B, magnitude, scaling, scale, bias, seed, keep_thresh, keep_scale,
                        lora_dtype, backend, path, store_z)


@dora_linear_fwd.register_fake
def _fwd_fake(x, weight, lora_A, lora_B, magnitude, scaling, scale, bias, seed, keep_thresh, keep_scale, lora_dtype,
              backend, path, store_z):
    M, K = x.shape
    N = weight.shape[0]
    acc = reference.acc_dtype_of(x.dtype, lora_dtype)
    mask = (M, -(-K // 8)) if ops._keeps_packed(x, seed, lora_dtype, backend) else (0,)
    return (x.new_empty((M, N)), x.new_empty((M, N) if store_z else (0,)),
            x.new_empty((M, lora_A.shape[0]), dtype=acc), x.new_empty(mask, dtype=torch.uint8),
            x.new_empty((N,), dtype=acc))


def dy_impl(dy, z, g, backend, scale_dy, colsum):
    """The body of ``fastlora::dora_dy``."""
    if (backend or select_backend(dy.device, dy.dtype)[0]) == "torch":
        with ops._no_autocast(dy.device.type):
            dz = (dy * g if dy.dtype == g.dtype else (dy.to(g.dtype) * g).to(dy.dtype)) if scale_dy else None
            cs = torch.linalg.vecdot(dy.to(g.dtype), z.to(g.dtype), dim=0) if colsum else None
    else:
        dz, cs = kernels().dora.dora_dy(dy, z, g, scale_dy, colsum)
    return (dz if dz is not None else dy.new_empty(0), cs if cs is not None else g.new_empty(0))


@torch.library.custom_op("fastlora::dora_dy", mutates_args=())
def dora_dy(dy: Tensor, z: Tensor, g: Tensor, backend: str, scale_dy: bool, colsum: bool) -> tuple[Tensor, Tensor]:
    """``(dz = dy ⊙ g [M, N] in dy's dtype, Σ_M dy ⊙ z [N] in g's dtype)``, each empty if not asked."""
    return dy_impl(dy, z, g, backend, scale_dy, colsum)


@dora_dy.register_fake
def _(dy, z, g, backend, scale_dy, colsum):
    return dy.new_empty(dy.shape if scale_dy else (0,)), g.new_empty(g.shape if colsum else (0,))


def bwd_impl(dy, z, g, x, weight, lora_A, lora_B, S, mask, scaling, scale, seed, keep_thresh, keep_scale, need_dx,
             need_dA, need_dB, need_dm, lora_dtype, backend, path):
    """The body of ``fastlora::dora_linear_bwd``: ``(dx, dAB, colsum)``, dx and dAB as
    ``fastlora::lora_linear_bwd``'s for ``dz = dy ⊙ g``, colsum ``Σ_M dy ⊙ z`` ``[N]`` in g's
    dtype (each empty where not needed). Torch path: D2's torch form, then LoRA's backward on dz;
    Triton: :func:`fastlora.kernels.lora_backward.dora_linear_bwd` (no dz on the fused path)."""
    need_lora = need_dx or need_dA or need_dB
    if (backend or select_backend(dy.device, dy.dtype, lora_dtype)[0]) == "torch":
        dz, cs = dy_impl(dy, z, g, "torch", need_lora, need_dm)
        dx = dAB = None
        if need_lora:
            dx, dAB = ops.backward_impl(dz, x, weight, lora_A, lora_B, S, mask, scaling, scale, seed, keep_thresh,
                                        keep_scale, need_dx, need_dA, need_dB, lora_dtype, "torch", "")
        return (dx if dx is not None else x.new_empty(0), dAB if dAB is not None else S.new_empty(0), cs)
    s = ops.scale_tensor(scaling, scale, x.device, S.dtype)

    def run(p):
        with ops._no_autocast(x.device.type):  # the hybrid path's cuBLAS GEMM: the call's own dtypes
            return kernels().dora_linear_bwd(dy, z, g, x, weight, lora_A, lora_B, S, s, seed, keep_thresh, keep_scale,
                                             need_dx, need_dA, need_dB, need_dm, lora_dtype=lora_dtype, path=p)

    extra = ("dora", "dx" * need_dx + "dA" * need_dA + "dB" * need_dB + "dm" * need_dm)
    path = ops._path("bwd", x, weight, lora_A, lora_dtype, False, seed, path,
                     {p: functools.partial(run, p) for p in dispatch.PATHS}, extra)
    dx, dAB, cs = run(path)
    return (dx if dx is not None else x.new_empty(0), dAB if dAB is not None else S.new_empty(0),
            cs if cs is not None else g.new_empty(0))


@torch.library.custom_op("fastlora::dora_linear_bwd", mutates_args=())
def dora_linear_bwd(dy: Tensor, z: Tensor, g: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                    S: Tensor, mask: Tensor, scaling: float, scale: Optional[Tensor], seed: Optional[Tensor],
                    keep_thresh: int, keep_scale: float, need_dx: bool, need_dA: bool, need_dB: bool, need_dm: bool,
                    lora_dtype: torch.dtype, backend: str, path: str) -> tuple[Tensor, Tensor, Tensor]:
    """DoRA's backward given dy ``[M, N]``: ``(dx [M, K] in x's dtype, dAB (dB [N, r] then dA
    [r, K], flat, in S's dtype), Σ_M dy ⊙ z [N] in g's dtype)``, each empty where not needed."""
    return bwd_impl(dy, z, g, x, weight, lora_A, lora_B, S, mask, scaling, scale, seed, keep_thresh, keep_scale,
                    need_dx, need_dA, need_dB, need_dm, lora_dtype, backend, path)


@dora_linear_bwd.register_fake
def _(dy, z, g, x, weight, lora_A, lora_B, S, mask, scaling, scale, seed, keep_thresh, keep_scale, need_dx, need_dA,
      need_dB, need_dm, lora_dtype, backend, path):
    (N, R), K = lora_B.shape, x.shape[1]
    return (x.new_empty(x.shape if need_dx else (0,)), S.new_empty((N * R * need_dB + R * K * need_dA,)),
            g.new_empty(g.shape if need_dm else (0,)))


_OPERATORS = {"dora_linear_fwd": dora_linear_fwd, "dora_dy": dora_dy, "dora_linear_bwd": dora_linear_bwd}
_IMPLS = {"dora_linear_fwd": forward_impl, "dora_dy": dy_impl, "dora_linear_bwd": bwd_impl}


def _op(name):
    """The registered operator (traced, compiled, other dispatch keys) or its body called directly."""
    return _OPERATORS[name] if ops.need_operator() else _IMPLS[name]


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------
def _core_forward(input, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, seed, lora_dtype, store_z):
    c = _Call(input, weight, lora_A, lora_B, scaling, bias, dropout_p, lora_dtype,
              resolve=not torch.compiler.is_compiling())
    seed_t = _seed_tensor(seed, input.device) if c.p > 0 else input.new_empty(0, dtype=torch.int64)
    acc = reference.acc_dtype_of(input.dtype, c.lora_dtype)
    if c.M == 0:
        N = c.N
        y = input.new_empty((*input.shape[:-1], N))
        return (y, input.new_empty((0, N) if store_z else (0,)), input.new_empty((0, c.r), dtype=acc),
                seed_t, input.new_empty(0, dtype=torch.uint8),
                weight_norm(weight, lora_A, lora_B, c.scaling, c.scale, acc, c.backend))
    x = input if input.dim() == 2 else input.reshape(c.M, c.K)
    y, z, S, mask, norm = _op("dora_linear_fwd")(
        x, weight, lora_A, lora_B, magnitude, c.scaling, c.scale, bias, seed_t if c.p > 0 else None,
        c.keep_thresh, c.keep_scale, c.lora_dtype, c.backend, "", store_z)
    if input.dim() != 2:
        y = torch.ops.aten._unsafe_view(y, (*input.shape[:-1], c.N))
    return y, z, S, seed_t, mask, norm


def _setup_context(ctx, inputs, output):
    input, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, _, lora_dtype, _ = inputs
    c = _Call(input, weight, lora_A, lora_B, scaling, bias, dropout_p, lora_dtype, shapes=(0, 0, 0, 0))
    _, z, S, seed_t, mask, norm = output
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.has_seed, ctx.has_scale = seed_t.numel() > 0, c.scale is not None
    ctx.save_for_backward(input, weight, lora_A, lora_B, magnitude, z, S, mask, norm,
                          *(t for t in (seed_t if ctx.has_seed else None, c.scale) if t is not None))
    ctx.scaling, ctx.keep, ctx.backend, ctx.lora_dtype = c.scaling, (c.keep_thresh, c.keep_scale), c.backend, \
        c.lora_dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy, *_):
    if dy is None:
        return (None,) * 11
    input, weight, lora_A, lora_B, magnitude, z, S, mask, norm, *rest = ctx.saved_tensors
    seed_t = rest.pop(0) if ctx.has_seed else None
    scale = rest.pop(0) if ctx.has_scale else None
    need_dx, need_dW, need_dA, need_dB, need_dm, _, need_db = ctx.needs_input_grad[:7]
    N, K = weight.shape
    x = input if input.dim() == 2 else input.reshape(-1, K)
    M = x.shape[0]
    dy = dy.reshape(M, N)
    if dy.dtype != input.dtype:
        dy = dy.to(input.dtype)
    dx = dW = dA = dB = dm = db = None
    if M == 0:
        dx = torch.zeros_like(x) if need_dx else None
        dA = torch.zeros_like(lora_A) if need_dA else None
        dB = torch.zeros_like(lora_B) if need_dB else None
        dm = torch.zeros_like(magnitude) if need_dm else None
        dW = torch.zeros_like(weight) if need_dW else None
    else:
        g = magnitude.detach().to(norm.dtype) / norm
        if need_dW:  # a trainable base weight (rare): dW = dzᵀ·x needs dz itself
            dz, colsum = _op("dora_dy")(dy, z, g, ctx.backend, True, bool(need_dm))
            with torch.autocast(input.device.type, enabled=False):
                dW = (dz.t() @ x).to(weight.dtype)
            if need_dx or need_dA or need_dB:
                dx, dA, dB = ops.backward(dz, x, weight, lora_A, lora_B, S, mask, ctx.scaling, scale, seed_t,
                                          *ctx.keep, need_dx, need_dA, need_dB, ctx.lora_dtype, ctx.backend, "")
        elif need_dx or need_dA or need_dB or need_dm:
            dx, dAB, colsum = _op("dora_linear_bwd")(
                dy, z, g, x, weight, lora_A, lora_B, S, mask, ctx.scaling, scale, seed_t, *ctx.keep, bool(need_dx),
                bool(need_dA), bool(need_dB), bool(need_dm), ctx.lora_dtype, ctx.backend, "")
            dA, dB = ops.split_dAB(dAB, lora_B.shape, need_dA, need_dB)
            dx = dx if need_dx else None
        if need_dm:
            dm = (colsum / norm).to(magnitude.dtype)
        dA = dA.to(lora_A.dtype) if dA is not None else None
        dB = dB.to(lora_B.dtype) if dB is not None else None
    if need_db:
        with torch.autocast(input.device.type, enabled=False):
            db = dy.sum(0).to(ctx.bias_dtype)
    if dx is not None and input.dim() != 2:
        dx = dx.view(input.shape)
    return dx, dW, dA, dB, dm, None, db, None, None, None, None


class DoRALinearCore(torch.autograd.Function):
    """``apply(input, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, seed, lora_dtype,
    store_z)`` → ``(y, z, S, seed, mask, n)``: y and what the backward needs (non-differentiable).
    Gradients: input, weight, lora_A, lora_B, magnitude, bias. Not twice differentiable."""

    forward = staticmethod(_core_forward)
    setup_context = staticmethod(_setup_context)
    backward = staticmethod(torch.autograd.function.once_differentiable(_backward))


class _ForwardModeCore(DoRALinearCore):
    jvp = staticmethod(_no_jvp)


def apply(input, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, seed, lora_dtype):
    """y of one DoRA call through autograd (arguments validated by :func:`fastlora.lora_linear`)."""
    fn = _ForwardModeCore if _forward_mode_ad() else DoRALinearCore
    store_z = torch.compiler.is_compiling() or magnitude.requires_grad
    return fn.apply(input, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, seed, lora_dtype, store_z)[0]


class _SavedContext:
    """Stands in for an autograd ctx so that :func:`_setup_context` / :func:`_backward` serve the
    quantized-weight Function too (which must not keep the dequantized W between the passes)."""

    def __init__(self, saved=(), needs_input_grad=()):
        self.saved_tensors, self.needs_input_grad = tuple(saved), tuple(needs_input_grad)

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *_):
        pass

    def set_materialize_grads(self, _):
        pass


_CTX_ATTRS = ("has_seed", "has_scale", "scaling", "keep", "backend", "lora_dtype", "bias_dtype")


class QDoRALinearFunction(torch.autograd.Function):
    """DoRA over a frozen quantized base weight (QLoRA + DoRA; PEFT ``use_dora=True`` on a
    ``lora.bnb.Linear4bit`` / ``Linear8bitLt``): W = dequant(W_q) ``[N, K]`` in input's dtype,
    transient in the forward (the row norm and the GEMM read it) and dequantized again in the
    backward when dx is needed; then the math of :class:`DoRALinearCore`. Saved: what DoRA saves
    except W (the quantized storage is referenced). ``apply(input, lora_A, lora_B, magnitude,
    scaling, bias, dropout_p, seed, lora_dtype, store_z, qweight)`` → y. Not twice differentiable."""

    @staticmethod
    def forward(ctx, input, lora_A, lora_B, magnitude, scaling, bias, dropout_p, seed, lora_dtype, store_z, qw):
        weight = qw.dequantize(input.dtype)
        inputs = (input, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, seed, lora_dtype, store_z)
        out = _core_forward(*inputs)
        shim = _SavedContext()
        _setup_context(shim, inputs, out)
        del weight, inputs
        saved = list(shim.saved_tensors)
        saved[1] = None  # W: dequantized again in the backward
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*saved)
        for a in _CTX_ATTRS:
            setattr(ctx, a, getattr(shim, a))
        ctx.qw, ctx.dtype = qw, input.dtype
        return out[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        if dy is None:
            return (None,) * 11
        saved = list(ctx.saved_tensors)
        need_dx, need_dA, need_dB, need_dm, _, need_db = ctx.needs_input_grad[:6]
        saved[1] = ctx.qw.dequantize(ctx.dtype) if need_dx else \
            torch.empty((), dtype=ctx.dtype, device=dy.device).expand(ctx.qw.shape)  # only dx reads W
        shim = _SavedContext(saved, (need_dx, False, need_dA, need_dB, need_dm, False, need_db))
        for a in _CTX_ATTRS:
            setattr(shim, a, getattr(ctx, a))
        dx, _, dA, dB, dm, _, db, *_ = _backward(shim, dy)
        return dx, dA, dB, dm, None, db, None, None, None, None, None


def qdora_linear(input, qw, lora_A, lora_B, magnitude, scaling, bias, dropout_p, seed, lora_dtype, needs_grad):
    """The quantized-weight branch of DoRA in :func:`fastlora.lora_linear` (validated there)."""
    if not needs_grad:
        return forward_no_grad(input, qw.dequantize(input.dtype), lora_A, lora_B, magnitude, scaling, bias,
                               dropout_p, seed, lora_dtype)
    store_z = torch.compiler.is_compiling() or magnitude.requires_grad
    return QDoRALinearFunction.apply(input, lora_A, lora_B, magnitude, scaling, bias, dropout_p, seed, lora_dtype,
                                     store_z, qw)


def forward_no_grad(input, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, seed, lora_dtype):
    """y alone, no autograd (eval, ``torch.no_grad``): nothing kept for a backward."""
    c = _Call(input, weight, lora_A, lora_B, scaling, bias, dropout_p, lora_dtype, resolve=True)
    seed_t = _seed_tensor(seed, input.device) if c.p > 0 else None
    if c.M == 0:
        return input.new_empty((*input.shape[:-1], c.N))
    y, *_ = forward_impl(input.reshape(c.M, c.K), weight, lora_A, lora_B, magnitude, c.scaling, c.scale, bias, seed_t,
                         c.keep_thresh, c.keep_scale, c.lora_dtype, c.backend, "", False)
    return y.view(*input.shape[:-1], c.N)


def check_dora_call(input, weight, lora_A, lora_B, magnitude, bias, same_dtype):
    """Validate a DoRA call's tensors (:func:`fastlora._checks.check_inputs` plus the magnitude)."""
    shapes = check_inputs(input, weight, lora_A, lora_B, bias, same_dtype=same_dtype)
    check_magnitude(magnitude, shapes[1], input.device)
    return shapes
