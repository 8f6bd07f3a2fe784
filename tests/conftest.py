"""Test setup: with no CUDA device, run fastlora's Triton kernels under the interpreter.

TRITON_INTERPRET must be set before Triton decorates the kernels, i.e. before anything imports
fastlora.kernels; conftest.py is loaded before the test modules, so this is the place.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns that its default changes in 3.10; pin it for reproducible numerics.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (compiled Triton kernels)")
    config.addinivalue_line("markers", "compile_only: compiles kernels for sm_80/86/90 on the CPU")
