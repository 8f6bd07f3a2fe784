"""``LoRALinear``: a drop-in ``nn.Linear`` with a fused LoRA branch (PEFT's semantics).

State-dict keys ``weight`` ``[out, in]`` (``[in, out]`` for a GPT-2 ``Conv1D`` base), ``bias``
``[out]``, ``lora_A.weight`` ``[r, in]``, ``lora_B.weight`` ``[out, r]`` (PEFT's shapes).
"""
import functools
import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .backend import kernel_backend
from .dropout import check_dropout_p
from .functional import lora_linear
from .reference import acc_dtype_of

_HALF = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # without transformers there is no Conv1D to meet
        return None
    return Conv1D


def is_conv1d(module):
    """True for transformers' GPT-2 style ``Conv1D`` (weight stored ``[in, out]``)."""
    cls = _conv1d_class()
    return cls is not None and isinstance(module, cls)


def is_quantized_linear(module):
    """A bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (no import of bitsandbytes here: such a
    module exists only if it was imported)."""
    import sys
    if "bitsandbytes" not in sys.modules:
        return False
    bnn = sys.modules["bitsandbytes"].nn
    return isinstance(module, (bnn.Linear4bit, bnn.Linear8bitLt))


def adapter_dtype_for(dtype):
    """PEFT's default (``autocast_adapter_dtype=True``): fp32 adapters on an fp16/bf16 base."""
    return torch.float32 if dtype in _HALF else dtype


def lora_scaling(r, lora_alpha, use_rslora):
    """``lora_alpha / r`` (LoRA, Hu et al. 2021), or ``lora_alpha / sqrt(r)`` (rsLoRA, Kalajdzievski 2023)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _check_hparams(r, lora_alpha, lora_dropout, use_rslora=False, use_dora=False):
    """Validate LoRA hyper-parameters; returns ``(r, lora_alpha, lora_dropout)``. Raises TypeError
    for a wrong type, ValueError for a value out of range, naming the argument."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"r: expected an int >= 1, got {type(r).__name__} {r!r}")
    if r < 1:
        raise ValueError(f"r: expected an int >= 1, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real):
        raise TypeError(f"lora_alpha: expected a finite number, got {type(lora_alpha).__name__} {lora_alpha!r}")
    if not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha: expected a finite number, got {lora_alpha!r}")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora: expected a bool, got {type(use_rslora).__name__} {use_rslora!r}")
    if not isinstance(use_dora, bool):
        raise TypeError(f"use_dora: expected a bool, got {type(use_dora).__name__} {use_dora!r}")
    return int(r), lora_alpha, check_dropout_p(lora_dropout, "lora_dropout")


_PLAIN = (torch.Tensor, nn.Parameter)  # not a DTensor (FSDP2), nor an empty ZeRO-3 partition


