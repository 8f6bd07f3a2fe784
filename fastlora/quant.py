"""QLoRA and LLM.int8() LoRA: a frozen bitsandbytes-quantized base weight under the fused path.

Math (Dettmers et al. 2023, QLoRA; 2022, LLM.int8(); PEFT ``peft/tuners/lora/bnb.py``)::

    W   = dequant(W_q)                 [N, K] in the compute dtype T (kernels/dequant.py: NF4 / FP4
                                       codes × blockwise absmax, double-quantized absmax decoded
                                       in the kernel; or int8 × row scale / 127)
    y   = x·Wᵀ + b + s·(m ⊙ x)·Aᵀ·Bᵀ   the LoRA math of fastlora.lora_linear, unchanged
    dx  = dy·W + m ⊙ (s·dy·B)·A        W dequantized again in the backward
    dA, dB, db as for LoRA; W_q gets no gradient (frozen, integer storage)

This is the math of PEFT's ``lora.bnb.Linear4bit`` / ``Linear8bitLt`` with the base output
computed from the dequantized W (what bitsandbytes' 4-bit matmul does: ``gemm_4bit`` dequantizes
to T and runs one GEMM; its LLM.int8() matmul on a GPU quantizes x to int8 too, which fastlora
does not: the base output then differs by int8 rounding of x, see the README).

Plan: W is dequantized into a transient ``[N, K]`` buffer of T (one bandwidth-bound launch,
bit-identical to bitsandbytes' dequantization), which feeds the fused or the hybrid LoRA path
chosen by measurement (fastlora.dispatch), and is freed when the call returns. The backward
dequantizes again. Saved for backward: what LoRA saves (x itself, S, the seed) plus references to
the quantized storage; nothing of size N×K. Peak memory: one transient W in T, as PEFT +
bitsandbytes (whose forward and backward each dequantize W too).

Supported: ``bitsandbytes.nn.Params4bit`` (NF4 / FP4, any blocksize, ``compress_statistics`` on
or off, compute dtype fp16 / bf16 / fp32) and ``Int8Params`` with its row scales (a
``Linear8bitLt`` with ``has_fp16_weights=False``); a :class:`QuantizedWeight` describes either.
bitsandbytes is an optional dependency (``pip install fastlora[qlora]``).
"""
import functools

import torch

from ._checks import FLOAT_DTYPES, check_inputs
from .backend import forced_backend, kernels, select_backend

