"""The autotune wrappers a GPU launch uses, checked without a GPU: their keys name real kernel
arguments, pruning works with fastlora's keyword-only launches, and heuristics derive EVEN_*."""
import importlib
import os

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
                      "DO_DA", "DO_DB", "ATOMIC"}
    assert constexprs <= set(meta) | set(derived) | launcher_given, constexprs - set(meta) - set(derived)
    for cfg in configs.configs_for(name, "sm90", 2):
        assert set(cfg.kwargs) == set(meta), (cfg.kwargs, meta)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the autotuner under the interpreter")
def test_autotuned_launch_path_end_to_end(monkeypatch):
    """The GPU launch path, autotuner included, run under the interpreter: every candidate is
    "benchmarked" (run once), workspaces are reset between trials, results stay right, and no
    input (the saved S above all) is written."""
    import torch

    from fastlora.kernels import launch as L, lora_backward as Bk, lora_forward as Fw

    def tuned_launch(name, raw_fn, grid, device, itemsize, fixed=False, **kwargs):
        L.LAUNCH_COUNTS[name] += 1
        tuned = configs.autotuned(name, raw_fn, "sm90", itemsize, "interp-test")
        monkeypatch.setattr(tuned, "_do_bench", lambda fn, quantiles=None: (fn(), [1.0, 1.0, 1.0])[1])
        tuned[grid](**kwargs)
        return tuned.best_config.kwargs

    monkeypatch.setattr(Fw, "launch", tuned_launch)
    monkeypatch.setattr(Bk, "launch", tuned_launch)
    g = torch.Generator().manual_seed(0)
    M, N, K, r = 70, 48, 64, 8
    x, W = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / 8
    A, B = torch.randn(r, K, generator=g) / 8, torch.randn(N, r, generator=g) / 3
    dy, scale = torch.randn(M, N, generator=g), torch.tensor([2.0])
    y, S = Fw.lora_linear_fwd(x, W, A, B, scale)
    torch.testing.assert_close(y, x @ W.t() + 2 * (x @ A.t()) @ B.t(), rtol=1e-4, atol=1e-4)
    S_before = S.clone()
    dS = 2 * dy @ B
    for need in ((True, True, True), (True, True, False), (False, False, True)):
        dx, dAB = Bk.lora_linear_bwd(dy, x, W, A, B, S, scale, need_dx=need[0], need_dA=need[1], need_dB=need[2])
        assert torch.equal(S, S_before), "the backward wrote into the saved S"
        n_db = N * r if need[2] else 0
        if need[0]:
            torch.testing.assert_close(dx, dy @ W + dS @ A, rtol=1e-4, atol=1e-4)
        if need[1]:
            torch.testing.assert_close(dAB[n_db:].view(r, K), dS.t() @ x, rtol=1e-4, atol=1e-4)
        if need[2]:
            torch.testing.assert_close(dAB[:n_db].view(N, r), 2 * dy.t() @ S_before, rtol=1e-4, atol=1e-4)
