"""Run PEFT LoRA models through fastlora's fused op, with PEFT's API unchanged.

``patch_peft_model(model)`` switches every ``peft.tuners.lora.layer.Linear`` of ``model`` to a
subclass whose ``forward`` calls :func:`fastlora.lora_linear` when the layer's state is one
fastlora computes exactly; otherwise it calls PEFT's own ``forward``. The decision is taken at
every call, so merging, disabling adapters, switching or adding adapters, passing
``adapter_names`` and LoRA variants all keep working. Training, ``merge_and_unload``,
``save_pretrained`` and the state dict are PEFT's own: the layers' parameters are untouched.

Fused when all hold (PEFT's forward order: base, then ``lora_B(lora_A(dropout(x))) · scaling``,
``peft/tuners/lora/layer.py``):
  exactly one active adapter present in the layer; not merged; adapters enabled; no per-call
  ``adapter_names`` or extra forward arguments; no LoRA variant (aLoRA, ...) but DoRA; the base
  is ``nn.Linear`` or GPT-2 ``Conv1D`` (``fan_in_fan_out``) with plain float weights on the
  input's device and no hooks (e.g. accelerate's offloading) on it; the dropout is
  ``nn.Dropout`` or ``nn.Identity``. Weights an engine shards are gathered by the engine itself
  (fastlora/engines.py): DeepSpeed ZeRO-3 (its hooks on the submodules are allowed; the layer's
  tensors become its external parameters), FSDP1 / FSDP2 units around ``base_layer``,
  ``lora_A``, ``lora_B`` or the DoRA magnitude (entered through their own pre- / post-forward). ``lora_bias`` and rsLoRA are
  supported, fp32 or half adapters too.
DoRA (``use_dora=True``) runs fused on plain and on bitsandbytes bases (not with ``lora_bias``,
which PEFT refuses for DoRA): ``m/‖W + s·B·A‖ ⊙ (x·Wᵀ + s·(x̃·Aᵀ)·Bᵀ) + b`` (fastlora.dora), PEFT's forward
exactly without dropout or in eval mode. With ``lora_dropout > 0`` in training fastlora drops
the input of the LoRA branch only; PEFT's forward also feeds the dropped-out input to the
magnitude's share of the base term, ``(g - 1) ⊙ x̃·Wᵀ`` (a second base GEMM): same expectation,
different samples.
Each other case falls back to PEFT with a warning that names the layer and the reason (once per
layer and reason), and is counted in the :class:`PatchReport`.
"""
import collections
import dataclasses
import functools
import os
import warnings

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn.modules import module as _nn_module