_QUANT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _bnb():
    """The bitsandbytes module, or an ImportError that names the extra to install."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError("fastlora: quantized base weights (QLoRA, LLM.int8()) need bitsandbytes: "
                          "pip install 'fastlora[qlora]' (or pip install bitsandbytes)") from e
    return bitsandbytes


def _bnb_loaded():
    """bitsandbytes' nn module if bitsandbytes was imported by someone (no import here: a
    quantized weight cannot exist without it), else None."""
    import sys
    mod = sys.modules.get("bitsandbytes")
    return None if mod is None else mod.nn


@functools.lru_cache(maxsize=None)
def _code_table(quant_type, device):
    """The 16 fp32 values of the NF4 / FP4 codes as bitsandbytes' kernels decode them (FP4's code
    8, sign bit and zero magnitude, is -0.0 there; its Python table holds +0.0)."""
    from bitsandbytes.functional import get_4bit_type
    code = get_4bit_type(quant_type, device=device).to(torch.float32).clone()
    if quant_type == "fp4":
        code[8] = -0.0
    return code


class QuantizedWeight:
    """A frozen quantized base weight ``W [N, K]`` (``nn.Linear`` layout) as fastlora reads it.

    Build one with :func:`quantized_weight` from a bitsandbytes parameter or layer; pass it (or the
    ``Params4bit`` itself) as ``weight`` to :func:`fastlora.lora_linear`.

    Attributes:
        kind: ``"nf4"``, ``"fp4"`` or ``"int8"``.
        shape: ``(N, K)``. device: of the storage.
        dtype: the dtype bitsandbytes dequantizes to by default (the 4-bit weight's original dtype;
            for int8 None: the input's dtype).
        tensors: the storage, by name: 4-bit ``data`` (uint8, ``ceil(N·K/2)``) and ``absmax``
            (fp32), or with double quantization ``qabsmax`` (uint8), ``absmax2``, ``code2``,
            ``offset`` (fp32); int8 ``CB [N, K]`` int8 and ``SCB [N]`` fp32.
        blocksize, blocksize2: elements per absmax block, blocks per second-level block.
    """
    __slots__ = ("kind", "shape", "device", "dtype", "tensors", "blocksize", "blocksize2", "source")

    def __init__(self, kind, shape, tensors, dtype=None, blocksize=0, blocksize2=0, source=None):
        self.kind, self.shape, self.tensors, self.dtype = kind, tuple(int(s) for s in shape), tensors, dtype
        self.blocksize, self.blocksize2, self.source = blocksize, blocksize2, source
        self.device = next(iter(tensors.values())).device

    @property
    def nested(self):
        return "qabsmax" in self.tensors

    def dequantize(self, dtype=None):
        """``W [N, K]`` in ``dtype`` (default :attr:`dtype`; fp16 / bf16 / fp32), bit-identical to
        bitsandbytes' own dequantization (``dequantize_4bit`` to that dtype / the one fp32 product
        of ``int8_vectorwise_dequant`` rounded to it). Triton kernel where fastlora's kernels run
        (CUDA, or the interpreter), bitsandbytes' own op otherwise (its CPU kernel)."""
        dtype = dtype or self.dtype or torch.float32
        if dtype not in _QUANT_DTYPES:
            raise TypeError(f"dtype: a quantized weight dequantizes to float16, bfloat16 or float32, got {dtype}")
        t = self.tensors
        if (forced_backend() or select_backend(self.device)[0]) != "torch":
            dq = kernels().dequant
            if self.kind == "int8":
                return dq.dequantize_int8(t["CB"], t["SCB"], dtype)
            if self.nested:
                return dq.dequantize_4bit(t["data"], _code_table(self.kind, self.device), None, self.shape,
                                          self.blocksize, dtype, qabsmax=t["qabsmax"], absmax2=t["absmax2"],
                                          code2=t["code2"], offset=t["offset"], blocksize2=self.blocksize2)
            return dq.dequantize_4bit(t["data"], _code_table(self.kind, self.device), t["absmax"], self.shape,
                                      self.blocksize, dtype)
        ops = torch.ops.bitsandbytes
        if self.kind == "int8":
            return ops.int8_vectorwise_dequant.default(t["CB"], t["SCB"]).to(dtype)
        absmax = t.get("absmax")
        if self.nested:  # as bitsandbytes' gemm_4bit decodes it
            absmax = ops.dequantize_blockwise.default(t["qabsmax"], t["absmax2"], t["code2"], self.blocksize2,
                                                      torch.float32) + t["offset"]
        if self.device.type == "cpu" and self.shape[1] % self.blocksize:
            # bitsandbytes 0.50's CPU kernel restarts the quant blocks at every row when K is a
            # multiple of 16 but not of the blocksize (measured: 64 x 96, blocksize 64, max error
            # 2.0 on values up to 3.4); its quantizer, its CUDA kernel and its generic torch op
            # all use blocks of consecutive row-major elements. Decode those here.
            return _dequantize_4bit_flat(t["data"], _code_table(self.kind, self.device), absmax, self.shape,
                                         self.blocksize, dtype)
        return ops.dequantize_4bit.default(t["data"], absmax, self.blocksize, self.kind, self.shape, dtype)

    def __repr__(self):
        extra = f", blocksize={self.blocksize}, nested={self.nested}" if self.kind != "int8" else ""
        return f"QuantizedWeight({self.kind}, shape={self.shape}{extra}, device={self.device})"


def _dequantize_4bit_flat(q, code, absmax, shape, blocksize, dtype):
    """``W [N, K]`` from packed 4-bit codes in plain torch ops (the math of kernels/dequant.py:
    element e = code[nibble e] · absmax[e // blocksize], one fp32 product rounded to ``dtype``)."""
    n = shape[0] * shape[1]
    q = q.reshape(-1).view(torch.uint8)
    nib = torch.stack((q >> 4, q & 15), dim=1).reshape(-1)[:n].long()
    scale = absmax.to(torch.float32).repeat_interleave(blocksize)[:n]
    return (code[nib] * scale).reshape(shape).to(dtype)


