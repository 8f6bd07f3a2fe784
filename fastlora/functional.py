"""``lora_linear``: the functional entry point (validation, autocast, dropout seed)."""
import contextlib

import torch

from ._checks import AUTOCAST_ELIGIBLE, autocast_enabled, check_inputs, check_scaling
from .dropout import check_dropout_p, check_seed
from .function import _apply as apply, forward_no_grad

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _needs_grad(*tensors):
    """Whether autograd must record this call (under torch.compile always take the recorded path:
    one graph whatever the grad mode)."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _check_call(input, scaling, dropout_p, training, seed):
    """Validate the non-tensor arguments of a call; returns the dropout probability in effect."""
    check_scaling(scaling, input.device)
    p = check_dropout_p(dropout_p)
    if seed is not None and not isinstance(seed, torch.Tensor):
        check_seed(seed)
    return p if training else 0.0


def _autocast_cast(t, dtype):
    """``t`` in the autocast dtype if autocast would cast it (None stays None)."""
    return t.to(dtype) if t is not None and t.dtype in AUTOCAST_ELIGIBLE else t


def lora_linear(input, weight, lora_A, lora_B, scaling=1.0, bias=None, *, dropout_p=0.0, training=True,
                seed=None, magnitude=None):
    """Fused LoRA linear: ``input·weightᵀ + bias + scaling·(dropout(input)·lora_Aᵀ)·lora_Bᵀ``.

    The math and order are PEFT's LoRA ``Linear.forward`` (``peft/tuners/lora/layer.py``): the
    base output, plus ``lora_B(lora_A(dropout(x))) * scaling``; dropout (inverted: kept values
    scaled by 1/(1-p)) touches the LoRA branch only. Rounding: base and LoRA terms share one fp32
    accumulator and the output is rounded once (PEFT rounds the base output, then the sum); the
    rank-r intermediates ``S = x̃·Aᵀ`` and ``dS`` are rounded to the compute dtype for the
    second matmul, as PEFT does under autocast. In fp16 that means values of ``scaling·S`` beyond
    ±65504 overflow (bf16 has fp32's range); PEFT with fp32 adapters outside autocast computes
    its LoRA branch in fp32 and would not.

    Args:
        input: ``[..., K]`` float16 / bfloat16 / float32 / float64 (any strides; leading dims may
            be empty, M = 0 gives an empty output).
        weight: ``[N, K]`` (``nn.Linear.weight`` layout), input's dtype (outside autocast); or a
            frozen quantized base weight (QLoRA / LLM.int8(), fastlora/quant.py): a bitsandbytes
            ``Params4bit`` (NF4 / FP4, double quantization or not) or a
            :class:`fastlora.quant.QuantizedWeight` (e.g. ``quantized_weight(linear8bitlt)``),
            dequantized to input's dtype (fp16 / bf16 / fp32), never differentiated.
        lora_A: ``[r, K]`` (PEFT's ``lora_A.weight``), any float dtype.
        lora_B: ``[N, r]`` (PEFT's ``lora_B.weight``), any float dtype. fp32 adapters on an fp16 /
            bf16 model (PEFT's default) are fine: the LoRA matmuls run in input's dtype with fp32
            accumulation, and each gradient comes back in its tensor's own dtype.
        scaling: finite float ``s`` (PEFT: ``lora_alpha / r``; rsLoRA: ``lora_alpha / sqrt(r)``),
            or a one-element float tensor on input's device holding it (what
            :class:`fastlora.LoRALinear` passes: the kernels read it from memory, so a new value
            needs no recompilation under ``torch.compile``). Applied in fp32 (fp64 for fp64).
        bias: ``[N]`` in input's dtype, or None.
        dropout_p: LoRA dropout probability in [0, 1); active only if ``training``.
        training: apply dropout (like ``nn.Module.training``).
        seed: None draws a 64-bit seed from torch's generator of input's device (so
            ``torch.manual_seed`` reproduces a run and activation-checkpoint recomputation sees the
            same mask); an int in [-2⁶³, 2⁶⁴) (or a one-element int64 tensor on input's device)
            fixes the mask, which is ``fastlora.dropout_mask(input.shape, dropout_p, seed)``.
        magnitude: None (LoRA), or DoRA's magnitude vector ``[N]`` (PEFT's
            ``lora_magnitude_vector``; any float dtype, on input's device): then the call is DoRA
            (Liu et al., ICML 2024; PEFT ``use_dora=True``, fastlora/dora.py):
            ``y = g ⊙ (input·weightᵀ + scaling·(dropout(input)·lora_Aᵀ)·lora_Bᵀ) + bias`` with
            ``g = magnitude / ‖weight + scaling·lora_B·lora_A‖₂`` per output row, the norm detached
            (no gradient flows through it, the paper's §4.3 and PEFT), computed in fp32 (fp64 for
            fp64). Gradients also for magnitude (in its dtype). With a quantized weight (QLoRA +
            DoRA) the norm and the GEMM read W dequantized to the compute dtype, as PEFT's
            ``lora.bnb`` DoRA layers do.

    Returns:
        ``[..., N]`` tensor in input's dtype (the autocast dtype under ``torch.autocast``).

    Raises:
        TypeError: non-tensor or non-floating arguments, a non-number scaling or dropout_p, a
            non-int seed, weight/bias dtype different from input's outside autocast.
        ValueError: shapes that disagree on K, N or r, tensors on different devices, dropout_p
            outside [0, 1), a non-finite scaling.

    Under ``torch.autocast`` it behaves as ``nn.Linear`` + PEFT: input, weight and bias (when
    float32/16) are cast to the autocast dtype, and the LoRA matmuls run in that dtype too.

    Under ``torch.jit.trace`` the call records PEFT's forward in plain torch ops (base, plus
    ``lora_B(lora_A(x))·scaling``; DoRA's ``g`` with the norm detached), which TorchScript can
    replay; dropout in training mode and quantized weights raise (``RuntimeError``): trace in
    eval mode, or use ``torch.compile`` / ``torch.export``, which run fastlora's own operators.
    """
    if torch.jit.is_tracing():
        return _traced(input, weight, lora_A, lora_B, scaling, bias, dropout_p, training, seed, magnitude)
    device_type = input.device.type if isinstance(input, torch.Tensor) else "cpu"
    autocast = autocast_enabled(device_type)
    if magnitude is not None:
        return _dora(input, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, training, seed, autocast,
                     device_type)
    if type(weight) not in _PLAIN:
        from . import quant
        if quant.is_quantized(weight):
            return _quantized(input, quant.quantized_weight(weight), lora_A, lora_B, scaling, bias, dropout_p,
                              training, seed, autocast, device_type)
    shapes = check_inputs(input, weight, lora_A, lora_B, bias, same_dtype=not autocast)
    p = _check_call(input, scaling, dropout_p, training, seed)
    if not autocast:
        if not _needs_grad(input, weight, lora_A, lora_B, bias, scaling):
            return forward_no_grad(input, weight, lora_A, lora_B, scaling, bias, p, seed, None, shapes)
        return apply(input, weight, lora_A, lora_B, scaling, bias, p, seed, None, shapes)
    dtype = torch.get_autocast_dtype(device_type)
    input, weight, bias = (_autocast_cast(t, dtype) for t in (input, weight, bias))
    with torch.autocast(device_type, enabled=False):
        if not _needs_grad(input, weight, lora_A, lora_B, bias, scaling):
            return forward_no_grad(input, weight, lora_A, lora_B, scaling, bias, p, seed, dtype)
        return apply(input, weight, lora_A, lora_B, scaling, bias, p, seed, dtype)


def _quantized(input, qw, lora_A, lora_B, scaling, bias, dropout_p, training, seed, autocast, device_type):
    """:func:`lora_linear` with a quantized ``weight`` (fastlora/quant.py): the same validation,
    autocast and dropout rules, W dequantized to the compute dtype."""
    from .quant import check_quantized_call, qlora_linear
    shapes = check_quantized_call(input, qw, lora_A, lora_B, bias, same_dtype=not autocast)
    p = _check_call(input, scaling, dropout_p, training, seed)
    lora_dtype = None
    if autocast:
        lora_dtype, shapes = torch.get_autocast_dtype(device_type), None
        input, bias = _autocast_cast(input, lora_dtype), _autocast_cast(bias, lora_dtype)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        return qlora_linear(input, qw, lora_A, lora_B, scaling, bias, p, seed, lora_dtype, shapes,
                            _needs_grad(input, lora_A, lora_B, bias, scaling))


def _dora(input, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, training, seed, autocast, device_type):
    """:func:`lora_linear` with a ``magnitude``: DoRA (fastlora/dora.py), the same validation,
    autocast and dropout rules."""
    from . import dora
    if type(weight) not in _PLAIN:
        from . import quant
        if quant.is_quantized(weight):
            return _quantized_dora(input, quant.quantized_weight(weight), lora_A, lora_B, magnitude, scaling, bias,
                                   dropout_p, training, seed, autocast, device_type)
    dora.check_dora_call(input, weight, lora_A, lora_B, magnitude, bias, same_dtype=not autocast)
    p = _check_call(input, scaling, dropout_p, training, seed)
    lora_dtype = None
    if autocast:
        lora_dtype = torch.get_autocast_dtype(device_type)
        input, weight, bias = (_autocast_cast(t, lora_dtype) for t in (input, weight, bias))
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        if not _needs_grad(input, weight, lora_A, lora_B, magnitude, bias, scaling):
            return dora.forward_no_grad(input, weight, lora_A, lora_B, magnitude, scaling, bias, p, seed, lora_dtype)
        return dora.apply(input, weight, lora_A, lora_B, magnitude, scaling, bias, p, seed, lora_dtype)


def _quantized_dora(input, qw, lora_A, lora_B, magnitude, scaling, bias, dropout_p, training, seed, autocast,
                    device_type):
    """DoRA with a quantized ``weight`` (QLoRA + DoRA): the validation and autocast of
    :func:`_quantized`, the magnitude's check, then fastlora.dora's quantized Function."""
    from . import dora
    from .quant import check_quantized_call
    shapes = check_quantized_call(input, qw, lora_A, lora_B, bias, same_dtype=not autocast)
    dora.check_magnitude(magnitude, shapes[1], input.device)
    p = _check_call(input, scaling, dropout_p, training, seed)
    lora_dtype = None
    if autocast:
        lora_dtype = torch.get_autocast_dtype(device_type)
        input, bias = _autocast_cast(input, lora_dtype), _autocast_cast(bias, lora_dtype)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        return dora.qdora_linear(input, qw, lora_A, lora_B, magnitude, scaling, bias, p, seed, lora_dtype,
                                 _needs_grad(input, lora_A, lora_B, magnitude, bias, scaling))


_TRACE_REMEDY = ("trace the model in eval mode (or with lora_dropout=0), or use torch.compile / torch.export, which "
                 "record fastlora's own operators")


@contextlib.contextmanager
def _tracer_paused():
    """Argument checks outside the TorchScript trace (as torch.jit's own helpers pause it), so
    their size comparisons neither enter the graph nor warn."""
    get, set_ = getattr(torch._C, "_get_tracing_state", None), getattr(torch._C, "_set_tracing_state", None)
    state = get() if get is not None and set_ is not None else None
    if state is None:
        yield
        return
    set_(None)
    try:
        yield
    finally:
        set_(state)


def _traced(input, weight, lora_A, lora_B, scaling, bias, dropout_p, training, seed, magnitude):
    """:func:`lora_linear` while ``torch.jit.trace`` records: PEFT's forward in plain torch ops
    (``peft/tuners/lora/layer.py``: base output, then ``lora_B(lora_A(x.to(lora dtype)))·scaling``
    added in the base's dtype; DoRA as ``peft/tuners/lora/dora.py`` with the norm detached), so
    the traced graph replays on new inputs. The autograd Function and fastlora's operators are
    not traceable by TorchScript (the tracer fails inside them with ``unordered_map::at``), and a
    dropout mask drawn from a per-call seed cannot be recorded."""
    if type(weight) not in _PLAIN:
        from . import quant
        if quant.is_quantized(weight):
            raise RuntimeError(f"fastlora.lora_linear: torch.jit.trace of a quantized base weight is not supported; "
                               "use torch.compile / torch.export")
    with _tracer_paused():  # the checks read sizes as Python ints: nothing of the graph
        if magnitude is None:
            check_inputs(input, weight, lora_A, lora_B, bias, same_dtype=not autocast_enabled(input.device.type))
        else:
            from .dora import check_dora_call
            check_dora_call(input, weight, lora_A, lora_B, magnitude, bias,
                            same_dtype=not autocast_enabled(input.device.type))
        p = _check_call(input, scaling, dropout_p, training, seed)
    if p > 0:
        raise RuntimeError(f"fastlora.lora_linear: torch.jit.trace cannot record fastlora's LoRA dropout "
                           f"(dropout_p={p} in training mode: its mask comes from a seed drawn at each call); "
                           f"{_TRACE_REMEDY}")
    F = torch.nn.functional
    lora = F.linear(F.linear(input.to(lora_A.dtype), lora_A), lora_B) * scaling
    if magnitude is None:
        base = F.linear(input, weight, bias)
        return base + lora.to(base.dtype)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(acc) + (lora_B.to(acc) @ lora_A.to(acc)) * scaling
    g = magnitude.to(acc) / torch.linalg.vector_norm(w, dim=1).detach()
    base = F.linear(input, weight)
    y = (g * (base.to(acc) + lora.to(acc))).to(base.dtype)
    return y if bias is None else y + bias
