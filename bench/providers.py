"""The LoRA linear implementations the benchmark compares, on one set of inputs.

Every provider computes ``y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ`` (``base``: ``x·Wᵀ`` alone) with a
frozen W and trainable A, B; the input x requires grad, as activations do inside a model.

  base          frozen ``F.linear`` alone: the floor
  eager         PEFT's order in plain torch ops: dropout -> A -> B -> scale -> add (bf16 adapters)
  peft          a real ``peft`` LoRA Linear layer with adapters in the model dtype
  peft-fp32     a real ``peft`` layer with PEFT's default fp32 adapters, under ``torch.autocast``
  compile       ``torch.compile`` of ``eager``
  addmm         base GEMM, then the LoRA update added in place with ``addmm_`` (Unsloth's style)
  fastlora      ``fastlora.lora_linear`` with adapters in the model dtype; the path (fused or
                hybrid) chosen by measurement on the first call of each shape (fastlora.dispatch)
  fastlora-fused  the same, forced onto the fused path (``FASTLORA_PATH=fused``)
  fastlora-hybrid the same, forced onto the hybrid path: cuBLAS GEMMs + Triton LoRA kernels
  fastlora-fp32 ``fastlora.lora_linear`` with fp32 adapters (PEFT's default), no autocast: the
                LoRA math in fp32, as PEFT computes it (the exact operand split on tensor cores)

QLoRA (W quantized once per case by bitsandbytes to NF4 with double quantization, blocksize 64,
compute dtype the model dtype; needs bitsandbytes):
  qlora-base      the frozen bitsandbytes ``Linear4bit`` alone: QLoRA's floor
  peft-qlora      a real PEFT ``lora.bnb.Linear4bit`` over it, adapters in the model dtype
  fastlora-qlora  ``fastlora.lora_linear`` with that ``Params4bit`` as the weight

DoRA (``y = g ⊙ (x·Wᵀ + s·(x̃·Aᵀ)·Bᵀ)``, ``g = m / ‖W + s·B·A‖₂`` per row; the magnitude m trains too;
m starts at ‖W‖ per row times 1 ± 10%, so g ≠ 1):
  peft-dora       a real ``peft`` LoRA Linear layer with ``use_dora=True``, adapters in the model dtype
  fastlora-dora   ``fastlora.lora_linear(..., magnitude=m)``, the path chosen by measurement
"""
import contextlib
import dataclasses
import os

import torch
import torch.nn.functional as F

import fastlora

from .provider_names import PROVIDERS


@dataclasses.dataclass
class Inputs:
    x: torch.Tensor       # [M, K], requires grad
    W: torch.Tensor       # [N, K], frozen
    A: torch.Tensor       # [r, K] in the model dtype
    B: torch.Tensor       # [N, r]
    dy: torch.Tensor      # [M, N]
    scaling: float
    p: float
    magnitude: torch.Tensor  # [N], DoRA's (requires grad)


def make_inputs(M, N, K, r, dtype, device, p, seed=0, scaling=2.0):
    """Random unit-scale inputs (never zeros: they hide bugs and run faster than real data)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    x = rnd(M, K).requires_grad_()
    W = rnd(N, K, std=K ** -0.5)
    A = rnd(r, K, std=K ** -0.5).requires_grad_()
    B = rnd(N, r, std=r ** -0.5).requires_grad_()
    dy = rnd(M, N)
    m = (torch.linalg.vector_norm(W.float(), dim=1) * (1 + 0.1 * torch.randn(N, generator=g).to(device)))
    return Inputs(x, W, A, B, dy, scaling, p, m.to(dtype).requires_grad_())


class Provider:
    """``forward()`` -> y with autograd; ``leaves``: tensors whose grads the step produces;
    ``params``: tensors a provider may save for backward at no extra memory cost."""

    def __init__(self, name, forward, leaves, params, context=contextlib.nullcontext):
        self.name, self.forward, self.leaves, self.params, self.context = name, forward, leaves, params, context

    def run_forward(self):
        with self.context():
            return self.forward()

    def backward(self, y, dy, **kwargs):
        """``y.backward(dy)`` under the provider's context (e.g. the forced fastlora path)."""
        with self.context():
            y.backward(dy, **kwargs)

    def step(self, dy):
        """Forward and backward."""
        with self.context():
            self.forward().backward(dy)


def _peft_layer(inp, fp32_adapters, use_dora=False):
    import peft
    from torch import nn
    N, K = inp.W.shape
    r = inp.A.shape[0]
    lin = nn.Linear(K, N, bias=False, device=inp.W.device, dtype=inp.W.dtype)
    lin.weight = nn.Parameter(inp.W, requires_grad=False)
    cfg = peft.LoraConfig(r=r, lora_alpha=inp.scaling * r, target_modules=["0"], lora_dropout=inp.p,
                          use_dora=use_dora)
    model = peft.get_peft_model(nn.Sequential(lin), cfg, autocast_adapter_dtype=fp32_adapters)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(inp.A)
        layer.lora_B["default"].weight.copy_(inp.B)
        if use_dora:
            layer.lora_magnitude_vector["default"].weight.copy_(inp.magnitude)
    model.train()
    return layer


