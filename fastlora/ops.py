"""fastlora's two operators, registered with ``torch.library`` so ``torch.compile`` treats them
as opaque nodes (no graph break, fake implementations for tracing, usable under CUDA graphs).

``fastlora::lora_linear_fwd(x, weight, lora_A, lora_B, scaling, scale, bias, seed, keep_thresh,
keep_scale, lora_dtype, backend, path) -> (y, S)`` and ``fastlora::lora_linear_bwd(...) -> (dx, dAB)``
work on 2-D ``x [M, K]`` (M ≥ 1) and dispatch at run time: to the pure-torch path or to the Triton
kernels (compiled or interpreted, :mod:`fastlora.backend`), and there to the fused or the hybrid
path (:mod:`fastlora.dispatch`); ``fastlora.LoRALinearFunction`` wires them into autograd.

The LoRA scaling reaches the kernels as a device scalar: either the ``scale`` tensor the caller
passes (e.g. :class:`fastlora.LoRALinear`'s buffer, so that changing it needs no recompilation)
or, for a Python float, a cached one-element tensor per (device, dtype, value).
"""
import contextlib
import functools
from typing import Optional

import torch

from . import cpu, dispatch, reference
from ._checks import autocast_enabled
from .backend import kernels, select_backend
from .dropout import keep_bits_torch, packed_keep

Tensor = torch.Tensor


@functools.lru_cache(maxsize=256)
def _scale_tensor(device, dtype, value):
    return torch.full((1,), value, device=device, dtype=dtype)


def scale_tensor(scaling, scale, device, acc_dtype):
    """The scaling as a one-element tensor of the accumulator dtype on ``device``. Floats are
    cached per (device, dtype, value), except while a CUDA graph is being captured: a tensor
    made then is filled only when the graph replays, so it is made fresh inside the graph."""
    if scale is not None:
        return scale.reshape(1).to(device=device, dtype=acc_dtype)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.full((1,), scaling, device=device, dtype=acc_dtype)
    return _scale_tensor(device, acc_dtype, scaling)


def _scaling_value(scaling, scale):
    """The scaling for the torch path: the tensor itself (0-dim) or the float."""
    return scaling if scale is None else scale.reshape(())


class TorchMask:
    """The torch path's dropout keep-mask. On a CPU it is the bit-packed mask of fastlora/cpu.py
    (built once in the forward, M·K/8 bytes, kept for the backward), read by fused C loops for
    fp32 (``mul``, ``addcmul_``) and unpacked to a 0 / 1 tensor for other dtypes; elsewhere (an
    old GPU, ROCm) the 0 / 1 tensor built by torch ops."""

    def __init__(self, seed, M, K, keep_thresh, device, dtype, packed=None):
        self.M, self.K, self.thresh, self.device, self.dtype = M, K, keep_thresh, device, dtype
        self.seed = int(seed.item()) & ((1 << 64) - 1)
        self.packed = packed
        if device.type == "cpu" and packed is None:
            self.packed = packed_keep(M, K, self.seed, keep_thresh)
        self._tensor = None

    def tensor(self):
        if self._tensor is None:
            self._tensor = cpu.unpack(self.packed, self.K, self.dtype) if self.packed is not None else \
                keep_bits_torch(self.M, self.K, self.seed, self.thresh, self.device).to(self.dtype)
        return self._tensor

    def mul(self, x):
        out = cpu.packed_mul(x, self.packed) if self.packed is not None else None
        return out if out is not None else x * self.tensor()

    def addcmul_(self, dx, t, alpha):
        if self.packed is not None and cpu.packed_addcmul_(dx, t, self.packed, alpha):
            return dx
        return dx.addcmul_(t, self.tensor().to(t.dtype), value=alpha)


def _keeps_packed(x, seed, lora_dtype, backend):
    """Whether the forward returns a packed mask for the backward (the torch path on a CPU)."""
    return seed is not None and x.device.type == "cpu" and \
        (backend or select_backend(x.device, x.dtype, lora_dtype)[0]) == "torch"


_NO_MASK = torch.empty(0, dtype=torch.uint8)


def _no_autocast(device_type):
    """Autocast off for the torch path's ops (a no-op context when it is off already: cheaper)."""
    return torch.autocast(device_type, enabled=False) if autocast_enabled(device_type) else contextlib.nullcontext()


def _path(kind, x, weight, lora_A, lora_dtype, has_bias, seed, path, runners, extra=()):
    """The Triton path of this call: ``path`` if given, else :func:`fastlora.dispatch.choose`."""
    if path:
        return path
    key = dispatch.key_of(kind, x, weight, lora_A, lora_dtype, has_bias, seed is not None, extra)
    return dispatch.choose(x.device, key, lora_A.shape[0], kind, runners, kernels().INTERPRETED).path


