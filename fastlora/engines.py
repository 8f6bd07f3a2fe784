"""The fused path inside the engines that shard parameters: DeepSpeed ZeRO-3, FSDP1, FSDP2.

A LoRA layer's fused call reads ``W``, ``b``, ``A``, ``B`` (and DoRA's magnitude ``m``) in one
op, while the layer's own forward under PEFT reaches them through the submodules
``base_layer``, ``lora_A``, ``lora_B``, ``lora_magnitude_vector``. An engine that gathers a
parameter only when the submodule holding it runs its forward (and frees it afterwards) hands
the fused call empty or sharded tensors. This module lets the engine do its own gathering for the
fused call, through the engine's own mechanisms, so that its prefetch, release, re-gather for
backward and gradient reduction keep working unchanged:

- **DeepSpeed ZeRO-3** (``deepspeed/runtime/zero/parameter_offload.py``): every module has
  fetch / release hooks for its *own* parameters. :func:`zero3_prepare` registers the layer's
  parameters as *external parameters* of the LoRA layer
  (``deepspeed.zero.register_external_parameter``, DeepSpeed's API for a parameter used outside
  its module's forward): from then on DeepSpeed gathers them in the layer's pre-forward hook,
  gathers them again before the layer's backward (its pre-backward hook on the layer's output),
  releases them after each, and reduce-scatters their gradients with its per-parameter hooks.
  The call that registers them (the first, during the first step) gathers the ones not yet
  available itself (``param.all_gather()``, as DeepSpeed does for a parameter it finds used
  outside its module); the layer's post-forward hook releases them. The fused op saves the
  Parameter objects themselves for backward (no view of the gathered data), so no full weight
  outlives the layer's forward or backward. Not a ZeRO-3 *leaf module*: DeepSpeed reduces a leaf
  module's gradients in a full backward hook, which fires before the layer's backward when no
  input of the layer requires a gradient (the first decoder layer of a PEFT model), and then
  the adapters' gradients arrive after their parameters were released.
- **FSDP1** (``FullyShardedDataParallel``; the Trainer wraps every PEFT model with PEFT's
  ``fsdp_auto_wrap_policy``, which makes each ``lora_A.<adapter>`` / ``lora_B.<adapter>`` (and
  DoRA magnitude) its own FSDP unit): the fused call runs inside those units' own pre-forward
  (unshard, post-backward hook on the flat parameter, input cast) and post-forward (reshard,
  pre-backward unshard hook on the output), exactly the steps of
  ``FullyShardedDataParallel.forward`` around its wrapped module, so the gradients reach each
  unit's ``FlatParameter`` and its reduce-scatter as they would through PEFT's forward.
- **FSDP2** (``fully_shard``): a sharded submodule (``fully_shard(lora_A)``) is entered the same
  way through its ``FSDPState`` pre- / post-forward hooks.

Parameters already full when the layer runs (ZeRO-1/2, DDP, FSDP1 and FSDP2 sharded per block)
need none of this. :func:`engine_reason` names the engine and the remedy when a layer's state
still cannot run fused.
"""
import contextlib

import torch
from torch import nn

ZERO3_REMEDY = ("call fastlora.patch_peft_model(model) on the model that deepspeed.initialize / the Trainer "
                "receives")


# ------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3
# ------------------------------------------------------------------------------------------
def is_zero3_param(t):
    """Whether ``t`` is a DeepSpeed ZeRO-3 parameter (partitioned across ranks)."""
    return t is not None and hasattr(t, "ds_id") and hasattr(t, "ds_status")


def zero3_managed(module):
    """Whether DeepSpeed ZeRO-3 manages ``module`` (its hooks are registered on it)."""
    return hasattr(module, "ds_id") and "ds_external_parameters" in dir(module)


def _is_zero3_hook(hook, depth=0):
    """A hook defined by DeepSpeed's ZeRO-3 runtime, possibly behind DeepSpeed's profiling wrapper
    (``deepspeed.utils.nvtx.instrument_w_nvtx``, a closure over the hook)."""
    module = getattr(hook, "__module__", None) or ""
    if module.startswith("deepspeed.runtime.zero"):
        return True
    if depth > 2 or not module.startswith("deepspeed.utils"):
        return False
    inner = [getattr(hook, "__wrapped__", None)] + [c.cell_contents for c in (getattr(hook, "__closure__", None) or ())
                                                   if callable(c.cell_contents)]
    return any(f is not None and _is_zero3_hook(f, depth + 1) for f in inner)


def zero3_hooks_only(module):
    """Whether every forward hook on ``module`` is DeepSpeed ZeRO-3's parameter fetch / release
    (which the fused call replaces by the layer's own, see :func:`zero3_prepare`)."""
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    return all(_is_zero3_hook(h) for h in hooks) and "forward" not in module.__dict__ \
        and "_hf_hook" not in module.__dict__


