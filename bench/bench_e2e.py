"""End-to-end: one LoRA training step of a Llama decoder stack at Llama-3-8B layer dimensions.

A transformers ``LlamaForCausalLM`` built from a config (hidden 4096, intermediate 14336, 32
heads, 8 KV heads; a few layers; random init, no download) in bf16, LoRA r=16, alpha=32,
dropout 0.1 on q/k/v/o/gate/up/down with PEFT's default fp32 adapters under bf16 autocast:

  no-lora        the frozen model; the input embeddings require grad, so backward runs through
                 every layer (the activation gradients LoRA training needs) with no weight grads
  peft           PEFT
  peft+fastlora  the same PEFT model patched by ``fastlora.patch_peft_model``

Each step: forward, loss, backward, AdamW step (LoRA parameters). Reports median step time,
tokens/s and peak memory; appends to ``<out>/e2e.csv``. The vocabulary is cut to 4096 so that
the LM head (identical in all three) does not dominate the step.

    python -m bench.bench_e2e [--layers 2] [--batch 4] [--seq 2048] [--steps 10] [--out DIR]
"""
import argparse
import copy
import csv
import os
import statistics
import sys
import time

import torch

from .bench_lora_linear import environment

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COLUMNS = ["date", "commit", "gpu", "torch", "triton", "variant", "layers", "batch", "seq", "tokens", "r",
           "step_ms_median", "step_ms_p20", "step_ms_p80", "tokens_per_s", "peak_mem_mb", "smoke"]


def build(args, device):
    import transformers
    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 128), attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(device=device, dtype=args.dtype)


def variants(base, args):
    import peft

    import fastlora
    frozen = base
    for p in frozen.parameters():
        p.requires_grad_(False)
    cfg = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.1, target_modules=TARGETS)
    plain = peft.get_peft_model(copy.deepcopy(base), cfg)
    patched = peft.get_peft_model(copy.deepcopy(base), cfg)
    fastlora.patch_peft_model(patched)
    return {"no-lora": frozen, "peft": plain, "peft+fastlora": patched}


def step_fn(name, model, args, device):
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    autocast = torch.autocast(device.type, dtype=args.dtype, enabled=args.dtype != torch.float32)

    def step():
        with autocast:
            if name == "no-lora":
                emb = model.get_input_embeddings()(ids).detach().requires_grad_()
                loss = model(inputs_embeds=emb, labels=ids).loss
            else:
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def measure(step, steps, device):
    step()  # warm-up: compilation, autotuning
    step()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated(device) - base_mem) / 2 ** 20 if device.type == "cuda" else float("nan")
    times.sort()
    return statistics.median(times), times[len(times) // 5], times[(4 * len(times)) // 5], peak


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.bench_e2e", description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--smoke", action="store_true", help="CPU: a tiny Llama, 2 steps; no speed claims")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab = 4096, 14336, 32, 8, 4096
    args.dtype = torch.bfloat16
    if args.smoke:
        args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab = 64, 96, 4, 2, 128
        args.layers, args.batch, args.seq, args.steps, args.dtype = 1, 2, 16, 2, torch.float32
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    env = environment(device)
    models = variants(build(args, device), args)
    tokens = args.batch * args.seq
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "e2e.csv")
    new = not os.path.exists(path)
    rows = []
    if args.smoke:
        print("smoke mode: a tiny Llama on the CPU; these timings are not performance figures.")
    print(f"{env['gpu']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']} | "
          f"{args.layers} Llama layers at hidden {args.hidden}, {tokens} tokens/step, r={args.r}")
    for name, model in models.items():
        try:
            med, p20, p80, peak = measure(step_fn(name, model, args, device), args.steps, device)
        except Exception as e:  # report and go on: the other variants still count
            print(f"  {name:14} failed: {type(e).__name__}: {str(e)[:300]}")
            models[name] = None
            continue
        rows.append({**env, "variant": name, "layers": args.layers, "batch": args.batch, "seq": args.seq,
                     "tokens": tokens, "r": args.r, "step_ms_median": med, "step_ms_p20": p20, "step_ms_p80": p80,
                     "tokens_per_s": tokens / med * 1e3, "peak_mem_mb": peak, "smoke": args.smoke})
        print(f"  {name:14} step {med:9.2f} ms (p20 {p20:.2f}, p80 {p80:.2f}) | {tokens / med * 1e3:10.0f} tokens/s"
              f" | peak {peak:9.1f} MB")
        models[name] = None  # free before the next variant
        if device.type == "cuda":
            torch.cuda.empty_cache()
    by = {r["variant"]: r for r in rows}
    if {"peft", "peft+fastlora", "no-lora"} <= by.keys():
        print(f"  peft+fastlora vs peft: {by['peft']['step_ms_median'] / by['peft+fastlora']['step_ms_median']:.3f}x "
              f"faster; vs no-lora: {by['peft+fastlora']['step_ms_median'] / by['no-lora']['step_ms_median']:.3f}x the time")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
