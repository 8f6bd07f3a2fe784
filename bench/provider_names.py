"""The names of the per-layer benchmark's providers (bench/providers.py builds them), in one
place that imports nothing heavy: the command line (bench/bench_lora_linear.py) needs them
before fastlora's kernels may be imported (``--smoke`` sets TRITON_INTERPRET first)."""

PROVIDERS = ("base", "eager", "peft", "peft-fp32", "compile", "addmm", "fastlora", "fastlora-fused", "fastlora-hybrid",
             "fastlora-fp32", "qlora-base", "peft-qlora", "fastlora-qlora", "peft-dora", "fastlora-dora")
QLORA_PROVIDERS = ("qlora-base", "peft-qlora", "fastlora-qlora")  # NF4 base weight (bitsandbytes)
DORA_PROVIDERS = ("peft-dora", "fastlora-dora")  # y = g ⊙ (LoRA's), g = m / ‖W + s·B·A‖, m trained
BASES = ("base", "qlora-base")  # no LoRA branch
