"""End-to-end: one LoRA training step (and ``generate()``) of a Llama decoder stack.

A transformers ``LlamaForCausalLM`` built from a config (random init, no download). GPU default
(``--shape llama3-8b``): Llama-3-8B layer dimensions (hidden 4096, intermediate 14336, 32 heads,
8 KV heads; a few layers) in bf16 with PEFT's default fp32 adapters under bf16 autocast. CPU
(``--shape smollm2-135m``): SmolLM2-135M's whole model (30 layers, hidden 576, intermediate 1536,
9 heads, 3 KV heads, vocabulary 49152) in fp32, as a CPU user trains it. LoRA r=16, alpha=32,
dropout 0.1 (``--dropout``) on q/k/v/o/gate/up/down:

  no-lora        the frozen model; the input embeddings require grad, so backward runs through
                 every layer (the activation gradients LoRA training needs) with no weight grads
  peft           PEFT
  peft+fastlora  the same PEFT model patched by ``fastlora.patch_peft_model``

Each step: forward, loss, backward, AdamW step (LoRA parameters). Reports median step time,
tokens/s and peak memory; appends to ``<out>/e2e.csv``. At llama3-8b the vocabulary is cut to
4096 so that the LM head (identical in all three) does not dominate the step. On a CPU the
variants' steps are interleaved (round robin), so load drift hits all three alike.
``--generate N``: also greedy ``generate()`` of N new tokens (batch 1, eval mode, KV cache) with
peft and peft+fastlora, interleaved, median of ``--steps`` runs; appends to ``<out>/generate.csv``.

    python -m bench.bench_e2e [--layers 2] [--batch 4] [--seq 2048] [--steps 10] [--out DIR]
    python -m bench.bench_e2e --shape smollm2-135m --batch 4 --seq 128 --steps 11 --dropout 0.05 --generate 32  # CPU
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
COLUMNS = ["date", "commit", "gpu", "torch", "triton", "shape", "dtype", "variant", "layers", "batch", "seq", "tokens",
           "r", "dropout", "steps", "step_ms_median", "step_ms_p20", "step_ms_p80", "tokens_per_s", "peak_mem_mb",
           "smoke"]
GEN_COLUMNS = ["date", "commit", "gpu", "torch", "triton", "shape", "dtype", "variant", "layers", "prompt",
               "new_tokens", "r", "steps", "gen_ms_median", "gen_ms_p20", "gen_ms_p80", "tokens_per_s", "smoke"]
# published configs (transformers' config.json of each model)
SHAPES = {"llama3-8b": dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=4096, layers=2, tied=False),
          "smollm2-135m": dict(hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152, layers=30, tied=True)}


def build(args, device):
    import transformers
    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 128), attn_implementation="sdpa",
        tie_word_embeddings=SHAPES[args.shape]["tied"] and not args.smoke)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(device=device, dtype=args.dtype)


def variants(base, args):
    import peft

    import fastlora
    frozen = base
    for p in frozen.parameters():
        p.requires_grad_(False)
    cfg = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout, target_modules=TARGETS)
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
    return (*_quantiles(times), peak)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.bench_e2e", description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--layers", type=int, help="decoder layers (default: 2 at llama3-8b, all 30 at smollm2-135m)")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--generate", type=int, default=0, metavar="N", help="also time generate() of N new tokens")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--smoke", action="store_true", help="CPU: a tiny Llama, 2 steps; no speed claims")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    shape = SHAPES[args.shape]
    args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab = (
        shape[k] for k in ("hidden", "intermediate", "heads", "kv_heads", "vocab"))
    args.layers = args.layers or shape["layers"]
    args.dtype = torch.bfloat16 if torch.cuda.is_available() and args.shape == "llama3-8b" else torch.float32
    if args.smoke:
        args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab = 64, 96, 4, 2, 128
        args.layers, args.batch, args.seq, args.steps, args.dtype = 1, 2, 16, 2, torch.float32
    args.dtype_name = str(args.dtype).replace("torch.", "")
    return args


def _quantiles(times):
    times = sorted(times)
    return statistics.median(times), times[len(times) // 5], times[(4 * len(times)) // 5]


def measure_interleaved(steps_by_name, rounds):
    """CPU: two warm-up calls each, then ``rounds`` rounds of one timed call per variant (round
    robin, so drift in the machine's load hits every variant alike). {name: (median, p20, p80)} ms."""
    for step in steps_by_name.values():
        step()
        step()
    times = {name: [] for name in steps_by_name}
    for _ in range(rounds):
        for name, step in steps_by_name.items():
            t0 = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: _quantiles(t) for name, t in times.items()}


