"""One LoRA training step under the scale-out engines: PEFT against PEFT patched by fastlora.

A Llama decoder stack built from a config (random init, no download; SmolLM2-135M's layer
dimensions by default: hidden 576, intermediate 1536, 9 heads, 3 KV heads, vocabulary cut to
4096 so the LM head, identical in both, does not dominate), LoRA r=16 on q/k/v/o/gate/up/down,
dropout 0.05, trained data-parallel on ``--nproc`` ranks (gloo on a CPU, NCCL on GPUs) under each
engine of ``--engines``:

  ddp     torch DDP
  zero2   DeepSpeed ZeRO-2
  zero3   DeepSpeed ZeRO-3, every parameter partitioned (stage3_param_persistence_threshold 0)
  fsdp1   FSDP1 with the wrap policy transformers' Trainer gives a PEFT model (PEFT's
          fsdp_auto_wrap_policy: every lora_A / lora_B its own unit), use_orig_params=True

For each engine both variants (``peft``, ``peft+fastlora``) are built and wrapped, then their
steps are interleaved (round robin, a barrier around each timed step) so load drift hits both
alike. A step is forward, loss, backward and the optimizer step. Prints and appends to
``<out>/engines.csv`` the median step time with p20 / p80 over ``--steps`` steps (after 2
warm-up steps), the fastlora report's fused and fallen-back calls, and the memory autograd holds
for the backward once the forward has returned (``saved_mib``: the distinct storages of every tensor
saved for backward, measured in the second warm-up step, after the engine has released what it
gathered; a ZeRO-3 or FSDP parameter saved by a layer counts with its size at that moment), with
the patched model's difference from PEFT's (``saved_vs_peft_mib``).

    python -m bench.bench_engines [--engines ddp,zero2,zero3,fsdp1] [--layers 4] [--batch 2]
        [--seq 128] [--steps 10] [--nproc 2] [--out bench/results/cpu-engines] [--smoke]
"""
import argparse
import collections
import copy
import csv
import functools
import os
import statistics
import subprocess
import sys
import time

import torch

COLUMNS = ["date", "commit", "gpu", "torch", "triton", "deepspeed", "engine", "variant", "ranks", "layers", "hidden",
           "intermediate", "batch_per_rank", "seq", "r", "dropout", "steps", "step_ms_median", "step_ms_p20",
           "step_ms_p80", "fused_calls_per_step", "fallbacks", "vs_peft", "saved_mib", "saved_vs_peft_mib", "smoke"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.bench_engines", description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="ddp,zero2,zero3,fsdp1")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu-engines"))
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny model and 2 steps: checks the harness runs; not performance figures")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads = 1, 64, 128, 4, 2
        args.vocab, args.seq, args.steps = 128, 16, 2
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available()
                                                       else "cuda"), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port",
           "29547", "-m", "bench.bench_engines", "--worker", *(argv if argv is not None else sys.argv[1:])]
    return subprocess.run(cmd, env=env, cwd=root).returncode


def build(args):
    import peft
    import transformers
    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.seq, 128),
                                   attn_implementation="sdpa")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    lora = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout, target_modules=TARGETS)
    return peft.get_peft_model(copy.deepcopy(base), lora), peft.get_peft_model(base, lora)


def wrap(engine, model, device):
    """``(module to call, backward(loss), step())`` of ``model`` under ``engine``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if engine.startswith("zero"):
        import deepspeed
        # the batch size is only checked for consistency (the step's batch is passed in whole)
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
                  "zero_optimization": {"stage": int(engine[-1]), "stage3_param_persistence_threshold": 0}}
        eng, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-4), config=config)
        return eng, eng.backward, eng.step
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        module = DDP(model.to(device))
    elif engine == "fsdp1":
        import types

        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from transformers.distributed.fsdp import update_fsdp_plugin_peft
        acc = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=types.SimpleNamespace()))
        update_fsdp_plugin_peft(model, acc)  # the policy transformers' Trainer installs
        module = FSDP(model, auto_wrap_policy=acc.state.fsdp_plugin.auto_wrap_policy, use_orig_params=True,
                      device_id=device)
    else:
        raise SystemExit(f"--engines: unknown engine {engine!r} (ddp, zero2, zero3, fsdp1)")
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.step()
        opt.zero_grad(set_to_none=True)
    return module, lambda loss: loss.backward(), step


def saved_bytes(forward):
    """``(result of forward(), bytes)``: the bytes of the distinct storages autograd holds for the
    backward once ``forward()`` has returned (every tensor a node saved, read after the call, so a
    parameter an engine gathered for the forward and has released since counts as released)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    storages = {}
    for t in saved:
        st = t.untyped_storage()
        if st.nbytes():
            storages[(st.device, st.data_ptr())] = st.nbytes()
    saved.clear()
    return out, sum(storages.values())


