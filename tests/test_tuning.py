"""The config choice a GPU launch makes, checked without a GPU: candidates, grid splits, the
tuning key, and the whole tuned launch path run under the interpreter with an injected timer."""
import importlib
import itertools

import pytest
import torch

pytest.importorskip("triton")
from fastlora.kernels import configs, launch  # noqa: E402

from _lora_testing import INTERPRETED  # noqa: E402

_KERNELS = {
    "shrink": ("lora_forward", "_lora_shrink_kernel"),
    "fwd": ("lora_forward", "_lora_linear_fwd_kernel"),
    "expand": ("lora_forward", "_lora_expand_kernel"),
    "bwd_dy": ("lora_backward", "_lora_bwd_dy_kernel"),
    "bwd_dx": ("lora_backward", "_lora_bwd_dx_kernel"),
    "bwd_da": ("lora_backward", "_lora_bwd_da_kernel"),
}
_LAUNCHER_GIVEN = {"HAS_DROPOUT", "HAS_BIAS", "DOT_PRECISION", "LORA_DTYPE", "LORA_PRECISION", "PIECES", "EPI_DTYPE",
                   "EPI_PRECISION", "BLOCK_R", "COMPUTE_DS", "COMPUTE_DB", "DO_DA", "DO_DB", "ADD_DX",
                   "COL_SCALE", "STORE_Z", "COLSUM", "NUM_STAGES"}  # DoRA's epilogue and backward fold: set by the launcher


def raw(name):
    module, fn = _KERNELS[name]
    return getattr(importlib.import_module(f"fastlora.kernels.{module}"), fn)


def _args(kernel, M=4096, N=4096, K=4096, R=16, det=False, add_dx=False):
    return dict(M=M, M_KEY=configs.m_key(M), N=N, K=K, R=R, BLOCK_R=configs.block_r(R), DETERMINISTIC=det,
                ADD_DX=add_dx, WIDEST=K, PRODUCTS=1, SM_COUNT=4)


@pytest.mark.parametrize("name", list(_KERNELS))
def test_every_constexpr_has_a_source(name):
    """Each constexpr of each kernel comes from the config, a heuristic or the launcher."""
    fn = raw(name)
    meta = configs.interpreter_config(name, _args(name))
    derived = configs.derived_meta(name, {**_args(name), **meta})
    constexprs = {a for a in fn.arg_names if a.isupper() and a not in ("M", "N", "K", "R", "M_KEY", "K_PER_SPLIT",
                                                                         "N_PER_SPLIT")}
    assert constexprs <= set(meta) | set(derived) | _LAUNCHER_GIVEN, constexprs - set(meta) - set(derived)
    for cfg in configs.configs_for(name, "sm90", 2):
        assert set(cfg.kwargs) == set(configs.INTERPRETER_CONFIGS[name]), (cfg.kwargs, configs.INTERPRETER_CONFIGS[name])


@pytest.mark.parametrize("name", list(_KERNELS))
@pytest.mark.parametrize("arch", configs.ARCH_FAMILIES)
@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_candidates(name, arch, itemsize):
    """First candidate = the fixed choice: no split; deterministic mode never splits; small M
    drops tiles far taller than M; a small M on a big GPU gets a split candidate."""
    big = _args(name)
    cands = configs.candidates(name, arch, itemsize, big, "cpu")
    assert cands and cands[0].kwargs.get("SPLIT", 1) == 1 or name == "bwd_da"
    det = configs.candidates(name, arch, itemsize, _args(name, det=True), "cpu")
    assert all(c.kwargs.get("SPLIT", 1) == 1 for c in det)
    small = configs.candidates(name, arch, itemsize, _args(name, M=8), "cpu")
    tiles = {c.kwargs["BLOCK_M"] for c in small}
    assert small and (max(tiles) <= 32 or len(tiles) == 1), tiles  # else only the list's last tile
    if name in ("shrink", "bwd_dy"):
        assert any(c.kwargs["SPLIT"] > 1 for c in configs.candidates(name, arch, itemsize, _args(name, M=64), "cpu"))


def test_split_count_fills_the_gpu_and_keeps_work_per_split():
    assert configs.split_count(programs=4, steps=64, device="cpu") == 2  # cpu: 4 "SMs", 8 programs wanted
    assert configs.split_count(programs=100, steps=64, device="cpu") == 1
    assert configs.split_count(programs=1, steps=8, device="cpu") == 2  # at least 4 blocks per split


def test_tuning_key_tells_layouts_precisions_and_alignment_apart():
    x = torch.zeros(64, 64)
    base = dict(x_ptr=x, stride_wn=64, stride_wk=1, DOT_PRECISION="ieee", M=100, M_KEY=128, K=64)
    key = launch.tuning_key("fwd", "cuda:0", base)
    assert launch.tuning_key("fwd", "cuda:0", {**base, "M": 120}) == key  # same M bucket
    assert launch.tuning_key("fwd", "cuda:0", {**base, "stride_wn": 1, "stride_wk": 64}) != key  # Conv1D layout
    assert launch.tuning_key("fwd", "cuda:0", {**base, "DOT_PRECISION": "tf32"}) != key
    assert launch.tuning_key("fwd", "cuda:0", {**base, "x_ptr": x.view(-1)[1:]}) != key  # misaligned pointer
    assert launch.tuning_key("fwd", "cuda:1", base) != key