def zero3_prepare(layer, params):
    """Make DeepSpeed ZeRO-3 gather ``params`` (the fused call's parameters, None entries
    ignored) with ``layer``: register the ones not yet registered as external parameters of
    ``layer`` and, for this call, gather those not available. Returns None when every parameter
    is now available, else the reason this call cannot run fused. A collective (all ranks run
    the same layers)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus, register_external_parameter
    zero3 = [p for p in params if is_zero3_param(p)]
    if not zero3:
        return None
    if not zero3_managed(layer):
        return ("DeepSpeed ZeRO-3 parameters in a layer DeepSpeed does not manage: "
                f"{ZERO3_REMEDY}, and run that model")
    registered = layer.__dict__.get("_external_params") or {}
    for p in zero3:
        if id(p) not in registered:
            register_external_parameter(layer, p)
    if any(p.ds_status == ZeroParamStatus.INFLIGHT for p in zero3):
        return "DeepSpeed ZeRO-3 gather in flight"
    pending = [p for p in zero3 if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if pending:
        pending[0].all_gather(param_list=pending)
    return None


@contextlib.contextmanager
def zero3_gathered(params):
    """Full ZeRO-3 ``params`` for the block (DeepSpeed's ``GatheredParameters``, read-only); a
    no-op for other tensors. A collective: every rank must enter it."""
    zero3 = [p for p in params if is_zero3_param(p)]
    if not zero3:
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
        yield


# ------------------------------------------------------------------------------------------
# FSDP1 and FSDP2 units around a LoRA submodule
# ------------------------------------------------------------------------------------------
def _fsdp1_class():
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch without distributed
        return None
    return FullyShardedDataParallel


def _fsdp2_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    return FSDPModule


class Unit:
    """A LoRA submodule that is its own FSDP unit: ``inner`` is the module holding the weight
    (the wrapped module for FSDP1, the module itself for FSDP2); :meth:`enter` / :meth:`exit`
    run the unit's pre- and post-forward around a call that uses ``inner``'s parameters."""
    __slots__ = ("module", "inner", "kind")

    def __init__(self, module, inner, kind):
        self.module, self.inner, self.kind = module, inner, kind

    def enter(self, x):
        """Unshard; returns the input as the unit's forward would pass it on (cast under mixed
        precision, and carrying FSDP's post-backward hook)."""
        if self.kind == "fsdp1":
            from torch.distributed.fsdp import _runtime_utils as rt
            m = self.module
            args, _ = rt._root_pre_forward(m, m, (x,), {})
            args, _ = rt._pre_forward(m, m._handle, rt._pre_forward_unshard, m._fsdp_wrapped_module, args, {})
            return args[0]
        state = self.module._get_fsdp_state()
        args, _ = state._pre_forward(self.module, (x,), {})
        return args[0]

    def exit(self, x, y):
        """Reshard; returns ``y`` with the unit's pre-backward (re-unshard) hook on it."""
        if self.kind == "fsdp1":
            from torch.distributed.fsdp import _runtime_utils as rt
            m = self.module
            return rt._post_forward(m, m._handle, rt._post_forward_reshard, m, (x,), y)
        return self.module._get_fsdp_state()._post_forward(self.module, (x,), y)


def fsdp_unit(module):
    """The :class:`Unit` of ``module`` if it is an FSDP1 wrapper or an FSDP2 ``fully_shard``
    module, else None."""
    fsdp1 = _fsdp1_class()
    if fsdp1 is not None and isinstance(module, fsdp1):
        return Unit(module, module._fsdp_wrapped_module, "fsdp1")
    fsdp2 = _fsdp2_class()
    if fsdp2 is not None and isinstance(module, fsdp2):
        return Unit(module, module, "fsdp2")
    return None


def fsdp2_hooks_only(module):
    """Whether every forward hook on ``module`` is FSDP2's own pre- / post-forward (run by
    :class:`Unit` instead)."""
    for h in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()):
        owner = getattr(h, "__self__", None)
        if owner is None or type(owner).__module__ != "torch.distributed.fsdp._fully_shard._fsdp_state":
            return False
    return "forward" not in module.__dict__


def run_in_units(units, x, fn):
    """``fn(x)`` run as the forward of every FSDP unit in ``units`` (entered in order, exited in
    reverse); returns its output with each unit's backward hooks on it."""
    if not units:
        return fn(x)
    inputs = []
    for u in units:
        inputs.append(x)
        x = u.enter(x)
    y = fn(x)
    for u, x_in in zip(reversed(units), reversed(inputs)):
        y = u.exit(x_in, y)
    return y


# ------------------------------------------------------------------------------------------
# What to tell the user
# ------------------------------------------------------------------------------------------
def engine_reason(weight, generic):
    """``generic`` (e.g. "sharded or empty adapter weight") with the engine that sharded
    ``weight`` and the remedy, where one is recognised."""
    if is_zero3_param(weight):
        return f"{generic} (DeepSpeed ZeRO-3, not gathered with this layer: {ZERO3_REMEDY})"
    if type(weight).__name__ == "DTensor" or hasattr(weight, "full_tensor"):
        return (f"{generic} (a sharded DTensor: FSDP2 fully_shard or tensor parallelism outside this layer; "
                "fully_shard the LoRA layer or its decoder block, or its lora_A / lora_B modules, not the "
                "parameters alone)")
    if getattr(weight, "_fsdp_flattened", False):  # FSDP1 marks the parameters it flattens
        return (f"{generic} (FSDP1: the shard of a unit that is not running; wrap the decoder blocks "
                "(transformer_auto_wrap_policy, or the Trainer's PEFT policy), the LoRA layer, or its "
                "lora_A / lora_B modules as units)")
    return generic