def _quantiles(times):
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def worker(args):
    import torch.distributed as dist

    import fastlora
    import fastlora.peft
    from bench.bench_lora_linear import environment
    cuda = torch.cuda.is_available()
    if any(e.startswith("zero") for e in args.engines.split(",")):
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    else:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    calls = collections.Counter()
    fused = fastlora.peft._fused

    @functools.wraps(fused)
    def counted(*a, **k):
        calls["fused"] += 1
        return fused(*a, **k)
    fastlora.peft._fused = counted
    env = environment(device)
    try:
        import deepspeed
        env["deepspeed"] = deepspeed.__version__
    except ImportError:
        env["deepspeed"] = ""
    g = torch.Generator().manual_seed(1 + rank)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    rows = []
    for engine in args.engines.split(","):
        plain, patched = build(args)
        report = fastlora.patch_peft_model(patched)
        runs, memory = {}, {}
        for name, model in (("peft", plain), ("peft+fastlora", patched)):
            if cuda and not engine.startswith("zero"):  # DeepSpeed places the model itself
                model.to(device)
            module, backward, step = wrap(engine, model, device)

            def one(module=module, backward=backward, step=step, name=name, measure=False):
                if measure:
                    loss, memory[name] = saved_bytes(lambda: module(input_ids=ids, labels=ids).loss)
                else:
                    loss = module(input_ids=ids, labels=ids).loss
                backward(loss)
                step()
            runs[name] = one
        times = {name: [] for name in runs}
        for i in range(args.steps + 2):  # 2 warm-up rounds
            for name, one in runs.items():
                dist.barrier()
                if cuda:
                    torch.cuda.synchronize(device)
                calls.clear()
                t0 = time.perf_counter()
                one(measure=i == 1)  # the second warm-up step: memory (no timing taken)
                if cuda:
                    torch.cuda.synchronize(device)
                dist.barrier()
                if i >= 2:
                    times[name].append((time.perf_counter() - t0) * 1e3)
                if name == "peft+fastlora":
                    fused_per_step = calls["fused"]
        base_median = None
        for name in runs:
            med, p20, p80 = _quantiles(times[name])
            base_median = med if name == "peft" else base_median
            row = {**env, "engine": engine, "variant": name, "ranks": dist.get_world_size(), "layers": args.layers,
                   "hidden": args.hidden, "intermediate": args.intermediate, "batch_per_rank": args.batch,
                   "seq": args.seq, "r": args.r, "dropout": args.dropout, "steps": args.steps,
                   "step_ms_median": f"{med:.1f}", "step_ms_p20": f"{p20:.1f}", "step_ms_p80": f"{p80:.1f}",
                   "fused_calls_per_step": fused_per_step if name == "peft+fastlora" else 0,
                   "fallbacks": sum(report.fallbacks.values()) if name == "peft+fastlora" else "",
                   "vs_peft": f"{med / base_median:.3f}", "saved_mib": f"{memory[name] / 2**20:.2f}",
                   "saved_vs_peft_mib": f"{(memory[name] - memory['peft']) / 2**20:+.2f}", "smoke": args.smoke}
            rows.append(row)
            if rank == 0:
                print(f"{engine:6s} {name:14s} step {med:8.1f} ms (p20 {p20:.1f}, p80 {p80:.1f})  "
                      f"x{med / base_median:.3f} of peft  fused calls/step {row['fused_calls_per_step']}  "
                      f"fallbacks {row['fallbacks']}  saved for backward {row['saved_mib']} MiB "
                      f"({row['saved_vs_peft_mib']} vs peft)", flush=True)
        del runs, plain, patched
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "engines.csv")
        old = []
        if os.path.exists(path):
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames != COLUMNS:  # an older file: rewritten with today's columns (new ones empty)
                    old = list(reader)
        with open(path, "w" if old or not os.path.exists(path) else "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            if f.mode == "w":
                w.writeheader()
            w.writerows(old + rows)
        print(f"appended {len(rows)} rows to {path}" + (" (smoke run: not performance figures)" if args.smoke else ""))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
