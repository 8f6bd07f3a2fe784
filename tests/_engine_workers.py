"""Worker for tests/test_engines.py: ``DS_ACCELERATOR=cpu python -m torch.distributed.run
--nproc_per_node 2 tests/_engine_workers.py OUT_DIR`` (gloo on CPU).

Each scenario trains a PEFT model patched by fastlora (or a model of fastlora.LoRALinear layers)
for STEPS AdamW steps under one engine, each rank on its half of the global batch, and saves the
mean loss of each step, the final adapter weights and how many calls ran fused or fell back; the
test compares them with one process on the whole batch. A scenario that raises saves its
traceback instead, so one broken engine does not hide the others."""
import collections
import functools
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dist_models import GLOBAL_BATCH, build_peft, build_plain, data  # noqa: E402

import fastlora  # noqa: E402
import fastlora.peft  # noqa: E402

STEPS = 3
LR = 1e-2
CALLS = collections.Counter()


def _count(fn, key):
    @functools.wraps(fn)
    def counted(*args, **kwargs):
        CALLS[key] += 1
        return fn(*args, **kwargs)
    return counted


# every fused call of a patched PEFT layer, and every LoRALinear forward that reaches the op
fastlora.peft._fused = _count(fastlora.peft._fused, "fused")
fastlora.LoRALinear._lora_forward = _count(fastlora.LoRALinear._lora_forward, "fused")
_grouped = fastlora.group.grouped_lora_linear


def _count_grouped(input, siblings, **kwargs):  # a sibling group's members (fastlora/group.py) count one each
    CALLS["fused"] += len(siblings)
    return _grouped(input, siblings, **kwargs)


fastlora.group.grouped_lora_linear = _count_grouped


def shard(x):
    per = GLOBAL_BATCH // dist.get_world_size()
    return x[dist.get_rank() * per:(dist.get_rank() + 1) * per]


def mean_over_ranks(t):
    t = t.detach().clone()
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def peft_model(ckpt, use_dora=False):
    pm, ids = build_peft(use_dora=use_dora)
    if ckpt:  # what the Trainer's gradient_checkpointing=True does
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    report = fastlora.patch_peft_model(pm)
    return pm, ids, report


def peft_loss(model, ids):
    x = shard(ids)
    return model(input_ids=x, labels=x).loss


def plain_loss(model, _):
    x, t = data()
    return (model(shard(x)) - shard(t)).pow(2).mean()


def lora_state(model, gather=None):
    """Full adapter tensors by PEFT-style name (``gather``: a context that makes them full)."""
    named = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    with gather([p for _, p in named]) if gather else _nothing():
        out = {}
        for n, p in named:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[_canonical(n)] = t.detach().clone()
        return out