class LoRALinear(nn.Module):
    """``y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ`` with frozen ``W, b`` and trainable ``A, B``.

    A drop-in for ``nn.Linear(in_features, out_features, bias)`` running
    :func:`fastlora.lora_linear` (two fused kernels forward, three backward on CUDA; the torch
    path on CPU).

    Args:
        in_features, out_features: K and N.
        bias: whether the (frozen) base layer has a bias.
        r: LoRA rank (≥ 1). lora_alpha: LoRA alpha.
        lora_dropout: dropout probability on the LoRA input, in [0, 1), active in training mode.
        use_rslora: ``scaling = lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``.
        use_dora: DoRA (Liu et al., ICML 2024; PEFT ``use_dora=True``): a trainable magnitude
            vector ``lora_magnitude_vector`` ``[out]`` (adapter dtype), initialised to the row norms
            of the base weight, scales each output:
            ``y = m/‖W + scaling·B·A‖ ⊙ (x·Wᵀ + scaling·(dropout(x)·Aᵀ)·Bᵀ) + b`` (fastlora/dora.py).
        device, dtype: of the base weight and bias. The adapters are fp32 when dtype is fp16 /
            bf16 (PEFT's default), else dtype.

    Initialisation is PEFT's default: base as ``nn.Linear``, ``lora_A`` kaiming-uniform (a=√5),
    ``lora_B`` zeros, so a fresh layer computes exactly its base.

    Raises:
        TypeError: a hyper-parameter of the wrong type (r not an int, use_rslora not a bool, ...).
        ValueError: r < 1, non-finite lora_alpha, lora_dropout outside [0, 1).

    ``lora_alpha``, ``use_rslora`` and ``lora_dropout`` can be changed on a layer (validated);
    ``r`` is fixed (:func:`fastlora.load_adapter` resizes). Changing what the merged delta depends
    on while merged raises: :meth:`unmerge` first.
    """

    def __init__(self, in_features, out_features, bias=True, *, r=8, lora_alpha=8, lora_dropout=0.0,
                 use_rslora=False, use_dora=False, device=None, dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        _check_hparams(r, lora_alpha, lora_dropout, use_rslora, use_dora)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.fan_in_fan_out = False
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora, use_dora, reset=False)
        self.reset_parameters()  # W and b, then the adapters (DoRA's magnitude from the new W)

    def _init_lora(self, r, lora_alpha, lora_dropout, use_rslora, use_dora=False, reset=True):
        self._r, self._lora_alpha, self._lora_dropout = _check_hparams(r, lora_alpha, lora_dropout, use_rslora,
                                                                       use_dora)
        self._use_rslora = use_rslora
        self._use_dora = use_dora
        self._merge_norm = None
        self._merged = False
        self._merge_record = None
        device, dtype = self.weight.device, self._base_dtype()
        # The scaling as a device scalar the kernels read (not in the state dict): a new alpha
        # updates it in place, so compiled graphs and CUDA graphs need no recompilation.
        self.register_buffer("_scale", torch.tensor(self.scaling, device=device, dtype=acc_dtype_of(dtype)),
                             persistent=False)
        in_features, out_features = self.in_features, self.out_features
        factory = {"device": device, "dtype": adapter_dtype_for(dtype)}
        self.lora_A = nn.Linear(in_features, self.r, bias=False, **factory)
        self.lora_B = nn.Linear(self.r, out_features, bias=False, **factory)
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.lora_magnitude_vector = None
        if reset:
            self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear, *, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False, use_dora=False):
        """Wrap an existing ``nn.Linear`` (or transformers' GPT-2 ``Conv1D``, weight ``[in, out]``,
        PEFT's ``fan_in_fan_out``) sharing its weight and bias parameters (no copy); they are
        frozen. A bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` gives a :class:`QuantLoRALinear`
        (QLoRA) holding that layer as ``base_layer``. Every argument is checked before anything changes: on an error the linear is
        untouched.

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear`` / ``Conv1D``; a hyper-parameter of the
                wrong type. ValueError: a hyper-parameter out of range (as the constructor).
        """
        if is_quantized_linear(linear):
            return QuantLoRALinear.wrap(linear, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                        use_rslora=use_rslora, use_dora=use_dora)
        conv1d = is_conv1d(linear)
        if not (isinstance(linear, nn.Linear) or conv1d):
            raise TypeError(f"linear: expected an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        _check_hparams(r, lora_alpha, lora_dropout, use_rslora, use_dora)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        layer.fan_in_fan_out = conv1d
        layer._init_lora(r, lora_alpha, lora_dropout, use_rslora, use_dora)
        return layer

    # -- shapes and hyper-parameters ----------------------------------------------------------
    @property
    def in_features(self):
        return self.weight.shape[0] if self.fan_in_fan_out else self.weight.shape[1]

    @property
    def out_features(self):
        return self.weight.shape[1] if self.fan_in_fan_out else self.weight.shape[0]

    @property
    def scaling(self):
        """``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), a Python float."""
        return lora_scaling(self.r, self._lora_alpha, self._use_rslora)

    @property
    def r(self):
        """The LoRA rank (fixed; :func:`fastlora.load_adapter` resizes a layer)."""
        return self._r

    @r.setter
    def r(self, value):
        raise AttributeError("r: a LoRALinear's rank is fixed at creation (its lora_A / lora_B have r rows / columns); "
                             "build a new layer, or let fastlora.load_adapter resize it from an adapter file")

    @property
    def lora_alpha(self):
        return self._lora_alpha

    @lora_alpha.setter
    def lora_alpha(self, value):
        _check_hparams(self.r, value, self.lora_dropout)
        self._refuse_while_merged("lora_alpha")
        self._lora_alpha = value
        self._refresh_scale()

    @property
    def use_rslora(self):
        return self._use_rslora

    @use_rslora.setter
    def use_rslora(self, value):
        _check_hparams(self.r, self.lora_alpha, self.lora_dropout, value)
        if value != self._use_rslora:
            self._refuse_while_merged("use_rslora")
        self._use_rslora = value
        self._refresh_scale()

    @property
    def use_dora(self):
        """Whether the layer is DoRA (fixed at creation: it decides whether ``lora_magnitude_vector`` exists)."""
        return self._use_dora

    @property
    def lora_dropout(self):
        """Dropout probability of the LoRA input, in [0, 1) (active in training mode)."""
        return self._lora_dropout

    @lora_dropout.setter
    def lora_dropout(self, value):
        self._lora_dropout = check_dropout_p(value, "lora_dropout")

    def _refuse_while_merged(self, what):
        if self._merged:
            raise ValueError(f"{what}: cannot change while the LoRA delta is merged into the weight (it would change "
                             "the delta that unmerge() subtracts); call unmerge() first")

    @torch.no_grad()
    def _refresh_scale(self):
        self._scale.fill_(self.scaling)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() would round the scaling buffer, to_empty() would leave it
        # uninitialised: rebuild it from the Python value in the accumulation dtype of the
        # (possibly new) weight dtype, on the new device. A merge survives the move.
        super()._apply(fn, recurse)
        self._rebuild_scale(self._scale.device)
        if self._merged:
            self._merge_record = self._record()
        return self

    def _rebuild_scale(self, device):
        self._scale = torch.tensor(self.scaling, device=device, dtype=acc_dtype_of(self._base_dtype()))

    def _base_dtype(self):
        """The dtype the base layer computes in (the adapters' and the scale's dtype follow it)."""
        return self.weight.dtype

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # load_state_dict(..., assign=True) after meta-device init (transformers / accelerate's
        # low-memory loading) replaces the parameters; the derived scale buffer is not in the
        # state dict and would stay on meta
        if self._scale.device != self.weight.device:
            self._rebuild_scale(self.weight.device)

    def _record(self):
        """What a merge depends on, to tell later whether it still holds: each tensor's storage
        and in-place version counter."""
        return tuple((t.data_ptr(), t._version) for t in self._merge_inputs()[1])

    def _merge_inputs(self):
        names = ("weight", "lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if self._use_dora else ())
        return names, (self.weight, self.lora_A.weight, self.lora_B.weight) + \
            ((self.lora_magnitude_vector,) if self._use_dora else ())

    @property
    def merged(self):
        """Whether the LoRA delta currently sits inside ``weight``."""
        return self._merged

    def reset_parameters(self):
        """Base as ``nn.Linear.reset_parameters``, then :meth:`reset_lora_parameters`."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        """PEFT's default LoRA init: ``lora_A`` kaiming-uniform (a=√5), ``lora_B`` zeros; DoRA's
        magnitude: the row norms ``‖W + scaling·B·A‖ = ‖W‖`` (PEFT's ``DoraLinearLayer.update_layer``),
        so a fresh layer computes exactly its base."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self._use_dora:
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self.weight_norm())

    @torch.no_grad()
    def weight_norm(self):
        """DoRA's ``‖W + scaling·B·A‖₂`` per output row, ``[out]`` in fp32 (fp64 for an fp64 base),
        computed without forming the N×K sum on the Triton path (fastlora/dora.py)."""
        from .dora import weight_norm
        w = self.base_weight()
        if w.device.type == "meta":
            return torch.empty(self.out_features, device="meta", dtype=acc_dtype_of(self._base_dtype()))
        return weight_norm(w, self.lora_A.weight, self.lora_B.weight, self.scaling, None,
                           acc_dtype_of(w.dtype, self.lora_A.weight.dtype))

    def base_weight(self):
        """The base weight as ``[out, in]`` (a transposed view for a Conv1D base, no copy)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    # -- forward --------------------------------------------------------------------------------
    def forward(self, input):
        """``input [..., in_features]`` -> ``[..., out_features]`` (see :func:`fastlora.lora_linear`)."""
        if self._merged:
            if not torch.compiler.is_compiling():
                self._check_merge("forward (merged)")
            return F.linear(input, self.base_weight(), self.bias)
        A, B = self.lora_A.weight, self.lora_B.weight
        if not (type(A) in _PLAIN and type(B) in _PLAIN and (torch.jit.is_tracing() or (A.numel() and B.numel()))):
            return self._engine_forward(input)  # sharded adapters (fastlora/engines.py)
        groups = self.__dict__.get("_fastlora_groups")  # set by inject_lora (fastlora/group.py)
        if groups is not None and groups.enabled and not self._use_dora:
            key, sibling = self._fastlora_sibling(A, B)
            return groups.run(self, input, key, sibling, lambda: self._lora_forward(input, A, B))
        return self._lora_forward(input, A, B)

    def _fastlora_sibling(self, A, B):
        """``(key, Sibling)`` of a plain call for fastlora/group.py."""
        from .group import Sibling, autocast_key, key_of
        p = self.lora_dropout if self.training else 0.0
        key = key_of((self.weight, self.bias, A, B, self._scale),
                     (p, self.fan_in_fan_out, *autocast_key(self.weight.device.type)))
        return key, Sibling(self.base_weight(), A, B, self._scale, self.bias, p)

    def _fastlora_group_args(self, x):
        """This layer's ``(key, Sibling)`` if a call with ``x`` would run fused and groupable now, else None."""
        A, B = self.lora_A.weight, self.lora_B.weight
        if self._merged or self._use_dora or not (type(A) in _PLAIN and type(B) in _PLAIN and A.numel() and B.numel()):
            return None
        return self._fastlora_sibling(A, B)

    def _lora_forward(self, input, A, B):
        return lora_linear(input, self.base_weight(), A, B, self._scale, self.bias, dropout_p=self.lora_dropout,
                           training=self.training, magnitude=self.lora_magnitude_vector if self._use_dora else None)

    def _engine_forward(self, input):
        """The forward when ``lora_A`` / ``lora_B`` are sharded by an engine outside this layer's
        own parameter management (fastlora/engines.py): DeepSpeed ZeRO-3 gathers them with this
        layer (external parameters), an FSDP unit around ``lora_A`` / ``lora_B`` unshards them
        through its own pre-/post-forward. Anything else reaches :func:`lora_linear`, whose
        checks name what is wrong."""
        from . import engines
        A, B = self.lora_A.weight, self.lora_B.weight
        if engines.is_zero3_param(A) or engines.is_zero3_param(B):
            why = engines.zero3_prepare(self, [A, B])
            if why is not None:
                raise RuntimeError(f"fastlora.LoRALinear: {why}")
            return self._lora_forward(input, A, B)
        units = [u for u in (engines.fsdp_unit(self.lora_A), engines.fsdp_unit(self.lora_B)) if u is not None]
        return engines.run_in_units(units, input, lambda x: self._lora_forward(x, self.lora_A.weight,
                                                                              self.lora_B.weight))

    # -- merging ----------------------------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self):
        """``scaling·B·A`` as ``[out, in]``, computed in fp32 (fp64 for an fp64 base)."""
        acc = acc_dtype_of(self._base_dtype())
        return self.scaling * (self.lora_B.weight.to(acc) @ self.lora_A.weight.to(acc))

    @torch.no_grad()
    def _apply_delta(self, sign):
        w = self.base_weight()  # a view: writing it writes the parameter
        acc = acc_dtype_of(w.dtype)
        if not self._use_dora:
            w.copy_((w.to(acc) + sign * self.delta_weight()).to(w.dtype))
        elif sign > 0:  # PEFT's DoRA merge: W' = (m / ‖W + ΔW‖) ⊙ (W + ΔW), the norm kept for unmerge
            self._merge_norm = self.weight_norm()
            factor = (self.lora_magnitude_vector.to(acc) / self._merge_norm.to(acc))[:, None]
            w.copy_((factor * (w.to(acc) + self.delta_weight())).to(w.dtype))
        else:  # W = W' / (m / ‖W + ΔW‖) - ΔW with the norm of the merge
            factor = (self.lora_magnitude_vector.to(acc) / self._merge_norm.to(acc))[:, None]
            w.copy_((w.to(acc) / factor - self.delta_weight()).to(w.dtype))
            self._merge_norm = None

    def merge(self):
        """Add ``scaling·B·A`` into ``weight`` in place (sum in fp32, rounded once to the weight's
        dtype); forward then skips the LoRA branch.

        Drift: each merge or unmerge rounds once, so a merge/unmerge cycle can move an element by
        one ulp of ``|W| + |scaling·B·A|`` (n cycles: at most n ulps). In practice the first cycle
        reaches a fixed point: measured in fp16 and bf16 (tests/test_layer.py, 50 cycles) every
        element stays within 0.5 ulp of its start, and nothing moves after the first cycle.
        Use :meth:`merged_linear` to export without touching the layer.
        """
        if self._merged:
            warnings.warn("LoRALinear.merge(): already merged, nothing to do", stacklevel=2)
            return
        self._apply_delta(+1.0)
        self._merged = True
        self._merge_record = self._record()

    def _check_merge(self, doing):
        """Raise if the weight or the adapters changed in place since :meth:`merge` (the merged
        weight no longer holds exactly the delta unmerge() would subtract)."""
        now = self._record()
        for name, (ptr, version), (ptr_now, version_now) in zip(self._merge_inputs()[0], self._merge_record, now):
            if ptr != ptr_now or version != version_now:
                raise RuntimeError(f"{doing}: {name} was changed after merge(), so the weight no longer holds exactly "
                                   "the delta unmerge() would subtract; change adapters only while unmerged (to export "
                                   "a merged layer without touching it, use merged_linear())")

    def unmerge(self):
        """Subtract the delta added by :meth:`merge` (same rounding as merge).

        Raises RuntimeError (changing nothing) if the weight or an adapter was modified in place
        since the merge: the subtraction would not restore the weight."""
        if not self._merged:
            warnings.warn("LoRALinear.unmerge(): not merged, nothing to do", stacklevel=2)
            return
        self._check_merge("unmerge()")
        self._apply_delta(-1.0)
        self._merged = False
        self._merge_record = None

    @torch.no_grad()
    def merged_linear(self):
        """A new ``nn.Linear`` holding ``W + scaling·B·A`` (rounded once) and a copy of the bias,
        on the weight's device and dtype. The layer itself is not modified."""
        w = self.base_weight()
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                        dtype=w.dtype)
        merged = w.to(acc_dtype_of(w.dtype)) if self._merged else w.to(acc_dtype_of(w.dtype)) + self.delta_weight()
        if self._use_dora and not self._merged:
            merged = merged * (self.lora_magnitude_vector.to(merged.dtype) / self.weight_norm().to(merged.dtype))[:, None]
        out.weight.copy_(merged.to(w.dtype))
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}, "
                f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}"
                + (", use_dora=True" if self._use_dora else "")
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
                + (", merged=True" if self._merged else "")
                + f", backend={kernel_backend(self.weight.device)}")