def _same(a, b):
    return (a.kwargs, a.num_warps, a.num_stages) == (b.kwargs, b.num_warps, b.num_stages)


def test_capture_and_fixed_modes_never_time(monkeypatch):
    calls = []
    monkeypatch.setitem(launch._TIMERS, "config", lambda fn: calls.append(fn) or 1.0)
    launch.reset_tuning()
    args = _args("shrink", M=256)
    cands = configs.candidates("shrink", "sm90", 2, args, "cpu")
    monkeypatch.setattr(launch, "capturing", lambda device: True)
    assert _same(launch.choose_config("shrink", torch.device("cpu"), "sm90", 2, args, lambda c: None), cands[0])
    assert not calls and not launch._BEST  # nothing timed, nothing remembered during a capture
    monkeypatch.setattr(launch, "capturing", lambda device: False)
    assert _same(launch.choose_config("shrink", torch.device("cpu"), "sm90", 2, args, lambda c: None, fixed=True),
                 cands[0])
    monkeypatch.setenv("FASTLORA_AUTOTUNE", "0")
    assert _same(launch.choose_config("shrink", torch.device("cpu"), "sm90", 2, args, lambda c: None), cands[0])
    assert not calls
    monkeypatch.delenv("FASTLORA_AUTOTUNE")
    best = launch.choose_config("shrink", torch.device("cpu"), "sm90", 2, args, lambda c: None)
    assert len(calls) == len(cands) and launch._BEST  # timed once per candidate, then remembered
    assert _same(launch.choose_config("shrink", torch.device("cpu"), "sm90", 2, args, lambda c: None), best)
    assert len(calls) == len(cands)
    launch.reset_tuning()


@pytest.mark.skipif(not INTERPRETED, reason="runs the GPU launch path under the interpreter")
@pytest.mark.parametrize("path", ["fused", "hybrid"])
def test_tuned_launch_path_end_to_end(monkeypatch, path):
    """The GPU launch path, config timing included, run under the interpreter: every candidate
    (grid splits and their atomics included) runs on scratch buffers, the chosen one for real;
    results are right, no input (the saved S above all) is written, the choice is remembered."""
    from fastlora.kernels import lora_backward as Bk, lora_forward as Fw
    from fastlora.dropout import keep_params, dropout_mask

    trials = []
    times = itertools.cycle([3.0, 1.0, 2.0, 5.0, 4.0])
    monkeypatch.setitem(launch._TIMERS, "config", lambda fn: (fn(), fn(), trials.append(1), next(times))[3])
    monkeypatch.setattr(launch, "is_interpreted", lambda fn: False)
    monkeypatch.setattr(launch, "_arch", lambda device: "sm90")
    launch.reset_tuning()
    g = torch.Generator().manual_seed(0)
    M, N, K, r = 70, 80, 512, 12  # K and N span enough blocks for split candidates (4 "SMs" on a CPU)
    x, W = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / 8
    A, B = torch.randn(r, K, generator=g) / 8, torch.randn(N, r, generator=g) / 3
    dy, scale = torch.randn(M, N, generator=g), torch.tensor([2.0])
    seed, (kt, ks) = torch.tensor([3]), keep_params(0.25)
    m = dropout_mask((M, K), 0.25, 3)
    inputs = [t.clone() for t in (x, W, A, B, dy)]
    y, S = Fw.lora_linear_fwd(x, W, A, B, scale, None, seed, kt, ks, path=path)
    assert trials, "no config was timed"
    S_ref = (x * m) @ A.t()
    torch.testing.assert_close(S, S_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y, x @ W.t() + 2 * S_ref @ B.t(), rtol=1e-4, atol=1e-4)
    S_before = S.clone()
    dS = 2 * dy @ B
    for need in ((True, True, True), (True, True, False), (False, False, True), (True, False, False)):
        dx, dAB = Bk.lora_linear_bwd(dy, x, W, A, B, S, scale, seed, kt, ks, *need, path=path)
        assert torch.equal(S, S_before), "the backward wrote into the saved S"
        n_db = N * r if need[2] else 0
        if need[0]:
            torch.testing.assert_close(dx, dy @ W + m * (dS @ A), rtol=1e-4, atol=1e-4)
        if need[1]:
            torch.testing.assert_close(dAB[n_db:].view(r, K), dS.t() @ (x * m), rtol=1e-4, atol=1e-3)
        if need[2]:
            torch.testing.assert_close(dAB[:n_db].view(N, r), 2 * dy.t() @ S_before, rtol=1e-4, atol=1e-3)
    for before, t in zip(inputs, (x, W, A, B, dy)):
        assert torch.equal(before, t), "a trial wrote into an input"
    n = len(trials)
    Fw.lora_linear_fwd(x, W, A, B, scale, None, seed, kt, ks, path=path)
    assert len(trials) == n, "a remembered choice was timed again"
    launch.reset_tuning()
