"""Run PEFT LoRA models through fastlora's fused op, with PEFT's API unchanged.

``patch_peft_model(model)`` switches every ``peft.tuners.lora.layer.Linear`` of ``model`` to a
subclass whose ``forward`` calls :func:`fastlora.lora_linear` when the layer's state is one
fastlora computes exactly; otherwise it calls PEFT's own ``forward``. The decision is taken at
every call, so merging, disabling adapters, switching or adding adapters, passing
``adapter_names`` and DoRA all keep working. Training, ``merge_and_unload``,
``save_pretrained`` and the state dict are PEFT's own: the layers' parameters are untouched.

Fused when all hold (PEFT's forward order: base, then ``lora_B(lora_A(dropout(x))) · scaling``,
``peft/tuners/lora/layer.py``):
  exactly one active adapter present in the layer; not merged; adapters enabled; no per-call
  ``adapter_names`` or extra forward arguments; no LoRA variant (DoRA, aLoRA, ...); the base
  is ``nn.Linear`` or GPT-2 ``Conv1D`` (``fan_in_fan_out``) with plain, unsharded float
  weights on the input's device and no hooks (e.g. accelerate's offloading) on it; the dropout
  is ``nn.Dropout`` or ``nn.Identity``. ``lora_bias`` and rsLoRA are
  supported, fp32 or half adapters too.
Each other case falls back to PEFT with a warning that names the layer and the reason (once per
layer and reason), and is counted in the :class:`PatchReport`.
"""
import collections
import dataclasses
import warnings

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .functional import lora_linear
from .layer import is_conv1d


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch_peft_model` did.

    Attributes:
        patched: names of the LoRA layers that now run fastlora when their state allows it.
        skipped: ``{name: reason}`` for LoRA layers left entirely to PEFT (unsupported type).
        fallbacks: live ``Counter`` of ``(name, reason)`` for calls that ran PEFT's forward.
    """
    patched: list = dataclasses.field(default_factory=list)
    skipped: dict = dataclasses.field(default_factory=dict)
    fallbacks: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def __str__(self):
        lines = [f"fastlora: {len(self.patched)} PEFT LoRA layer(s) patched, {len(self.skipped)} skipped"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        lines += [f"  fell back {n}x {name}: {why}" for (name, why), n in self.fallbacks.items()]
        return "\n".join(lines)


def _plain_weight(t):
    return t is not None and type(t) in (torch.Tensor, nn.Parameter) and t.is_floating_point() and t.numel() > 0


def _base_is_hooked(base):
    """The base layer's forward carries behaviour fastlora would skip: hooks (its own or global
    ones, accelerate's offloading hook) or a forward replaced on the instance."""
    from torch.nn.modules import module as nn_module
    return bool(base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook")
                or "forward" in base.__dict__ or nn_module._global_forward_hooks
                or nn_module._global_forward_pre_hooks)


def _fallback_reason(layer, x, args, kwargs):
    """Why this call cannot be fused (None if it can), and the active adapter otherwise."""
    if layer.disable_adapters:
        return "adapters disabled", None
    if kwargs.get("adapter_names") is not None:
        return "per-call adapter_names", None
    if layer.merged:
        return "adapter merged", None
    if args or any(v is not None for k, v in kwargs.items() if k != "adapter_names"):
        return "extra forward arguments", None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters", None
    adapter = active[0]
    if adapter in getattr(layer, "lora_variant", {}):
        return f"LoRA variant {type(layer.lora_variant[adapter]).__name__}", None
    if getattr(layer, "use_dora", {}).get(adapter, False):
        return "DoRA", None
    base = layer.get_base_layer()
    if not (type(base) is nn.Linear or is_conv1d(base)):
        return f"base layer {type(base).__name__}", None
    if not _plain_weight(base.weight) or (base.bias is not None and not _plain_weight(base.bias)):
        return "quantized, sharded or empty base weight", None
    if _base_is_hooked(base):
        return "hooks on the base layer", None
    if base.weight.device != x.device:
        return f"base weight on {base.weight.device}, input on {x.device}", None
    if not (_plain_weight(layer.lora_A[adapter].weight) and _plain_weight(layer.lora_B[adapter].weight)):
        return "sharded or empty adapter weight", None
    if type(layer.lora_dropout[adapter]) not in (nn.Dropout, nn.Identity):
        return f"dropout module {type(layer.lora_dropout[adapter]).__name__}", None
    return None, adapter


class FastLoraPeftLinear(PeftLoraLinear):
    """A PEFT LoRA ``Linear`` whose forward runs fastlora when it can (see the module doc).
    Instances are made by :func:`patch_peft_model` switching ``__class__``; nothing else
    changes."""

    def forward(self, x, *args, **kwargs):
        reason, adapter = _fallback_reason(self, x, args, kwargs)
        if reason is not None:
            self._fastlora_fallback(reason)
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        weight = base.weight.t() if self.fan_in_fan_out else base.weight
        lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
        scaling = self.scaling[adapter]
        bias = base.bias
        if getattr(self, "lora_bias", {}).get(adapter, False) and lora_B.bias is not None:
            extra = scaling * lora_B.bias
            bias = extra if bias is None else bias + extra.to(bias.dtype)
        if bias is not None and bias.dtype != weight.dtype:
            bias = bias.to(weight.dtype)
        dropout = self.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        return lora_linear(x, weight, lora_A.weight, lora_B.weight, scaling, bias, dropout_p=p,
                           training=dropout.training)

    def _fastlora_fallback(self, reason):
        name = getattr(self, "_fastlora_name", "?")
        report = getattr(self, "_fastlora_report", None)
        if report is not None:
            report.fallbacks[(name, reason)] += 1
        warned = self.__dict__.setdefault("_fastlora_warned", set())
        if reason not in warned:
            warned.add(reason)
            warnings.warn(f"fastlora: {name} runs PEFT's own forward ({reason})", stacklevel=3)


def patch_peft_model(model):
    """Make every PEFT LoRA ``Linear`` of ``model`` run :func:`fastlora.lora_linear` when possible.

    Args:
        model: a ``peft.PeftModel`` (or any module holding PEFT LoRA layers).

    Returns:
        :class:`PatchReport` listing patched layers, layers skipped (other LoRA layer types, e.g.
        Embedding, Conv2d, bitsandbytes / quantized variants) with the reason, and a live count
        of call-time fallbacks. A warning names the skipped layers. Patching twice is harmless.
    """
    report = getattr(model, "_fastlora_report", None) or PatchReport()
    for name, module in model.named_modules():
        if isinstance(module, FastLoraPeftLinear):
            if name not in report.patched:
                report.patched.append(name)
            continue
        if type(module) is PeftLoraLinear:
            module.__class__ = FastLoraPeftLinear
            module._fastlora_name = name
            module._fastlora_report = report
            report.patched.append(name)
        elif isinstance(module, BaseTunerLayer) and type(module).__module__.startswith("peft.tuners.lora"):
            report.skipped[name] = f"unsupported LoRA layer type {type(module).__module__}.{type(module).__name__}"
    model._fastlora_report = report
    if report.skipped:
        warnings.warn(f"fastlora: {len(report.skipped)} LoRA layer(s) keep PEFT's forward: "
                      + ", ".join(f"{n} ({why})" for n, why in report.skipped.items()), stacklevel=2)
    return report


def unpatch_peft_model(model):
    """Undo :func:`patch_peft_model`: every patched layer runs PEFT's forward again.
    Returns the names of the layers restored."""
    restored = []
    for name, module in model.named_modules():
        if isinstance(module, FastLoraPeftLinear):
            module.__class__ = PeftLoraLinear
            for attr in ("_fastlora_name", "_fastlora_report", "_fastlora_warned"):
                module.__dict__.pop(attr, None)
            restored.append(name)
    model.__dict__.pop("_fastlora_report", None)
    return restored
