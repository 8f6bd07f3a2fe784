"""The benchmark suite's CPU smoke mode stays alive (no timings are checked: they live in bench/)."""
import csv
import os
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("peft")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", *args, "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_smoke_writes_csv_and_plots(tmp_path):
    out = _run(["bench", "--smoke", "--no-progress"], tmp_path)
    assert "not performance figures" in out
    rows = list(csv.DictReader(open(tmp_path / "lora_linear.csv")))
    providers = {r["provider"] for r in rows}
    assert {"base", "eager", "peft", "peft-fp32", "addmm", "fastlora", "fastlora-fp32", "peft-dora",
            "fastlora-dora"} <= providers
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd", "eval"}
    for r in rows:
        assert float(r["median_ms"]) > 0 and r["gpu"] and r["torch"] and r["smoke"] == "True"
        if r["mode"] == "fwd+bwd":  # every provider computes the same function at dropout 0
            assert float(r["max_rel_err"]) < 1e-5, r
        if r["provider"] == "fastlora-dora" and r["mode"] != "eval":  # LoRA's + z [M, N] for dm
            assert int(r["lora_mk_saved"]) == 1, r
        elif r["provider"].startswith("fastlora"):  # only S and the seed beyond input and params
            assert int(r["lora_mk_saved"]) == 0
    assert any(int(r["lora_mk_saved"]) > 0 for r in rows if r["provider"] == "eager" and float(r["dropout"]) > 0)
    dora = [r for r in rows if r["provider"] in ("peft-dora", "fastlora-dora") and r["mode"] != "eval"]
    saved = {(r["provider"], r["mode"], r["dropout"]): int(r["saved_extra_bytes"]) for r in dora}
    assert all(saved["fastlora-dora", m, p] < saved["peft-dora", m, p] for _, m, p in saved), saved
    assert "DoRA goal (reported, not asserted)" in out
    for png in ("ratio_to_base.png", "speedup_vs_eager.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_bench_e2e_smoke(tmp_path):
    out = _run(["bench.bench_e2e", "--smoke", "--generate", "3"], tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "e2e.csv")))
    assert [r["variant"] for r in rows] == ["no-lora", "peft", "peft+fastlora"]
    assert all(float(r["step_ms_median"]) > 0 and r["smoke"] == "True" for r in rows)
    assert "peft+fastlora vs peft" in out
    gen = list(csv.DictReader(open(tmp_path / "generate.csv")))
    assert [(r["variant"], r["new_tokens"]) for r in gen] == [("peft", "3"), ("peft+fastlora", "3")]
    assert "generate: peft+fastlora" in out


def test_bench_engines_smoke(tmp_path):
    pytest.importorskip("deepspeed")
    out = _run(["bench.bench_engines", "--smoke", "--engines", "zero3,fsdp1"], tmp_path)
    assert "not performance figures" in out
    rows = list(csv.DictReader(open(tmp_path / "engines.csv")))
    assert [(r["engine"], r["variant"]) for r in rows] == [
        ("zero3", "peft"), ("zero3", "peft+fastlora"), ("fsdp1", "peft"), ("fsdp1", "peft+fastlora")]
    for r in rows:
        assert float(r["step_ms_median"]) > 0 and r["smoke"] == "True" and r["deepspeed"]
        assert float(r["saved_mib"]) > 0  # the memory autograd holds for the backward was measured
        if r["variant"] == "peft":
            assert r["saved_vs_peft_mib"] == "+0.00"
        if r["variant"] == "peft+fastlora":  # 7 LoRA layers in the smoke model's one block, all fused
            assert r["fused_calls_per_step"] == "7" and r["fallbacks"] == "0", r


def test_saved_bytes_counts_each_saved_storage_once():
    import torch

    from bench.bench_engines import saved_bytes
    w = torch.randn(64, 32, requires_grad=True)
    x = torch.randn(128, 64)
    _, one = saved_bytes(lambda: (x @ w).sum())  # dW needs x alone (x needs no grad)
    assert one == x.numel() * 4
    _, two = saved_bytes(lambda: (x @ w).sum() + (x[:, :32] @ w[:32]).sum() + (w * w).sum())  # x's storage again, w
    assert two == x.numel() * 4 + w.numel() * 4