@contextlib.contextmanager
def _path_env(path):
    """``FASTLORA_PATH=path`` for the block (read by fastlora at each call)."""
    import os
    previous = os.environ.get("FASTLORA_PATH")
    os.environ["FASTLORA_PATH"] = path
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("FASTLORA_PATH")
        else:
            os.environ["FASTLORA_PATH"] = previous


def _nf4_layer(inp):
    """A bitsandbytes NF4 ``Linear4bit`` holding W (double quantization, compute dtype W's)."""
    import bitsandbytes as bnb
    N, K = inp.W.shape
    layer = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=inp.W.dtype, quant_type="nf4",
                              compress_statistics=True)
    layer.load_state_dict({"weight": inp.W.detach().cpu()})
    return layer.to(inp.W.device)  # quantizes there


def _qlora_provider(name, inp):
    from torch import nn
    x, A, B, s, p = inp.x, inp.A, inp.B, inp.scaling, inp.p
    base = _nf4_layer(inp)
    if name == "qlora-base":
        prov = Provider(name, lambda: base(x), [x], [base.weight])
    elif name == "peft-qlora":
        import peft
        seq = nn.Sequential(base)
        seq.is_loaded_in_4bit = True  # what PEFT reads to pick its bitsandbytes LoRA layer
        r = A.shape[0]
        cfg = peft.LoraConfig(r=r, lora_alpha=s * r, target_modules=["0"], lora_dropout=p)
        layer = peft.get_peft_model(seq, cfg, autocast_adapter_dtype=False).base_model.model[0]
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            a.data, b.data = A.detach().clone(), B.detach().clone()  # the model dtype, as the peft row
        layer.train()
        prov = Provider(name, lambda: layer(x), [x, a, b], [base.weight, a, b])
    else:
        w = base.weight
        prov = Provider(name, lambda: fastlora.lora_linear(x, w, A, B, s, dropout_p=p), [x, A, B], [w, A, B])
    prov.W_ref = fastlora.quantized_weight(base).dequantize(inp.W.dtype)
    return prov


def make_provider(name, inp):
    x, W, A, B, s, p = inp.x, inp.W, inp.A, inp.B, inp.scaling, inp.p
    lora_leaves = [x, A, B]

    def eager():
        return F.linear(x, W) + F.linear(F.linear(F.dropout(x, p, training=True), A), B) * s

    if name == "base":
        return Provider(name, lambda: F.linear(x, W), [x], [W])
    if name == "eager":
        return Provider(name, eager, lora_leaves, [W, A, B])
    if name == "compile":
        return Provider(name, torch.compile(eager, dynamic=False), lora_leaves, [W, A, B])
    if name == "addmm":
        def addmm():
            y = F.linear(x, W)
            return y.addmm_(F.linear(F.dropout(x, p, training=True), A), B.t(), alpha=s)
        return Provider(name, addmm, lora_leaves, [W, A, B])
    if name in ("peft", "peft-fp32"):
        fp32 = name == "peft-fp32"
        layer = _peft_layer(inp, fp32)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        ctx = (lambda: torch.autocast(x.device.type, dtype=x.dtype)) if fp32 and x.dtype != torch.float32 \
            else contextlib.nullcontext
        return Provider(name, lambda: layer(x), [x, a, b], [W, a, b], ctx)
    if name in ("fastlora", "fastlora-fused", "fastlora-hybrid"):
        path = name.partition("-")[2] or "auto"
        # auto: no context (setting os.environ per call would add microseconds to decode rows), so
        # the caller's environment must not force a path
        if path == "auto" and os.environ.get("FASTLORA_PATH", "auto").strip().lower() not in ("", "auto"):
            raise ValueError(f"provider fastlora: FASTLORA_PATH={os.environ['FASTLORA_PATH']!r} is set, so this row "
                             "would not measure the automatic choice; unset it (fastlora-fused / -hybrid force a path)")
        return Provider(name, lambda: fastlora.lora_linear(x, W, A, B, s, dropout_p=p), lora_leaves, [W, A, B],
                        (lambda: _path_env(path)) if path != "auto" else contextlib.nullcontext)
    if name == "fastlora-fp32":
        a32 = A.detach().float().requires_grad_()
        b32 = B.detach().float().requires_grad_()
        return Provider(name, lambda: fastlora.lora_linear(x, W, a32, b32, s, dropout_p=p), [x, a32, b32],
                        [W, a32, b32])
    if name in ("qlora-base", "peft-qlora", "fastlora-qlora"):
        return _qlora_provider(name, inp)
    if name == "peft-dora":
        layer = _peft_layer(inp, False, use_dora=True)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        m = layer.lora_magnitude_vector["default"].weight
        return Provider(name, lambda: layer(x), [x, a, b, m], [W, a, b, m])
    if name == "fastlora-dora":
        m = inp.magnitude
        if os.environ.get("FASTLORA_PATH", "auto").strip().lower() not in ("", "auto"):
            raise ValueError(f"provider fastlora-dora: FASTLORA_PATH={os.environ['FASTLORA_PATH']!r} is set, so "
                             "this row would not measure the automatic choice; unset it")
        return Provider(name, lambda: fastlora.lora_linear(x, W, A, B, s, dropout_p=p, magnitude=m),
                        [x, A, B, m], [W, A, B, m])
    raise ValueError(f"provider: expected one of {PROVIDERS}, got {name!r}")