def gen_fn(model, args, device):
    """Greedy ``generate()`` of ``args.generate`` new tokens after a 16-token prompt, batch 1."""
    g = torch.Generator(device="cpu").manual_seed(2)
    ids = torch.randint(1, args.vocab, (1, 16), generator=g).to(device)

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.generate,
                                 min_new_tokens=args.generate, do_sample=False, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + args.generate
    return run


def _append(path, columns, rows):
    new = not os.path.exists(path)
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != columns:
            raise ValueError(f"{path}: its columns {header} are not this version's {columns}; pass another --out")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in columns})


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    env = environment(device)
    models = variants(build(args, device), args)
    tokens = args.batch * args.seq
    os.makedirs(args.out, exist_ok=True)
    rows = []
    if args.smoke:
        print("smoke mode: a tiny Llama on the CPU; these timings are not performance figures.")
    print(f"{env['gpu']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']} | "
          f"{args.layers} Llama layers at hidden {args.hidden} ({args.shape}), {tokens} tokens/step, r={args.r}, "
          f"dropout {args.dropout}, {args.dtype_name}")

    def row(name, med, p20, p80, peak):
        rows.append({**env, "shape": args.shape, "dtype": args.dtype_name, "variant": name,
                     "layers": args.layers, "batch": args.batch, "seq": args.seq, "tokens": tokens, "r": args.r,
                     "dropout": args.dropout, "steps": args.steps, "step_ms_median": med, "step_ms_p20": p20, "step_ms_p80": p80,
                     "tokens_per_s": tokens / med * 1e3, "peak_mem_mb": peak, "smoke": args.smoke})
        print(f"  {name:14} step {med:9.2f} ms (p20 {p20:.2f}, p80 {p80:.2f}) | {tokens / med * 1e3:10.0f} tokens/s"
              f" | peak {peak:9.1f} MB")

    if device.type == "cpu":  # interleaved: all three models stay in memory
        for m in models.values():
            m.train()
        steps = {name: step_fn(name, m, args, device) for name, m in models.items()}
        try:
            for name, (med, p20, p80) in measure_interleaved(steps, args.steps).items():
                row(name, med, p20, p80, float("nan"))
        except Exception as e:  # round robin: one failing variant stops the comparison; say so and go on
            print(f"  interleaved training steps failed: {type(e).__name__}: {str(e)[:300]}")
    else:
        for name in list(models):
            try:
                med, p20, p80, peak = measure(step_fn(name, models[name], args, device), args.steps, device)
            except Exception as e:  # report and go on: the other variants still count
                print(f"  {name:14} failed: {type(e).__name__}: {str(e)[:300]}")
                models[name] = None  # and no generate() timing for it
                continue
            row(name, med, p20, p80, peak)
            if not args.generate:
                models[name] = None  # free before the next variant
                torch.cuda.empty_cache()
    by = {r["variant"]: r for r in rows}
    if {"peft", "peft+fastlora", "no-lora"} <= by.keys():
        print(f"  peft+fastlora vs peft: {by['peft']['step_ms_median'] / by['peft+fastlora']['step_ms_median']:.3f}x "
              f"faster; vs no-lora: {by['peft+fastlora']['step_ms_median'] / by['no-lora']['step_ms_median']:.3f}x the time")
    path = os.path.join(args.out, "e2e.csv")
    _append(path, COLUMNS, rows)
    print(f"rows appended to {path}")
    if args.generate:
        gens = {name: models[name] for name in ("peft", "peft+fastlora") if models.get(name) is not None}
        for m in gens.values():
            m.eval()
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

        def timed(fn):
            def run():
                fn()
                sync()
            return run
        res = measure_interleaved({n: timed(gen_fn(m, args, device)) for n, m in gens.items()}, args.steps)
        grows = []
        for name, (med, p20, p80) in res.items():
            tps = args.generate / med * 1e3
            grows.append({**env, "shape": args.shape, "dtype": args.dtype_name, "steps": args.steps,
                          "variant": name, "layers": args.layers, "prompt": 16,
                          "new_tokens": args.generate, "r": args.r, "gen_ms_median": med, "gen_ms_p20": p20,
                          "gen_ms_p80": p80, "tokens_per_s": tps, "smoke": args.smoke})
            print(f"  generate {name:14} {med:9.1f} ms for {args.generate} tokens (p20 {p20:.1f}, p80 {p80:.1f}) | "
                  f"{tps:7.1f} tokens/s")
        if len(res) == 2:
            print(f"  generate: peft+fastlora {res['peft'][0] / res['peft+fastlora'][0]:.3f}x the speed of peft")
        path = os.path.join(args.out, "generate.csv")
        _append(path, GEN_COLUMNS, grows)
        print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