def forward_impl(x, weight, lora_A, lora_B, scaling, scale, bias, seed, keep_thresh, keep_scale, lora_dtype,
                 backend, path):
    """The body of ``fastlora::lora_linear_fwd`` (also called directly when no gradient is needed:
    the operator's dispatch costs more than the whole computation at decode sizes)."""
    acc = reference.acc_dtype_of(x.dtype, lora_dtype)
    if x.device.type == "meta":  # shape inference: the operator's fake outputs
        return _fwd_fake(x, weight, lora_A, lora_B, scaling, scale, bias, seed, keep_thresh, keep_scale, lora_dtype,
                         backend, path)
    if (backend or select_backend(x.device, x.dtype, lora_dtype)[0]) == "torch":
        with _no_autocast(x.device.type):
            keep = None if seed is None else TorchMask(seed, *x.shape, keep_thresh, x.device, lora_dtype)
            y, S = reference.lora_forward(x, weight, lora_A, lora_B, _scaling_value(scaling, scale), bias, keep,
                                          keep_scale, lora_dtype)
            return y, S, keep.packed if keep is not None and keep.packed is not None else _NO_MASK
    s = scale_tensor(scaling, scale, x.device, acc)

    def run(p):
        with _no_autocast(x.device.type):  # the hybrid path's cuBLAS GEMMs: the call's own dtypes
            return kernels().lora_linear_fwd(x, weight, lora_A, lora_B, s, bias, seed, keep_thresh, keep_scale,
                                             lora_dtype=lora_dtype, path=p)

    path = _path("fwd", x, weight, lora_A, lora_dtype, bias is not None, seed, path,
                 {p: functools.partial(run, p) for p in dispatch.PATHS})
    return (*run(path), _NO_MASK)


