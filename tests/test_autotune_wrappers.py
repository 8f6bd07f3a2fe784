"""The autotune wrappers a GPU launch uses, checked without a GPU: their keys name real kernel
arguments, pruning works with fastlora's keyword-only launches, and heuristics derive EVEN_*."""
import importlib

import pytest

pytest.importorskip("triton")
from fastlora.kernels import configs  # noqa: E402

_KERNELS = {
    "shrink": ("lora_forward", "_lora_shrink_kernel"),
    "fwd": ("lora_forward", "_lora_linear_fwd_kernel"),
    "bwd_dy": ("lora_backward", "_lora_bwd_dy_kernel"),
    "bwd_dx": ("lora_backward", "_lora_bwd_dx_kernel"),
    "bwd_da": ("lora_backward", "_lora_bwd_da_kernel"),
}


def raw(name):
    module, fn = _KERNELS[name]
    return getattr(importlib.import_module(f"fastlora.kernels.{module}"), fn)


@pytest.mark.parametrize("name", list(_KERNELS))
@pytest.mark.parametrize("arch", configs.ARCH_FAMILIES)
@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_autotune_wrapper_builds_and_prunes(name, arch, itemsize):
    fn = raw(name)
    tuned = configs.autotuned(name, fn, arch, itemsize)  # Triton validates key / reset names here
    cands = configs.configs_for(name, arch, itemsize)
    assert tuned.configs == cands
    for key in configs._AUTOTUNE_KEYS[name]:
        assert key in fn.arg_names, key
    prune = configs._prune(name)
    small = prune(cands, {}, M_KEY=16)
    assert small and (all(c.kwargs["BLOCK_M"] <= 32 for c in small) or small == cands[-1:])
    assert prune(cands, {}, M_KEY=1 << 20) == cands


@pytest.mark.parametrize("name", list(_KERNELS))
def test_heuristics_and_interpreter_configs_cover_the_kernel(name):
    fn = raw(name)
    meta = dict(configs.INTERPRETER_CONFIGS[name])
    derived = configs.derived_meta(name, {"K": 70, "N": 64, **meta})
    constexprs = {a for a in fn.arg_names if a.isupper() and a != "M_KEY" and a not in ("M", "N", "K", "R")}
    launcher_given = {"HAS_DROPOUT", "HAS_BIAS", "DOT_PRECISION", "BLOCK_R", "COMPUTE_DS", "COMPUTE_DB",
                      "DB_ATOMIC", "DA_ATOMIC"}
    assert constexprs <= set(meta) | set(derived) | launcher_given, constexprs - set(meta) - set(derived)
    for cfg in configs.configs_for(name, "sm90", 2):
        assert set(cfg.kwargs) == set(meta), (cfg.kwargs, meta)
