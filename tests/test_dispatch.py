"""The measured choice between the fused and the hybrid path (fastlora.dispatch), with an injected
timer: fixed choices, measurement, the JSON cache (good, corrupt, stale, unwritable), the public
explanation, and an end-to-end call that measures both paths under the interpreter."""
import json
import os

import pytest
import torch

from _lora_testing import HAS_CUDA, INTERPRETED, assert_close, fastlora, make_inputs, oracle
from fastlora import dispatch
from fastlora.kernels import LAUNCH_COUNTS, configs, launch

CPU = torch.device("cpu")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty cache directory, no in-memory decision, timing allowed without a GPU."""
    monkeypatch.setenv("FASTLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTLORA_PATH", raising=False)
    monkeypatch.setattr(dispatch, "MEASURE_WITHOUT_GPU", True)
    dispatch.forget()
    yield tmp_path
    dispatch.forget()


def fake_timer(monkeypatch, ms):
    """Path timer returning ``ms[path]`` for the runner of that path (and running it)."""
    calls = []

    def timer(fn):
        fn()
        calls.append(fn.path)
        return ms[fn.path]

    monkeypatch.setitem(launch._TIMERS, "path", timer)
    return calls


def runners(log):
    def make(p):
        def fn():
            log.append(p)
        fn.path = p
        return fn
    return {p: make(p) for p in dispatch.PATHS}


def test_measures_once_keeps_the_faster_and_writes_the_cache(monkeypatch, fresh):
    calls = fake_timer(monkeypatch, {"fused": 2.0, "hybrid": 1.5})
    log = []
    d = dispatch.choose(CPU, "k1", 16, "fwd", runners(log))
    assert d.path == "hybrid" and d.times_ms == (2.0, 1.5) and "measured" in d.reason
    assert log.count("fused") == log.count("hybrid") == 6  # a warm-up each, then 5 interleaved samples
    assert calls[:2] == ["fused", "hybrid"]
    assert dispatch.choose(CPU, "k1", 16, "fwd", runners(log)).path == "hybrid"
    assert len(log) == 12, "a known key was timed again"
    data = json.load(open(dispatch.cache_file("cpu")))
    assert data["choices"]["k1"]["path"] == "hybrid" and data["versions"]["fastlora"] == fastlora.__version__
    dispatch.forget()  # a new process: the choice comes back from the file, untimed
    d = dispatch.choose(CPU, "k1", 16, "fwd", runners(log))
    assert d.path == "hybrid" and "cache" in d.reason and len(log) == 12


def test_fixed_choices_are_never_timed(monkeypatch, fresh):
    fake_timer(monkeypatch, {"fused": 1.0, "hybrid": 2.0})
    log = []
    monkeypatch.setenv("FASTLORA_PATH", "hybrid")
    assert dispatch.choose(CPU, "k", 16, "fwd", runners(log)).path == "hybrid"
    d = dispatch.choose(CPU, "k", configs.MAX_FULL_RANK + 1, "bwd", runners(log))
    assert d.path == "fused" and "needs r <=" in d.reason  # the hybrid backward cannot do it
    monkeypatch.setenv("FASTLORA_PATH", "cublas")
    with pytest.raises(ValueError, match="FASTLORA_PATH: expected one of fused, hybrid, auto, got 'cublas'"):
        dispatch.choose(CPU, "k", 16, "fwd", runners(log))
    monkeypatch.setenv("FASTLORA_PATH", "auto")
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert dispatch.choose(CPU, "k", 16, "fwd", runners(log)).path == "fused"
    finally:
        torch.use_deterministic_algorithms(prev)
    monkeypatch.setattr(launch, "capturing", lambda device: True)
    d = dispatch.choose(CPU, "k", 16, "fwd", runners(log))
    assert d.path == "hybrid" and "capture" in d.reason and not d.times_ms
    monkeypatch.setattr(dispatch, "MEASURE_WITHOUT_GPU", False)  # the interpreter: nothing to time
    assert dispatch.choose(CPU, "k", 16, "fwd", runners(log), interpreted=True).path == "fused"
    assert log == [] and not os.path.exists(dispatch.cache_file("cpu"))


@pytest.mark.parametrize("content", ["{not json", json.dumps([1, 2]), json.dumps({"choices": {"k": {"path": "x"}}}),
                                     "stale"])
def test_bad_or_stale_cache_is_ignored_with_a_warning(monkeypatch, fresh, content):
    path = dispatch.cache_file("cpu")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if content == "stale":  # a choice another fastlora version measured: not trusted
        content = json.dumps({"gpu": "cpu", "versions": {**dispatch._versions(), "fastlora": "0.0.1"},
                              "choices": {"k": {"path": "fused", "times_ms": [1.0, 9.0]}}})
    elif "choices" in content:
        content = json.dumps({"gpu": "cpu", "versions": dispatch._versions(), "choices": {"k": {"path": "x"}}})
    with open(path, "w") as f:
        f.write(content)
    fake_timer(monkeypatch, {"fused": 3.0, "hybrid": 1.0})
    with pytest.warns(UserWarning, match="ignoring"):
        d = dispatch.choose(CPU, "k", 16, "fwd", runners([]))
    assert d.path == "hybrid" and d.times_ms  # measured again, not read
    assert json.load(open(path))["choices"]["k"]["path"] == "hybrid"  # and the file rewritten


def test_unwritable_cache_warns_and_keeps_working(monkeypatch, fresh):
    blocker = fresh / "file"
    blocker.write_text("")
    monkeypatch.setenv("FASTLORA_CACHE_DIR", str(blocker / "sub"))  # a directory under a file
    fake_timer(monkeypatch, {"fused": 1.0, "hybrid": 2.0})
    with pytest.warns(UserWarning, match="could not write"):
        assert dispatch.choose(CPU, "k", 16, "fwd", runners([])).path == "fused"
    assert dispatch.choose(CPU, "k", 16, "fwd", runners([])).path == "fused"  # remembered in memory


def test_key_names_what_the_choice_depends_on():
    x, W, A, _, _, _ = make_inputs(100, 48, 64, 12, torch.float16, "cpu")
    k = dispatch.key_of("fwd", x, W, A, torch.float32, True, True)
    assert k == "fwd|float16|float32|M128|N48|K64|r16|p1|Wn|xc|b1|ieee"  # fp32 LoRA math: torch's precision too
    assert dispatch.key_of("fwd", x[:90], W, A, torch.float32, True, True) == k  # same M bucket
    assert dispatch.key_of("fwd", x, W.t().contiguous().t(), A, torch.float32, True, True) != k  # Conv1D layout
    assert dispatch.key_of("fwd", x, W, A, torch.float16, True, True) != k
    assert dispatch.key_of("fwd", x, W, A, torch.float32, True, False) != k
    assert dispatch.key_of("fwd", x.t().contiguous().t(), W, A, torch.float32, True, True) != k  # x transposed
    prev = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        assert dispatch.key_of("fwd", x, W, A, torch.float32, True, True).endswith("|tf32")
    finally:
        torch.backends.cuda.matmul.fp32_precision = prev


@pytest.mark.skipif(not INTERPRETED or HAS_CUDA, reason="measures both paths under the interpreter")
def test_end_to_end_call_measures_both_paths_and_is_right(monkeypatch, fresh):
    """lora_linear's first call of a shape runs and times both paths, keeps the (here: injected)
    faster one, and returns the right values; explain_path reports it."""
    calls = []

    def timer(fn):  # the runners are functools.partial(run, path)
        fn()
        calls.append(fn.args[0])
        return {"fused": 2.0, "hybrid": 1.0}[fn.args[0]]

    monkeypatch.setitem(launch._TIMERS, "path", timer)
    x, W, A, B, b, dy = make_inputs(40, 48, 64, 12, torch.float32, "cpu")
    for t in (x, A, B):
        t.requires_grad_()
    info = fastlora.explain_path(x, W, A, B, b, dropout_p=0.1)
    assert info.forward == info.backward == "measured at the first call"
    before = LAUNCH_COUNTS.copy()
    y = fastlora.lora_linear(x, W, A, B, 1.5, b, dropout_p=0.1, seed=5)
    y.backward(dy)
    ran = LAUNCH_COUNTS - before
    assert ran["expand"] > 1 and ran["fwd"] >= 1 and ran["bwd_dx"] >= 1  # both paths ran in the timing
    assert set(calls) == {"fused", "hybrid"}
    mask = fastlora.dropout_mask(x.shape, 0.1, 5, dtype=torch.float64)
    ref = oracle(x, W, A, B, b, 1.5, mask, dy)
    assert_close("y", y, ref[0], torch.float32, 76, "triton-interpreter")
    assert_close("dx", x.grad, ref[1], torch.float32, 60, "triton-interpreter")
    assert_close("dA", A.grad, ref[3], torch.float32, 40, "triton-interpreter")
    info = fastlora.explain_path(x, W, A, B, b, dropout_p=0.1)
    assert info.forward == "hybrid" and info.backward == "hybrid" and "measured" in info.reason, info