def is_quantized(t):
    """Whether ``t`` is a quantized weight fastlora reads: a :class:`QuantizedWeight`, or a
    bitsandbytes ``Params4bit`` / ``Int8Params`` (checked without importing bitsandbytes)."""
    if isinstance(t, QuantizedWeight):
        return True
    bnn = _bnb_loaded()
    return bnn is not None and isinstance(t, (bnn.Params4bit, bnn.Int8Params))


def quantized_weight(source, *, module=None):
    """The :class:`QuantizedWeight` of a bitsandbytes weight.

    Args:
        source: a ``bitsandbytes.nn.Params4bit`` (with its ``quant_state``), an ``Int8Params``, a
            ``bnb.nn.Linear4bit`` / ``Linear8bitLt`` layer, or a QuantizedWeight (returned as is).
        module: the layer owning an ``Int8Params`` (bitsandbytes moves its row scales ``SCB``
            from the weight to ``layer.state`` at the first forward).

    Raises:
        ImportError: bitsandbytes is not installed.
        TypeError: ``source`` is none of these.
        ValueError: the weight is not quantized yet (still on the meta device or not moved to a
            device), has no row scales, has a quantization state fastlora does not read
            (bitsandbytes' AVX512-BF16 CPU inference packing, a 1-D or 3-D shape, a blocksize or
            dtype bitsandbytes itself does not produce), or its storage is inconsistent.
    """
    if isinstance(source, QuantizedWeight):
        return source
    bnb = _bnb()
    if isinstance(source, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
        module, source = source, source.weight
    if isinstance(source, bnb.nn.Params4bit):
        return _from_params4bit(source, module)
    if isinstance(source, bnb.nn.Int8Params):
        return _from_int8(source, module)
    raise TypeError(f"weight: expected a bitsandbytes Params4bit / Int8Params (or their Linear4bit / Linear8bitLt "
                    f"layer, or a fastlora QuantizedWeight), got {type(source).__name__}")


def _from_params4bit(p, module):
    qs = p.quant_state
    if qs is None and module is not None:
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
        fix_4bit_weight_quant_state_from_module(module)
        qs = p.quant_state
    if qs is None or p.device.type == "meta":
        raise ValueError("weight: a bitsandbytes Params4bit that is not quantized yet (no quant_state; it is "
                         "quantized when moved to a device, e.g. layer.to('cuda'))")
    if getattr(qs, "packing_format_for_cpu", False):
        raise ValueError("weight: this Params4bit is in bitsandbytes' AVX512-BF16 CPU inference packing (done by "
                         "Linear4bit.forward in eval mode without grad), which fastlora does not read")
    if qs.quant_type not in ("nf4", "fp4") or qs.blocksize not in _BLOCKSIZES or len(qs.shape) != 2:
        raise ValueError(f"weight: unsupported 4-bit state (quant_type {qs.quant_type!r}, blocksize {qs.blocksize}, "
                         f"shape {tuple(qs.shape)}); expected nf4 / fp4, a blocksize in {_BLOCKSIZES}, a 2-D shape")
    N, K = qs.shape
    data = p.data if p.data.dtype == torch.uint8 else p.data.view(torch.uint8)
    if data.numel() != (N * K + 1) // 2 or not data.is_contiguous():
        raise ValueError(f"weight: packed storage of {data.numel()} bytes for shape {(N, K)} (expected "
                         f"{(N * K + 1) // 2}, contiguous)")
    tensors = {"data": data.reshape(-1)}
    blocksize2 = 0
    if qs.nested:
        s2 = qs.state2
        if s2.blocksize not in _BLOCKSIZES:
            raise ValueError(f"weight: double-quantized absmax with blocksize {s2.blocksize}, expected one of "
                             f"{_BLOCKSIZES}")
        offset = qs.offset if isinstance(qs.offset, torch.Tensor) else torch.tensor(float(qs.offset))
        tensors.update(qabsmax=qs.absmax.reshape(-1), absmax2=s2.absmax.reshape(-1).float(),
                       code2=s2.code.to(device=data.device, dtype=torch.float32),
                       offset=offset.to(device=data.device, dtype=torch.float32).reshape(1))
        blocksize2 = s2.blocksize
    else:
        tensors["absmax"] = qs.absmax.reshape(-1).float()
    return QuantizedWeight(qs.quant_type, (N, K), tensors, dtype=qs.dtype, blocksize=qs.blocksize,
                           blocksize2=blocksize2, source=p)


def _from_int8(p, module):
    if p.dtype != torch.int8 or p.device.type == "meta":
        raise ValueError(f"weight: an Int8Params that is not quantized yet (dtype {p.dtype}, device {p.device}; "
                         "it is quantized when moved to a device with has_fp16_weights=False)")
    scb = getattr(p, "SCB", None)
    if scb is None and module is not None:
        scb = getattr(module.state, "SCB", None)
    if scb is None:
        raise ValueError("weight: an Int8Params without its row scales SCB (bitsandbytes keeps them on the "
                         "Linear8bitLt layer after its first forward: pass the layer, or module=layer)")
    if p.dim() != 2 or scb.shape != (p.shape[0],):
        raise ValueError(f"weight: int8 weight {tuple(p.shape)} with row scales {tuple(scb.shape)}; expected [N, K] "
                         "and [N]")
    return QuantizedWeight("int8", tuple(p.shape), {"CB": p.data, "SCB": scb.float()}, source=p)


def check_quantized_call(input, qw, lora_A, lora_B, bias, same_dtype=True):
    """:func:`fastlora._checks.check_inputs` for a quantized ``weight``; returns ``(M, N, K, r)``.
    The compute dtype (input's) must be one the weight dequantizes to."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
    if input.dtype in FLOAT_DTYPES and input.dtype not in _QUANT_DTYPES:
        raise TypeError(f"input: a quantized base weight computes in float16, bfloat16 or float32, got {input.dtype} "
                        "(bitsandbytes dequantizes to those only)")
    if qw.device != input.device:
        raise ValueError(f"weight: expected a quantized weight on input's device {input.device}, got {qw.device}")
    stand_in = torch.empty((), dtype=input.dtype, device=input.device).expand(qw.shape)  # no storage
    return check_inputs(input, stand_in, lora_A, lora_B, bias, same_dtype=same_dtype)


class QLoRALinearFunction(torch.autograd.Function):
    """``y = input·dequant(W_q)ᵀ + bias + scaling·(dropout(input)·lora_Aᵀ)·lora_Bᵀ``: the Function
    under :func:`fastlora.lora_linear` for a quantized weight (see the module doc). ``apply(input,
    lora_A, lora_B, bias, seed, call, qweight)``, with ``call`` fastlora.function's validated
    call constants. Not twice differentiable."""

    @staticmethod
    def forward(ctx, input, lora_A, lora_B, bias, seed, c, qw):
        from .function import _forward, _save
        weight = qw.dequantize(input.dtype)
        y, S, seed_t, mask = _forward(c, input, weight, lora_A, lora_B, bias, seed, empty_seed=False)
        del weight  # transient: the backward dequantizes again
        ctx.set_materialize_grads(False)
        _save(ctx, c, input, None, lora_A, lora_B, bias, S, seed_t, mask)
        ctx.qw, ctx.dtype = qw, input.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        from .function import grads
        if dy is None:
            return (None,) * 7
        input, _, lora_A, lora_B, S, mask, *rest = ctx.saved_tensors
        seed_t = rest.pop(0) if ctx.has_seed else None
        scale = rest.pop(0) if ctx.has_scale else None
        need_dx, need_dA, need_dB, need_db = (ctx.needs_input_grad[i] for i in (0, 1, 2, 3))
        weight = ctx.qw.dequantize(ctx.dtype) if need_dx else \
            torch.empty((), dtype=ctx.dtype, device=input.device).expand(ctx.qw.shape)  # dx alone reads W
        dx, _, dA, dB, db = grads(ctx, dy, input, weight, lora_A, lora_B, S, mask, seed_t, scale, need_dx, False,
                                  need_dA, need_dB, need_db)
        return dx, dA, dB, db, None, None, None


def qlora_linear(input, qw, lora_A, lora_B, scaling, bias, p, seed, lora_dtype, shapes, needs_grad):
    """The quantized-weight branch of :func:`fastlora.lora_linear` (arguments validated there)."""
    from .function import _Call, forward_no_grad
    if not needs_grad:
        weight = qw.dequantize(input.dtype)
        return forward_no_grad(input, weight, lora_A, lora_B, scaling, bias, p, seed, lora_dtype,
                               shapes if lora_dtype is None else None)
    c = _Call(input, None, lora_A, lora_B, scaling, bias, p, lora_dtype, shapes, resolve=True)
    return QLoRALinearFunction.apply(input, lora_A, lora_B, bias, seed, c, qw)