class QuantLoRALinear(LoRALinear):
    """:class:`LoRALinear` over a frozen bitsandbytes-quantized base: QLoRA (``Linear4bit``, NF4 /
    FP4, double quantization or not) or LLM.int8() (``Linear8bitLt`` with ``has_fp16_weights=
    False``). Made by :meth:`LoRALinear.from_linear` (and so :func:`fastlora.inject_lora`).

    The bitsandbytes layer is kept as ``base_layer`` (PEFT's layout; its state dict carries the
    quantization state); ``weight`` and ``bias`` are its. Forward as bitsandbytes + PEFT: the
    input is cast to the 4-bit layer's ``compute_dtype`` (the input's dtype if unset, and for
    int8), ``y = x·dequant(W)ᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ`` by :func:`fastlora.lora_linear`
    (fastlora/quant.py: W dequantized to a transient buffer, again in the backward), and the
    output cast back to the input's dtype. Adapters are fp32 (PEFT's default for quantized bases).

    :meth:`merge` raises (a merge would requantize ``W + scaling·B·A`` to the 4-bit / 8-bit grid);
    :meth:`merged_linear` returns a plain ``nn.Linear`` holding the dequantized, merged weight.
    """

    weight = property(lambda self: self.base_layer.weight, doc="The base layer's quantized weight.")
    bias = property(lambda self: self.base_layer.bias, doc="The base layer's bias (frozen), or None.")

    @classmethod
    def wrap(cls, linear, *, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False, use_dora=False):
        """See :meth:`LoRALinear.from_linear`. Raises ValueError if ``linear``'s weight is not
        quantized yet (bitsandbytes quantizes when the layer moves to a device). ``use_dora=True``:
        the magnitude starts at the row norms of the dequantized weight (PEFT's
        ``DoraLinearLayer.update_layer`` on a bitsandbytes base)."""
        from .quant import quantized_weight
        _check_hparams(r, lora_alpha, lora_dropout, use_rslora, use_dora)
        quantized_weight(linear)  # refuses an unquantized / unreadable weight before anything changes
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.base_layer = linear
        for p in linear.parameters():
            p.requires_grad_(False)
        layer.fan_in_fan_out = False
        layer._init_lora(r, lora_alpha, lora_dropout, use_rslora, use_dora)
        return layer

    @property
    def in_features(self):
        return self.base_layer.in_features

    @property
    def out_features(self):
        return self.base_layer.out_features

    @property
    def quantization(self):
        """``"nf4"``, ``"fp4"`` or ``"int8"``."""
        return self.quantized_weight().kind

    def quantized_weight(self):
        """The base weight as a :class:`fastlora.quant.QuantizedWeight`."""
        from .quant import quantized_weight
        return quantized_weight(self.base_layer)

    def _base_dtype(self):
        return torch.float32  # fp32 adapters and scale (the base computes in its compute dtype)

    def _compute_dtype(self, input):
        """bitsandbytes' rule: a 4-bit layer's ``compute_dtype`` if set, else the input's dtype."""
        return getattr(self.base_layer, "compute_dtype", None) or input.dtype

    def reset_parameters(self):
        """Only the adapters (PEFT's init): the quantized base cannot be re-initialised."""
        self.reset_lora_parameters()

    def base_weight(self):
        """The dequantized base weight ``[out, in]`` (a new tensor, in the 4-bit weight's original
        dtype; fp32 for int8)."""
        return self.quantized_weight().dequantize()

    def forward(self, input):
        """``input [..., in_features]`` -> ``[..., out_features]`` in input's dtype."""
        dtype = self._compute_dtype(input)
        x = input if input.dtype == dtype else input.to(dtype)
        bias = self.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        y = lora_linear(x, self.quantized_weight(), self.lora_A.weight, self.lora_B.weight, self._scale, bias,
                        dropout_p=self.lora_dropout, training=self.training,
                        magnitude=self.lora_magnitude_vector if self._use_dora else None)
        return y if y.dtype == input.dtype else y.to(input.dtype)

    def merge(self):
        """Refused: the merged weight would be requantized to the base's 4-bit / 8-bit grid
        (an error of up to half a quantization step per element, far above the LoRA delta's
        own size early in training). Raises ValueError; use :meth:`merged_linear`."""
        raise ValueError(f"merge: the base weight is {self.quantization}-quantized (bitsandbytes); merging would "
                         "requantize W + scaling·B·A to its grid and lose most of the delta. Use merged_linear() for "
                         "a plain nn.Linear holding the dequantized, merged weight")

    @torch.no_grad()
    def merged_linear(self, dtype=None):
        """A new ``nn.Linear`` holding ``dequant(W) + scaling·B·A`` (summed in fp32, rounded once to
        ``dtype``; DoRA: times ``magnitude / ‖dequant(W) + scaling·B·A‖`` per row, PEFT's merge) and a
        copy of the bias, on the base's device. ``dtype`` default: the 4-bit weight's original dtype
        (``quant_state.dtype``), for int8 the bias's dtype, else fp32."""
        qw = self.quantized_weight()
        bias = self.bias
        dtype = dtype or qw.dtype or (bias.dtype if bias is not None else torch.float32)
        merged = qw.dequantize(torch.float32) + self.delta_weight()
        if self._use_dora:
            merged = merged * (self.lora_magnitude_vector.float() / torch.linalg.vector_norm(merged, dim=1))[:, None]
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=merged.device,
                        dtype=dtype)
        out.weight.copy_(merged.to(dtype))
        if bias is not None:
            out.bias.copy_(bias)
        return out

    def extra_repr(self):
        return super().extra_repr() + f", quantization={self.quantization}"