@torch.library.custom_op("fastlora::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                    scale: Optional[Tensor], bias: Optional[Tensor], seed: Optional[Tensor], keep_thresh: int,
                    keep_scale: float, lora_dtype: torch.dtype, backend: str,
                    path: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(y [M, N] in x.dtype, S [M, r] fp32/fp64, mask)``: ``mask`` the bit-packed dropout mask
    ``[M, ceil(K/8)]`` uint8 the torch path on a CPU keeps for the backward, else empty. ``seed``
    None disables dropout; ``backend`` "" picks :func:`fastlora.backend.select_backend`, ``path``
    "" picks :mod:`fastlora.dispatch`."""
    return forward_impl(x, weight, lora_A, lora_B, scaling, scale, bias, seed, keep_thresh, keep_scale, lora_dtype,
                        backend, path)


@lora_linear_fwd.register_fake
def _fwd_fake(x, weight, lora_A, lora_B, scaling, scale, bias, seed, keep_thresh, keep_scale, lora_dtype, backend,
              path):
    M, K = x.shape
    mask = (M, -(-K // 8)) if _keeps_packed(x, seed, lora_dtype, backend) else (0,)
    return (x.new_empty((M, weight.shape[0])),
            x.new_empty((M, lora_A.shape[0]), dtype=reference.acc_dtype_of(x.dtype, lora_dtype)),
            x.new_empty(mask, dtype=torch.uint8))


def backward_parts(dy, x, weight, lora_A, lora_B, S, mask, scaling, scale, seed, keep_thresh, keep_scale, need_dx,
                   need_dA, need_dB, lora_dtype, backend, path, dx_out=None):
    """The backward as ``(dx, dA, dB)`` (None where not needed; dA, dB in S's dtype): the body of
    ``fastlora::lora_linear_bwd``, whose schema packs dA and dB into one flat tensor. ``dx_out``
    (eager calls only, fastlora/group.py): an ``[M, K]`` buffer in x's dtype that dx is added
    into and returned as dx."""
    if (backend or select_backend(x.device, x.dtype, lora_dtype)[0]) == "torch":
        with _no_autocast(x.device.type):
            keep = None if seed is None else TorchMask(seed, *x.shape, keep_thresh, x.device, lora_dtype,
                                                        mask if mask.numel() else None)
            return reference.lora_backward(dy, x, weight, lora_A, lora_B, S, _scaling_value(scaling, scale), keep,
                                           keep_scale, need_dx, need_dA, need_dB, out_dtype=S.dtype,
                                           lora_dtype=lora_dtype, dx_out=dx_out)
    s = scale_tensor(scaling, scale, x.device, S.dtype)

    def run(p, dx_out=None):
        with _no_autocast(x.device.type):  # the hybrid path's cuBLAS GEMM: the call's own dtypes
            return kernels().lora_linear_bwd(dy, x, weight, lora_A, lora_B, S, s, seed, keep_thresh, keep_scale,
                                             need_dx, need_dA, need_dB, lora_dtype=lora_dtype, path=p, dx_out=dx_out)

    extra = ("dx" * need_dx + "dA" * need_dA + "dB" * need_dB,)
    # the choice's timing runs write fresh outputs (never into dx_out); the chosen path then adds into it
    path = _path("bwd", x, weight, lora_A, lora_dtype, False, seed, path,
                 {p: functools.partial(run, p) for p in dispatch.PATHS}, extra)
    dx, dAB = run(path, dx_out)
    return (dx, *split_dAB(dAB, lora_B.shape, need_dA, need_dB))


def split_dAB(dAB, B_shape, need_dA, need_dB):
    """``(dA [r, K], dB [N, r])`` views of the flat ``[dB | dA]`` gradient tensor the backward
    operators return (None where not needed); ``B_shape``: lora_B's ``(N, r)``."""
    N, R = B_shape
    n_db = N * R if need_dB else 0
    return dAB[n_db:].view(R, -1) if need_dA else None, dAB[:n_db].view(N, R) if need_dB else None


def backward_impl(*args):
    """The body of ``fastlora::lora_linear_bwd``: :func:`backward_parts` packed as ``(dx, dAB)``."""
    dx, dA, dB = backward_parts(*args)
    parts = [t.reshape(-1) for t in (dB, dA) if t is not None]
    x, S = args[1], args[5]
    return (dx if dx is not None else x.new_empty(0), torch.cat(parts) if parts else S.new_empty(0))


@torch.library.custom_op("fastlora::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, S: Tensor,
                    mask: Tensor, scaling: float, scale: Optional[Tensor], seed: Optional[Tensor], keep_thresh: int,
                    keep_scale: float, need_dx: bool, need_dA: bool, need_dB: bool, lora_dtype: torch.dtype,
                    backend: str, path: str) -> tuple[Tensor, Tensor]:
    """``(dx, dAB)``: dx in x's dtype (empty if not needed) and one flat tensor in S's dtype
    holding ``dB [N, r]`` then ``dA [r, K]`` (each only if needed; split by the caller). ``mask``:
    what the forward returned (the torch path's packed dropout mask, or empty)."""
    return backward_impl(dy, x, weight, lora_A, lora_B, S, mask, scaling, scale, seed, keep_thresh, keep_scale,
                         need_dx, need_dA, need_dB, lora_dtype, backend, path)


def need_operator():
    """Whether the call must go through the registered operators: under torch.compile (an opaque
    node with a fake implementation) and under torch.func transforms (its vmap rules)."""
    if torch.compiler.is_compiling():
        return True
    try:
        return bool(torch._C._functorch.get_interpreter_stack())
    except AttributeError:  # torch without these internals: always the operator (correct, slower)
        return True


def forward(*args):
    """``fastlora::lora_linear_fwd`` where :func:`need_operator`, its body called directly
    otherwise: the operator's dispatch costs tens of µs per call, which small layers feel."""
    return lora_linear_fwd(*args) if need_operator() else forward_impl(*args)


def backward(*args):
    """``(dx, dA, dB)`` by ``fastlora::lora_linear_bwd`` where :func:`need_operator`, by its body
    otherwise (None where not needed)."""
    if not need_operator():
        return backward_parts(*args)
    dx, dAB = lora_linear_bwd(*args)
    need_dx, need_dA, need_dB = args[12:15]
    return (dx if need_dx else None, *split_dAB(dAB, args[4].shape, need_dA, need_dB))


@lora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, S, mask, scaling, scale, seed, keep_thresh, keep_scale, need_dx, need_dA,
      need_dB, lora_dtype, backend, path):
    n = lora_B.numel() * need_dB + lora_A.numel() * need_dA
    return x.new_empty(x.shape if need_dx else (0,)), S.new_empty((n,))


# ----------------------------------------------------------------------------------------------
# torch.func.vmap: the kernels have no batch dimension, so a batched call runs one call per
# sample (a 2-D x batched alone without dropout is folded into M instead: the same rows, one
# launch). Per-sample calls keep each sample's dropout rows 0..M-1, as an unbatched call would.
# ----------------------------------------------------------------------------------------------
def _per_sample(op, info, in_dims, args):
    outs = [op(*[a.select(d, b) if d is not None else a for a, d in zip(args, in_dims)])
            for b in range(info.batch_size)]
    return tuple(torch.stack([o[i] for o in outs]) for i in range(len(outs[0]))), (0,) * len(outs[0])


@torch.library.register_vmap("fastlora::lora_linear_fwd")
def _fwd_vmap(info, in_dims, x, weight, lora_A, lora_B, scaling, scale, bias, seed, *rest):
    args = (x, weight, lora_A, lora_B, scaling, scale, bias, seed, *rest)
    if in_dims[0] is not None and all(d is None for d in in_dims[1:]) and seed is None:
        xb = x.movedim(in_dims[0], 0)
        B, M, K = xb.shape
        y, S, mask = lora_linear_fwd(xb.reshape(B * M, K), *args[1:])  # no dropout: mask is empty
        return (y.view(B, M, -1), S.view(B, M, -1), mask), (0, 0, None)
    return _per_sample(lora_linear_fwd, info, in_dims, args)


@torch.library.register_vmap("fastlora::lora_linear_bwd")
def _bwd_vmap(info, in_dims, *args):
    return _per_sample(lora_linear_bwd, info, in_dims, args)
