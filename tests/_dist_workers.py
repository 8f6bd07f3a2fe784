"""Worker for tests/test_training_setups.py, run by ``python -m torch.distributed.run
--nproc_per_node 2 tests/_dist_workers.py OUT_DIR`` (gloo on CPU). Each scenario trains on this
rank's half of a global batch and saves what the test compares with a single process."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dist_models import GLOBAL_BATCH, build_plain, build_peft, data  # noqa: E402

import fastlora  # noqa: E402


def lora_grads(model):
    out = {}
    for n, p in model.named_parameters():
        if "lora_" in n and p.grad is not None:
            g = p.grad
            out[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def lora_params(model):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters() if "lora_" in n}


def shard(rank, world, x):
    per = GLOBAL_BATCH // world
    return x[rank * per:(rank + 1) * per]


def main(out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}

    # DDP over LoRALinear layers; loss is a sum / GLOBAL_BATCH so DDP's mean matches one process
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = build_plain()
    ddp = DDP(model)
    x, t = data()
    ((ddp(shard(rank, world, x)) - shard(rank, world, t)).pow(2).sum() * world / GLOBAL_BATCH).backward()
    results["ddp"] = lora_grads(model)

    # DDP with an empty batch on rank 1: LoRA grads still arrive (zeros), DDP does not stall
    model = build_plain()
    ddp = DDP(model)
    xe = shard(rank, world, x) if rank == 0 else x[:0]
    te = shard(rank, world, t) if rank == 0 else t[:0]
    ((ddp(xe) - te).pow(2).sum() * world / GLOBAL_BATCH).backward()
    results["ddp_empty"] = lora_grads(model)

    # FSDP2 over LoRALinear layers: grads, one AdamW step, and save_adapter (all ranks call it)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))
    model = build_plain()
    for layer in model:
        if isinstance(layer, fastlora.LoRALinear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ((model(shard(rank, world, x)) - shard(rank, world, t)).pow(2).sum() * world / GLOBAL_BATCH).backward()
    results["fsdp2"] = lora_grads(model)
    opt.step()
    results["fsdp2_step"] = lora_params(model)
    fastlora.save_adapter(model, os.path.join(out, "fsdp2_adapter"))

    # FSDP2 over DoRA LoRALinear layers: grads (the magnitudes' too) and one AdamW step
    model = build_plain(use_dora=True)
    for layer in model:
        if isinstance(layer, fastlora.LoRALinear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ((model(shard(rank, world, x)) - shard(rank, world, t)).pow(2).sum() * world / GLOBAL_BATCH).backward()
    results["fsdp2_dora"] = lora_grads(model)
    opt.step()
    results["fsdp2_dora_step"] = lora_params(model)

    # FSDP2 over PEFT models (LoRA, DoRA) patched by fastlora
    for key, use_dora in (("fsdp2_peft", False), ("fsdp2_peft_dora", True)):
        pm, ids = build_peft(use_dora=use_dora)
        report = fastlora.patch_peft_model(pm)
        for block in pm.base_model.model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(pm, mesh=mesh)
        pm(input_ids=shard(rank, world, ids), labels=shard(rank, world, ids)).loss.backward()
        results[key] = lora_grads(pm)
        results[key + "_fallbacks"] = dict(report.fallbacks)  # empty: fastlora saw full parameters

    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