from . import engines, group
from .functional import lora_linear
from .layer import is_conv1d, is_quantized_linear
from .quant import quantized_weight


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch_peft_model` did.

    Attributes:
        patched: names of the LoRA layers that now run fastlora when their state allows it.
        skipped: ``{name: reason}`` for LoRA layers left entirely to PEFT (unsupported layer type,
            a base layer that is another tuner layer, a base that is not a plain linear).
        expected_fallbacks: ``{name: reason}`` for patched layers that, as configured when
            patching, run PEFT's forward at every call (e.g. a LoRA variant other than DoRA);
            rechecked at each call.
        fallbacks: live ``Counter`` of ``(name, reason)`` for calls that ran PEFT's forward.
        groups: the model's :class:`fastlora.group.SiblingGroups`: sibling layers fed the same input
            (q/k/v, gate/up), learned from the calls of a forward and run as one group from the
            next (:meth:`sibling_groups` names them; ``groups.enabled = False`` turns it off).
    """
    patched: list = dataclasses.field(default_factory=list)
    skipped: dict = dataclasses.field(default_factory=dict)
    expected_fallbacks: dict = dataclasses.field(default_factory=dict)
    fallbacks: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    groups: group.SiblingGroups = dataclasses.field(default_factory=group.SiblingGroups)

    def sibling_groups(self):
        """The learned groups as tuples of layer names, head first (empty before a training forward)."""
        return [tuple(getattr(m, "_fastlora_name", "?") for m in g) for g in self.groups.groups()]

    def __str__(self):
        lines = [f"fastlora: {len(self.patched)} PEFT LoRA layer(s) patched, {len(self.skipped)} skipped"
                 + (f", {len(self.expected_fallbacks)} of the patched run PEFT's forward as configured"
                    if self.expected_fallbacks else "")]
        lines += [f"  skipped: {line}" for line in _by_reason(self.skipped)]
        lines += [f"  PEFT's forward: {line}" for line in _by_reason(self.expected_fallbacks)]
        lines += [f"  fell back {n}x {name}: {why}" for (name, why), n in self.fallbacks.items()]
        names = self.sibling_groups()
        if names:
            lines.append(f"  {len(names)} sibling group(s), each run as one call:")
            lines += [f"    {' + '.join(g)}" for g in names[:5]] + ([f"    ... ({len(names) - 5} more)"]
                                                                      if len(names) > 5 else [])
        return "\n".join(lines)


def _by_reason(named, show=3):
    """``{name: reason}`` summarised one line per reason: count, first names."""
    groups = collections.defaultdict(list)
    for name, why in named.items():
        groups[why].append(name)
    return [f"{len(names)} layer(s) ({', '.join(names[:show])}{', ...' if len(names) > show else ''}): {why}"
            for why, names in groups.items()]


def _plain_weight(t):
    return t is not None and type(t) in (torch.Tensor, nn.Parameter) and t.is_floating_point() and t.numel() > 0


def _base_is_hooked(base):
    """The base layer's forward carries behaviour fastlora would skip: hooks (its own or global
    ones, accelerate's offloading hook) or a forward replaced on the instance."""
    d = base.__dict__
    return bool(base._forward_hooks or base._forward_pre_hooks or "_hf_hook" in d or "forward" in d
                or _nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks)


def _hooked(module):
    """Hooks fastlora's fused path would skip on ``module`` itself."""
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)


def static_skip_reason(layer, quantized=False):
    """Why a PEFT LoRA layer can never run fused, knowable when patching (None if it can):
    its base layer is another tuner layer (LoRA stacked on LoHa / LoKr / ... in a PeftMixedModel:
    the fused op would drop that adapter's output) or not a plain ``nn.Linear`` / GPT-2 ``Conv1D``
    (``quantized``: not a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, or an 8-bit one that keeps
    fp16 weights or splits outliers, whose forward is not a matmul with the dequantized W)."""
    base = layer.base_layer
    if isinstance(base, BaseTunerLayer):
        return (f"base layer is a tuner layer ({type(base).__module__}.{type(base).__name__}), whose output "
                "the fused op would drop")
    if quantized:
        if not is_quantized_linear(base):
            return f"base layer {type(base).__name__} is not a bitsandbytes Linear4bit / Linear8bitLt"
        state = getattr(base, "state", None)
        if state is not None and getattr(state, "has_fp16_weights", False):
            return "8-bit base layer with has_fp16_weights=True (its weight is not quantized)"
        return None
    if not (type(base) is nn.Linear or is_conv1d(base)):
        return f"base layer {type(base).__name__} is not a plain nn.Linear / Conv1D"
    return None


def _fallback_reason(layer, x, args, kwargs, quantized=False):
    """Why this call cannot be fused (None if it can), and otherwise the pieces the fused call
    uses: ``(adapter, base, weight, lora_A, lora_B, dropout)`` (``weight``: the base's, or with
    ``quantized`` its :class:`fastlora.quant.QuantizedWeight`). The fused op replaces exactly
    ``base_layer(x) + lora_B(lora_A(dropout(x)))·scaling``; anything else in that computation
    (another tuner layer, hooks, a replaced forward) runs PEFT's. Runs at every call: written to
    read each attribute once (module attribute lookups dominate its cost at decode sizes)."""
    if layer.disable_adapters:
        return "adapters disabled", None
    if kwargs and kwargs.get("adapter_names") is not None:
        return "per-call adapter_names", None
    if layer.merged:
        return "adapter merged", None
    if args or (kwargs and any(v is not None for k, v in kwargs.items() if k != "adapter_names")):
        return "extra forward arguments", None
    mods = layer._modules
    lora_As = mods["lora_A"]._modules
    active = [a for a in layer.active_adapters if a in lora_As]
    if len(active) != 1:
        return f"{len(active)} active adapters", None
    adapter = active[0]
    variants = layer.__dict__.get("lora_variant") or {}
    dora = (layer.__dict__.get("use_dora") or {}).get(adapter, False)
    if adapter in variants and not (dora and _is_dora_variant(variants[adapter])):
        return f"LoRA variant {type(variants[adapter]).__name__}", None
    mag_layer = None
    if dora:
        if (layer.__dict__.get("lora_bias") or {}).get(adapter, False):
            return "DoRA with lora_bias", None
        mag_layer = mods["lora_magnitude_vector"]._modules.get(adapter)
        if mag_layer is None:
            return "DoRA magnitude layer missing", None
    base = mods["base_layer"]
    if quantized:
        static = static_skip_reason(layer, quantized=True)
        if static is not None:
            return static, None
    elif type(base) is not nn.Linear:
        static = static_skip_reason(layer)
        if static is not None:
            return static, None
    lora_A, lora_B = lora_As[adapter], mods["lora_B"]._modules[adapter]
    dropout = mods["lora_dropout"]._modules[adapter]
    if type(dropout) not in (nn.Dropout, nn.Identity):
        return f"dropout module {type(dropout).__name__}", None
    why, weight = _check_modules(layer, x, base, lora_A, lora_B, dropout, mag_layer, quantized)
    if why is None:
        return None, (adapter, base, weight, lora_A, lora_B, dropout, mag_layer, ())
    # Engines that shard parameters (fastlora/engines.py): let the engine gather for the fused call.
    if engines.zero3_managed(layer):
        return _zero3_parts(layer, x, adapter, base, lora_A, lora_B, dropout, mag_layer, quantized, why)
    candidates = (lora_A, lora_B, mag_layer) if quantized else (base, lora_A, lora_B, mag_layer)
    units = [u for u in (engines.fsdp_unit(m) for m in candidates if m is not None) if u]
    if units:
        inner = {u.module: u.inner for u in units}
        base, lora_A, lora_B = inner.get(base, base), inner.get(lora_A, lora_A), inner.get(lora_B, lora_B)
        mag_layer = inner.get(mag_layer, mag_layer)
        why2, weight = _check_modules(layer, x, base, lora_A, lora_B, dropout, mag_layer, quantized,
                                      unit_modules={u.inner for u in units})
        if why2 is None:
            return None, (adapter, base, weight, lora_A, lora_B, dropout, mag_layer, tuple(units))
        why = why2
    return why, None


def _module_weight(module, name="weight"):
    """``module``'s tensor ``name``: a registered parameter, or a plain tensor attribute (FSDP1
    without ``use_orig_params`` sets the unsharded views as attributes during forward)."""
    t = module._parameters.get(name)
    return module.__dict__.get(name) if t is None else t


def _check_modules(layer, x, base, lora_A, lora_B, dropout, mag_layer, quantized, unit_modules=(),
                   zero3=False):
    """Why the fused call cannot read these modules' tensors (None if it can), and the base
    weight (with ``quantized`` its :class:`fastlora.quant.QuantizedWeight`). ``unit_modules``:
    modules that are their own FSDP units (their tensors are read once the unit unshards them,
    their FSDP2 hooks run around the call); ``zero3``: DeepSpeed ZeRO-3's hooks are allowed (its
    parameters were gathered with the layer, :func:`_zero3_parts`)."""
    params = base._parameters
    weight, bias = _module_weight(base), params.get("bias")
    if base in unit_modules:  # read once its FSDP unit has unshard it (quantized bases are never units)
        if _hooked(base) and not engines.fsdp2_hooks_only(base):
            return "hooks on the base layer", None
        weight = None
    elif quantized:
        try:
            weight = quantized_weight(base)
        except (TypeError, ValueError) as e:
            return f"quantized base weight fastlora does not read ({e})", None
        if bias is not None and not _plain_weight(bias):
            return engines.engine_reason(bias, "sharded or empty base bias"), None
    elif not _plain_weight(weight):
        return engines.engine_reason(weight, "quantized, sharded or empty base weight"), None
    elif bias is not None and not _plain_weight(bias):
        return engines.engine_reason(bias, "sharded or empty base bias"), None
    if base not in unit_modules:
        if _base_is_hooked(base) and not (zero3 and engines.zero3_hooks_only(base) and not _global_hooks()):
            return ("hooks on the base layer (DeepSpeed ZeRO-3: " + engines.ZERO3_REMEDY + ")"
                    if engines.zero3_managed(base) else "hooks on the base layer"), None
        if weight.device != x.device:
            return f"base weight on {weight.device}, input on {x.device}", None
    for m in (lora_A, lora_B, mag_layer):
        if m is None or m in unit_modules:
            continue
        t = _module_weight(m)
        if not _plain_weight(t) or (m is mag_layer and t.device != x.device):
            what = "DoRA magnitude" if m is mag_layer else "adapter weight"
            return engines.engine_reason(t, f"sharded, empty or misplaced {what}"), None
    for m in (lora_A, lora_B, dropout, mag_layer):
        if m is not None and _hooked(m) and not (zero3 and engines.zero3_hooks_only(m)) \
                and not (m in unit_modules and engines.fsdp2_hooks_only(m)):
            return "hooks on lora_A / lora_B / lora_dropout / lora_magnitude_vector", None
    return None, weight


def _global_hooks():
    return bool(_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks)


def _zero3_parts(layer, x, adapter, base, lora_A, lora_B, dropout, mag_layer, quantized, why):
    """The fused call's parts for a layer under DeepSpeed ZeRO-3 (its tensors gathered with the
    layer itself: fastlora/engines.py), or the reason it cannot run fused."""
    if quantized:
        return f"{why} (DeepSpeed ZeRO-3 over a bitsandbytes base)", None
    params = [_module_weight(base), base._parameters.get("bias")] + \
        [_module_weight(m) for m in (lora_A, lora_B, mag_layer) if m is not None]
    gather_why = engines.zero3_prepare(layer, params)
    if gather_why is not None:
        return gather_why, None
    why, weight = _check_modules(layer, x, base, lora_A, lora_B, dropout, mag_layer, quantized, zero3=True)
    if why is not None:
        return why, None
    return None, (adapter, base, weight, lora_A, lora_B, dropout, mag_layer, ())


@functools.lru_cache(maxsize=None)
def _dora_variant_class():
    try:
        from peft.tuners.lora.variants import DoraLinearVariant
    except ImportError:  # a PEFT without LoRA variants: DoRA is the use_dora flag alone
        return None
    return DoraLinearVariant


def _is_dora_variant(variant):
    """PEFT's own DoRA variant for Linear (whose forward fastlora computes), not a subclass of it
    with a forward of its own."""
    return type(variant) is _dora_variant_class()


class FastLoraPeftLinear(PeftLoraLinear):
    """A PEFT LoRA ``Linear`` whose forward runs fastlora when it can (see the module doc).
    Instances are made by :func:`patch_peft_model` switching ``__class__``; nothing else
    changes. ``print(model)`` shows PEFT's ``lora.Linear``, as before patching; the patch is in
    the model's :class:`PatchReport` (``fastlora.peft.patch_report(model)``)."""

    def _get_name(self):
        return PeftLoraLinear.__name__

    def forward(self, x, *args, **kwargs):
        reason, parts = _fallback_reason(self, x, args, kwargs)
        if reason is not None:
            self._fastlora_fallback(reason)
            return super().forward(x, *args, **kwargs)
        adapter, base, weight, lora_A, lora_B, dropout, mag_layer, units = parts
        if units:  # some of base / lora_A / lora_B / the magnitude are FSDP units: run inside their unshard
            return engines.run_in_units(units, x, lambda x: self._fastlora_call(x, parts))
        report = self.__dict__.get("_fastlora_report")
        groups = report.groups if report is not None else None
        if groups is not None and groups.enabled and mag_layer is None and not engines.zero3_managed(self):
            key, sibling = self._fastlora_sibling(x, parts)
            return groups.run(self, x, key, sibling, lambda: self._fastlora_call(x, parts))
        return self._fastlora_call(x, parts)

    def _fastlora_sibling(self, x, parts):
        """``(key, Sibling)`` of this call for fastlora/group.py (plain LoRA, no engine units)."""
        adapter, base, weight, lora_A, lora_B, dropout, _, _ = parts
        weight = _module_weight(base) if weight is None else weight
        w = weight.t() if self.fan_in_fan_out else weight
        args = _call_args(self, adapter, base, w, lora_A, lora_B, dropout, w.dtype)
        A, B = _module_weight(lora_A), _module_weight(lora_B)
        lora_bias = lora_B.bias if (self.__dict__.get("lora_bias") or {}).get(adapter, False) else None
        key = group.key_of((weight, base.bias, A, B, lora_bias),
                           (args.scaling, args.dropout_p, self.fan_in_fan_out, *group.autocast_key(x.device.type)))
        return key, args

    def _fastlora_group_args(self, x):
        """This layer's ``(key, Sibling)`` for input ``x`` if it would run fused and groupable now, else None."""
        reason, parts = _fallback_reason(self, x, (), None)
        if reason is not None or parts[6] is not None or parts[7] or engines.zero3_managed(self):
            return None
        return self._fastlora_sibling(x, parts)

    def _fastlora_call(self, x, parts):
        adapter, base, weight, lora_A, lora_B, dropout, mag_layer, _ = parts
        weight = _module_weight(base) if weight is None else weight
        weight = weight.t() if self.fan_in_fan_out else weight
        return _fused(self, x, adapter, base, weight, lora_A, lora_B, dropout, weight.dtype, mag_layer)

    def _fastlora_fallback(self, reason):
        name = getattr(self, "_fastlora_name", "?")
        report = getattr(self, "_fastlora_report", None)
        if report is not None:
            report.fallbacks[(name, reason)] += 1
        warned = self.__dict__.setdefault("_fastlora_warned", set())
        if report is not None and report.expected_fallbacks.get(name) == reason:
            warned.add(reason)  # announced when patching, in one warning for all such layers
        if reason not in warned:
            warned.add(reason)
            warnings.warn(f"fastlora: {name} runs PEFT's own forward ({reason})", stacklevel=3)


def _call_args(layer, adapter, base, weight, lora_A, lora_B, dropout, dtype):
    """The fused call's arguments after x, as a :class:`fastlora.group.Sibling`: bias and, with
    lora_bias, ``scaling·lora_B.bias`` folded into it, in ``dtype``; the dropout in effect."""
    scaling = layer.scaling[adapter]
    bias = base.bias
    if (layer.__dict__.get("lora_bias") or {}).get(adapter, False) and lora_B.bias is not None:
        extra = scaling * lora_B.bias
        bias = extra if bias is None else bias + extra.to(bias.dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    p = dropout.p if type(dropout) is nn.Dropout and dropout.training else 0.0
    return group.Sibling(weight, _module_weight(lora_A), _module_weight(lora_B), scaling, bias, p)


def _fused(layer, x, adapter, base, weight, lora_A, lora_B, dropout, dtype, mag_layer=None):
    """The fused call replacing ``base_layer(x) + lora_B(lora_A(dropout(x)))·scaling`` (``dtype``:
    the base's compute dtype; bias and, with lora_bias, ``scaling·lora_B.bias`` folded into it),
    or with ``mag_layer`` (the adapter's magnitude module, its tensor read now) PEFT's DoRA forward (``peft/tuners/lora/dora.py``,
    ``DoraLinearLayer.forward``) ``m/‖W + s·B·A‖ ⊙ (x·Wᵀ + s·(x̃·Aᵀ)·Bᵀ) + b``."""
    scaling = layer.scaling[adapter]
    bias = base.bias
    if (layer.__dict__.get("lora_bias") or {}).get(adapter, False) and lora_B.bias is not None:
        extra = scaling * lora_B.bias
        bias = extra if bias is None else bias + extra.to(bias.dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    p = dropout.p if type(dropout) is nn.Dropout else 0.0
    magnitude = None if mag_layer is None else _module_weight(mag_layer)
    return lora_linear(x, weight, _module_weight(lora_A), _module_weight(lora_B), scaling, bias, dropout_p=p,
                       training=dropout.training, magnitude=magnitude)


class _FastLoraQuantMixin:
    """forward for PEFT's bitsandbytes LoRA layers (``peft.tuners.lora.bnb.Linear4bit`` /
    ``Linear8bitLt``): bitsandbytes' casts around :func:`fastlora.lora_linear` with the quantized
    weight (the input to a 4-bit layer's ``compute_dtype``, the output back to the input's dtype),
    PEFT's forward where fastlora cannot compute the call exactly (as for plain layers)."""

    def _get_name(self):
        return self._peft_class.__name__

    def forward(self, x, *args, **kwargs):
        reason, parts = _fallback_reason(self, x, args, kwargs, quantized=True)
        if reason is not None:
            self._fastlora_fallback(reason)
            return self._peft_class.forward(self, x, *args, **kwargs)
        adapter, base, qweight, lora_A, lora_B, dropout, mag_layer, units = parts
        dtype = getattr(base, "compute_dtype", None) or x.dtype
        x_in = x if x.dtype == dtype else x.to(dtype)
        y = engines.run_in_units(units, x_in, lambda x_in: _fused(self, x_in, adapter, base, qweight, lora_A, lora_B,
                                                                  dropout, dtype, mag_layer))
        return y if y.dtype == x.dtype else y.to(x.dtype)

    _fastlora_fallback = FastLoraPeftLinear._fastlora_fallback


def quant_layer_classes():
    """``{PEFT bitsandbytes LoRA class: its fastlora subclass}`` (empty without bitsandbytes)."""
    import sys
    if "bitsandbytes" not in sys.modules:
        return {}
    return _quant_classes()


@functools.lru_cache(maxsize=None)
def _quant_classes():
    try:
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:
        return {}
    out = {}
    for name in ("Linear8bitLt", "Linear4bit"):
        peft_class = getattr(peft_bnb, name, None)
        if peft_class is not None:
            out[peft_class] = type(f"FastLora{name}", (_FastLoraQuantMixin, peft_class),
                                   {"_peft_class": peft_class, "__module__": __name__,
                                    "__doc__": f"PEFT's ``lora.bnb.{name}`` running fastlora when it can."})
    return out


@functools.lru_cache(maxsize=None)
def _generic_over_quant_class():
    """PEFT's generic ``lora.Linear`` wrapping a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``
    (what PEFT builds for a model that transformers did not quantize, so without the
    ``is_loaded_in_4bit`` / ``_8bit`` mark that selects ``lora.bnb``): the quantized forward of
    :class:`_FastLoraQuantMixin`, PEFT's generic forward as the fallback. Both PEFT classes compute
    ``base_layer(x) + lora_B(lora_A(dropout(x)))·scaling`` over the same quantized weight."""
    return type("FastLoraPeftLinearOverQuant", (_FastLoraQuantMixin, PeftLoraLinear),
                {"_peft_class": PeftLoraLinear, "__module__": __name__,
                 "__doc__": "PEFT's generic ``lora.Linear`` over a bitsandbytes layer, running fastlora when it can."})


def _configured_fallback(layer):
    """Why a patched layer, as configured now, would run PEFT's forward at every call (None: fused)."""
    for adapter in layer.active_adapters:
        dora = getattr(layer, "use_dora", {}).get(adapter, False)
        variant = getattr(layer, "lora_variant", {}).get(adapter)
        if variant is not None and not (dora and _is_dora_variant(variant)):
            return f"LoRA variant {type(variant).__name__}"
        if dora and getattr(layer, "lora_bias", {}).get(adapter, False):
            return "DoRA with lora_bias"
    if layer.merged:
        return "adapter merged"
    return None


def patch_peft_model(model, *, group_siblings=True):
    """Make every PEFT LoRA ``Linear`` of ``model`` run :func:`fastlora.lora_linear` when possible.

    Args:
        model: a ``peft.PeftModel`` (or any module holding PEFT LoRA layers), i.e. after
            ``peft.get_peft_model``.
        group_siblings: run sibling layers fed the same input (q/k/v, gate/up) as one group
            (fastlora/group.py: one autograd node, one dx buffer; the same outputs, masks and LoRA
            gradients), learned from the model's calls in training forwards. ``False``, or the
            environment variable ``FASTLORA_GROUP=0``, keeps every layer alone.

    Returns:
        :class:`PatchReport` listing patched layers, layers skipped with the reason (other LoRA
        layer types, e.g. Embedding, Conv2d; LoRA stacked on another tuner layer),
        patched layers that run PEFT's forward as configured (e.g. aLoRA), and a live count of
        call-time fallbacks. One warning per reason summarises what will not run fused. Patching
        twice is harmless.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` holds no PEFT LoRA layer (nothing is changed): patch the model that
            ``peft.get_peft_model`` returned, after it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module holding PEFT LoRA layers, got {type(model).__name__}")
    quant_classes = quant_layer_classes()
    over_quant = (_generic_over_quant_class(),) if quant_classes else ()
    patched_types = (FastLoraPeftLinear, *quant_classes.values(), *over_quant)
    lora = [(n, m) for n, m in model.named_modules() if isinstance(m, patched_types)
            or (isinstance(m, BaseTunerLayer) and type(m).__module__.startswith("peft.tuners.lora"))]
    if not lora:
        raise ValueError(f"model: no PEFT LoRA layer in {type(model).__name__}; call patch_peft_model on the model "
                         "that peft.get_peft_model(...) returns (for a model without PEFT, use fastlora.inject_lora)")
    report = getattr(model, "_fastlora_report", None) or PatchReport()
    report.groups.enabled = bool(group_siblings) and os.environ.get("FASTLORA_GROUP", "1") != "0"
    new_skips, new_expected = {}, {}
    for name, module in lora:
        if isinstance(module, patched_types):
            if name not in report.patched:
                report.patched.append(name)
            continue
        if type(module) is PeftLoraLinear:
            target = over_quant[0] if over_quant and is_quantized_linear(module.base_layer) else FastLoraPeftLinear
        else:
            target = quant_classes.get(type(module))
        if target is None:
            new_skips[name] = f"unsupported LoRA layer type {type(module).__module__}.{type(module).__name__}"
            continue
        why = static_skip_reason(module, quantized=target is not FastLoraPeftLinear)
        if why is not None:
            new_skips[name] = why
            continue
        module.__class__ = target
        module._fastlora_name = name
        module._fastlora_report = report
        report.patched.append(name)
        why = _configured_fallback(module)
        if why is not None:
            new_expected[name] = why
    report.skipped.update(new_skips)
    report.expected_fallbacks.update(new_expected)
    model._fastlora_report = report
    for what, named in (("not patched, PEFT's forward runs", new_skips),
                        ("patched, but PEFT's forward runs as configured now", new_expected)):
        for line in _by_reason(named):
            warnings.warn(f"fastlora: {line} -> {what}", stacklevel=2)
    return report


def patch_report(model):
    """The :class:`PatchReport` of a model patched by :func:`patch_peft_model`, or None."""
    return getattr(model, "_fastlora_report", None)


def unpatch_peft_model(model):
    """Undo :func:`patch_peft_model`: every patched layer runs PEFT's forward again.
    Returns the names of the layers restored. Raises TypeError if ``model`` is not a Module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    restored = []
    patched = {cls: peft_class for peft_class, cls in quant_layer_classes().items()}
    patched[FastLoraPeftLinear] = patched[_generic_over_quant_class()] = PeftLoraLinear
    for name, module in model.named_modules():
        if type(module) in patched:
            module.__class__ = patched[type(module)]
            for attr in ("_fastlora_name", "_fastlora_report", "_fastlora_warned"):
                module.__dict__.pop(attr, None)
            restored.append(name)
    model.__dict__.pop("_fastlora_report", None)
    return restored