def _canonical(name):
    """A parameter name without the engines' wrapper prefixes (FSDP1, DDP, DeepSpeed)."""
    for junk in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "module."):
        name = name.replace(junk, "")
    return name


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def train_torch(model, loss_fn, ids, params=None):
    opt = torch.optim.AdamW(params or [p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(STEPS):
        loss = loss_fn(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(mean_over_ranks(loss))
    return losses


def ds_config(stage):
    """ZeRO ``stage`` with every ZeRO-3 parameter partitioned (none kept whole for being small) and
    DeepSpeed's default gradient clipping (1.0) off, so that a step is torch.optim.AdamW's on one
    process."""
    return {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // dist.get_world_size(), "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0, "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}


def train_deepspeed(model, loss_fn, ids, stage, before_training=None):
    """STEPS steps of ``model`` under DeepSpeed ZeRO ``stage`` (``before_training(model)`` runs
    after deepspeed.initialize)."""
    import deepspeed
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=LR), config=ds_config(stage))
    if before_training is not None:
        before_training(model)
    losses = []
    for _ in range(STEPS):
        loss = loss_fn(engine, ids)
        engine.backward(loss)
        engine.step()
        losses.append(mean_over_ranks(loss))
    return engine, losses


def zero3_released(model):
    """After a step: every partitioned ZeRO-3 parameter of the LoRA layers is released again
    (no full weight kept past the layer's forward and backward)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    return all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for n, p in model.named_parameters()
               if hasattr(p, "ds_id") and not p.ds_persist and ("lora_" in n or "base_layer" in n))


# ------------------------------------------------------------------------------------------
# Scenarios: name -> function returning {losses, state, fallbacks?, ...}
# ------------------------------------------------------------------------------------------
def deepspeed_peft(stage, ckpt=False, zero_init=False, use_dora=False):
    def run(out):
        if zero_init:  # partitioned at construction (as transformers builds a model under ZeRO-3),
            import deepspeed  # then loaded with the weights of the model built without it
            state = build_peft()[0].state_dict()
            with deepspeed.zero.Init(config_dict_or_path=ds_config(3)):
                pm, ids = build_peft()
            for n, p in pm.named_parameters():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                    p.copy_(state[n])
            report = fastlora.patch_peft_model(pm)
        else:
            pm, ids, report = peft_model(ckpt, use_dora)
        engine, losses = train_deepspeed(pm, peft_loss, ids, stage)
        res = {"losses": losses, "fallbacks": dict(report.fallbacks)}
        if stage == 3:
            import deepspeed
            res["released"] = zero3_released(pm)
            res["state"] = lora_state(pm, lambda ps: deepspeed.zero.GatheredParameters(ps, modifier_rank=None))
        else:
            res["state"] = lora_state(pm)
        return res
    return run


def deepspeed_patched_after_initialize(out):
    """ZeRO-3 with the model patched after deepspeed.initialize (DeepSpeed's hooks already on
    every submodule)."""
    import deepspeed
    pm, ids = build_peft()
    reports = []
    _, losses = train_deepspeed(pm, peft_loss, ids, 3, before_training=lambda m: reports.append(
        fastlora.patch_peft_model(m)))
    return {"losses": losses, "fallbacks": dict(reports[0].fallbacks), "released": zero3_released(pm),
            "state": lora_state(pm, lambda ps: deepspeed.zero.GatheredParameters(ps, modifier_rank=None))}


def deepspeed_plain(out):
    import deepspeed
    model = build_plain()
    _, losses = train_deepspeed(model, plain_loss, None, 3)
    fastlora.save_adapter(model, os.path.join(out, "zero3_adapter"))  # every rank calls it
    return {"losses": losses, "released": zero3_released(model),
            "state": lora_state(model, lambda ps: deepspeed.zero.GatheredParameters(ps, modifier_rank=None))}


def fsdp1_peft(use_orig_params, ckpt=False, use_dora=False):
    """FSDP1 as transformers' Trainer sets it up for a PEFT model: the auto-wrap policy is the one
    ``transformers.distributed.fsdp.update_fsdp_plugin_peft`` installs (PEFT's, which makes every
    lora_A / lora_B its own unit). accelerate enables FSDP only on accelerators, so on a CPU the
    wrap is replayed with that policy rather than through Trainer.train."""
    def run(out):
        import types

        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from transformers.distributed.fsdp import update_fsdp_plugin_peft
        pm, ids, report = peft_model(ckpt, use_dora)
        accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=types.SimpleNamespace()))
        update_fsdp_plugin_peft(pm, accelerator)
        model = FSDP(pm, auto_wrap_policy=accelerator.state.fsdp_plugin.auto_wrap_policy,
                     use_orig_params=use_orig_params, device_id=torch.device("cpu"))
        units = sum(type(m).__name__ == "FullyShardedDataParallel" for n, m in model.named_modules()
                    if n.endswith(("lora_A.default", "lora_B.default", "lora_magnitude_vector.default")))
        losses = train_torch(model, peft_loss, ids)
        with FSDP.summon_full_params(model):
            state = lora_state(model)
        return {"losses": losses, "fallbacks": dict(report.fallbacks), "state": state, "lora_units": units}
    return run


def fsdp2_peft(ckpt=False):
    """FSDP2 with every lora_A / lora_B sharded on its own, then the decoder blocks and the root."""
    def run(out):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        pm, ids, report = peft_model(ckpt)
        for name, m in pm.named_modules():
            if name.endswith(("lora_A.default", "lora_B.default")):
                fully_shard(m, mesh=mesh)
        for block in pm.base_model.model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(pm, mesh=mesh)
        losses = train_torch(pm, peft_loss, ids)
        return {"losses": losses, "fallbacks": dict(report.fallbacks), "state": lora_state(pm)}
    return run


def fsdp2_plain(out):
    """LoRALinear layers whose lora_A / lora_B are sharded on their own."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = build_plain()
    for layer in model:
        if isinstance(layer, fastlora.LoRALinear):
            fully_shard(layer.lora_A, mesh=mesh)
            fully_shard(layer.lora_B, mesh=mesh)
    fully_shard(model, mesh=mesh)
    losses = train_torch(model, plain_loss, None)
    return {"losses": losses, "state": lora_state(model)}


def ddp_peft(ckpt):
    def run(out):
        from torch.nn.parallel import DistributedDataParallel as DDP
        pm, ids, report = peft_model(ckpt)
        model = DDP(pm)
        losses = train_torch(model, peft_loss, ids)
        return {"losses": losses, "fallbacks": dict(report.fallbacks), "state": lora_state(pm)}
    return run


SCENARIOS = {
    "zero2": deepspeed_peft(2),
    "zero2_ckpt": deepspeed_peft(2, ckpt=True),
    "zero3": deepspeed_peft(3),
    "zero3_ckpt": deepspeed_peft(3, ckpt=True),
    "zero3_init": deepspeed_peft(3, zero_init=True),
    "zero3_patched_after_initialize": deepspeed_patched_after_initialize,
    "zero3_plain": deepspeed_plain,
    "zero3_dora": deepspeed_peft(3, use_dora=True),
    "fsdp1_trainer_policy_dora": fsdp1_peft(True, use_dora=True),
    "fsdp1_trainer_policy": fsdp1_peft(True),
    "fsdp1_trainer_policy_ckpt": fsdp1_peft(True, ckpt=True),
    "fsdp1_trainer_policy_flat": fsdp1_peft(False),
    "fsdp2_lora_units": fsdp2_peft(),
    "fsdp2_lora_units_ckpt": fsdp2_peft(ckpt=True),
    "fsdp2_plain_lora_units": fsdp2_plain,
    "ddp_ckpt": ddp_peft(True),
}


def main(out, names):
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for name in names or SCENARIOS:
        CALLS.clear()
        try:
            res = SCENARIOS[name](out)
            res["fused_calls"] = CALLS["fused"]
        except Exception:  # noqa: BLE001 - reported by the test, per scenario
            res = {"error": traceback.format_exc()}
        results[name] = res
        dist.barrier()
    torch.save(results, os.path.join(out, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
