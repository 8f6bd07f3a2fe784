"""``python -m bench``: the LoRA linear benchmark (see bench/bench_lora_linear.py)."""
import sys

from .bench_lora_linear import main

sys.exit(main())
