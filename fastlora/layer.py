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


def adapter_dtype_for(dtype):
    """PEFT's default (``autocast_adapter_dtype=True``): fp32 adapters on an fp16/bf16 base."""
    return torch.float32 if dtype in _HALF else dtype


def lora_scaling(r, lora_alpha, use_rslora):
    """``lora_alpha / r`` (LoRA, Hu et al. 2021), or ``lora_alpha / sqrt(r)`` (rsLoRA, Kalajdzievski 2023)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _check_hparams(r, lora_alpha, lora_dropout, use_rslora=False):
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
    return int(r), lora_alpha, check_dropout_p(lora_dropout, "lora_dropout")


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
                 use_rslora=False, device=None, dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        _check_hparams(r, lora_alpha, lora_dropout, use_rslora)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.fan_in_fan_out = False
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora)
        self.reset_parameters()

    def _init_lora(self, r, lora_alpha, lora_dropout, use_rslora):
        self._r, self._lora_alpha, self._lora_dropout = _check_hparams(r, lora_alpha, lora_dropout, use_rslora)
        self._use_rslora = use_rslora
        self._merged = False
        self._merge_record = None
        w = self.weight
        # The scaling as a device scalar the kernels read (not in the state dict): a new alpha
        # updates it in place, so compiled graphs and CUDA graphs need no recompilation.
        self.register_buffer("_scale", torch.tensor(self.scaling, device=w.device, dtype=acc_dtype_of(w.dtype)),
                             persistent=False)
        in_features, out_features = self.in_features, self.out_features
        factory = {"device": w.device, "dtype": adapter_dtype_for(w.dtype)}
        self.lora_A = nn.Linear(in_features, self.r, bias=False, **factory)
        self.lora_B = nn.Linear(self.r, out_features, bias=False, **factory)
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear, *, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False):
        """Wrap an existing ``nn.Linear`` (or transformers' GPT-2 ``Conv1D``, weight ``[in, out]``,
        PEFT's ``fan_in_fan_out``) sharing its weight and bias parameters (no copy); they are
        frozen. Every argument is checked before anything changes: on an error the linear is
        untouched.

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear`` / ``Conv1D``; a hyper-parameter of the
                wrong type. ValueError: a hyper-parameter out of range (as the constructor).
        """
        conv1d = is_conv1d(linear)
        if not (isinstance(linear, nn.Linear) or conv1d):
            raise TypeError(f"linear: expected an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        _check_hparams(r, lora_alpha, lora_dropout, use_rslora)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        layer.fan_in_fan_out = conv1d
        layer._init_lora(r, lora_alpha, lora_dropout, use_rslora)
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
        self._scale = torch.tensor(self.scaling, device=device, dtype=acc_dtype_of(self.weight.dtype))

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
        return tuple((t.data_ptr(), t._version) for t in (self.weight, self.lora_A.weight, self.lora_B.weight))

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
        """PEFT's default LoRA init: ``lora_A`` kaiming-uniform (a=√5), ``lora_B`` zeros."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

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
        return lora_linear(input, self.base_weight(), self.lora_A.weight, self.lora_B.weight, self._scale,
                           self.bias, dropout_p=self.lora_dropout, training=self.training)

    # -- merging ----------------------------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self):
        """``scaling·B·A`` as ``[out, in]``, computed in fp32 (fp64 for an fp64 base)."""
        acc = acc_dtype_of(self.weight.dtype)
        return self.scaling * (self.lora_B.weight.to(acc) @ self.lora_A.weight.to(acc))

    @torch.no_grad()
    def _apply_delta(self, sign):
        w = self.base_weight()  # a view: writing it writes the parameter
        w.copy_((w.to(acc_dtype_of(w.dtype)) + sign * self.delta_weight()).to(w.dtype))

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
        for name, (ptr, version), (ptr_now, version_now) in zip(("weight", "lora_A.weight", "lora_B.weight"),
                                                                 self._merge_record, now):
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
        out.weight.copy_(merged.to(w.dtype))
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}, "
                f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}"
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
                + (", merged=True" if self._merged else "")
                + f", backend={kernel_backend(self.weight.device)}")
