"""Both Triton paths (fused GEMMs; cuBLAS + Triton LoRA kernels) against the float64 oracle, for
the forward and every gradient, with identical dropout masks, through ``fastlora.lora_linear``.

On a CPU the kernels run under the interpreter and ``torch.mm`` stands in for cuBLAS; on a GPU
(device_check.sh) the same tests run the compiled kernels and cuBLAS.
"""
import pytest
import torch

from _lora_testing import (HAS_CUDA, INTERPRETED, assert_close, coarser, fastlora, make_inputs, oracle,
                           skip_unsupported)
from fastlora.kernels import LAUNCH_COUNTS

pytestmark = pytest.mark.skipif(not (INTERPRETED or HAS_CUDA), reason="needs the Triton interpreter or a GPU")
DEVICE = "cuda" if HAS_CUDA and not INTERPRETED else "cpu"
BACKEND = "triton" if DEVICE == "cuda" else "triton-interpreter"

CASES = [  # M, N, K, r, dtype, adapter dtype, p, scaling, bias, transposed W
    pytest.param(37, 45, 70, 12, torch.float32, torch.float32, 0.2, 0.5, True, False, id="fp32-odd-r12"),
    pytest.param(130, 96, 200, 1, torch.float16, torch.float32, 0.1, 2.0, False, True, id="fp16-A32-r1-Wt"),
    pytest.param(66, 128, 64, 32, torch.float16, torch.float16, 0.0, 1.5, True, False, id="fp16-r32-p0"),
    pytest.param(20, 48, 96, 33, torch.float32, torch.float32, 0.3, 0.75, True, True, id="fp32-r33-Wt"),
    pytest.param(50, 40, 130, 8, torch.bfloat16, torch.float32, 0.1, 2.0, True, False, id="bf16-A32"),
]


def _run(monkeypatch, path, M, N, K, r, dtype, adapter_dtype, p, scaling, bias, trans_w, seed=17):
    monkeypatch.setenv("FASTLORA_PATH", path)
    x, W, A, B, b, dy = make_inputs(M, N, K, r, dtype, DEVICE, bias=bias, adapter_dtype=adapter_dtype)
    if trans_w:  # GPT-2 Conv1D: the weight is the transposed view of a [K, N] tensor
        W = W.t().contiguous().t()
    for t in (x, A, B):
        t.requires_grad_()
    before = LAUNCH_COUNTS.copy()
    y = fastlora.lora_linear(x, W, A, B, scaling, b, dropout_p=p, seed=seed)
    y.backward(dy)
    launched = LAUNCH_COUNTS - before
    return (x, W, A, B, b, dy), y, launched


@pytest.mark.parametrize("path", ["fused", "hybrid"])
@pytest.mark.parametrize("M,N,K,r,dtype,adapter_dtype,p,scaling,bias,trans_w", CASES)
def test_path_matches_the_oracle(monkeypatch, path, M, N, K, r, dtype, adapter_dtype, p, scaling, bias, trans_w):
    skip_unsupported(BACKEND, dtype, adapter_dtype)
    (x, W, A, B, b, dy), y, launched = _run(monkeypatch, path, M, N, K, r, dtype, adapter_dtype, p, scaling,
                                            bias, trans_w)
    mask = fastlora.dropout_mask(x.shape, p, 17, device=DEVICE, dtype=torch.float64) if p > 0 else None
    ref = oracle(x, W, A, B, b, scaling, mask, dy)
    out = coarser(dtype, adapter_dtype)
    # (the hybrid path rounds y and dx twice, the base output then the sum, as PEFT does: within
    # the tolerance's few-ulp term)
    assert_close("y", y, ref[0], out, K + r, BACKEND)
    assert_close("dx", x.grad, ref[1], out, N + r, BACKEND)
    assert_close("dA", A.grad, ref[3], coarser(dtype, adapter_dtype), M, BACKEND)
    assert_close("dB", B.grad, ref[4], coarser(dtype, adapter_dtype), M, BACKEND)
    hybrid_bwd = path == "hybrid" and r <= 32
    assert ("expand" in launched) == (path == "hybrid") and ("fwd" in launched) == (path == "fused")
    assert ("bwd_dx" in launched) == (not hybrid_bwd), launched  # r > 32: the backward stays fused


@pytest.mark.parametrize("M,N,K,r,dtype,adapter_dtype,p,scaling,bias,trans_w", CASES[:2])
def test_paths_agree_with_each_other(monkeypatch, M, N, K, r, dtype, adapter_dtype, p, scaling, bias, trans_w):
    """Same masks, same saved tensors: the paths differ by rounding order only."""
    outs = {}
    for path in ("fused", "hybrid"):
        (x, _, A, B, _, _), y, _ = _run(monkeypatch, path, M, N, K, r, dtype, adapter_dtype, p, scaling, bias,
                                        trans_w)
        outs[path] = [t.detach().double() for t in (y, x.grad, A.grad, B.grad)]
    for name, a, b in zip(("y", "dx", "dA", "dB"), outs["fused"], outs["hybrid"]):
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 4e-3 if dtype == torch.float16 else rel < 1e-5, (name, rel)


def test_hybrid_backward_refuses_large_ranks_when_called_directly():
    from fastlora.kernels import configs, lora_linear_bwd
    x, W, A, B, _, dy = make_inputs(8, 16, 32, configs.MAX_FULL_RANK + 1, torch.float32, DEVICE)
    S = torch.zeros(8, A.shape[0], device=DEVICE)
    with pytest.raises(ValueError, match="hybrid backward needs r <="):
        lora_linear_bwd(dy, x, W, A, B, S, torch.ones(1, device=DEVICE), path="hybrid")


@pytest.mark.parametrize("path", ["fused", "hybrid"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("need", ["xAB", "xB", "xA", "AB", "x", "A", "B"])
def test_every_gradient_subset_on_both_paths_and_modes(monkeypatch, path, deterministic, need):
    """Each subset of (dx, dA, dB) on each path, with atomics and deterministically (the hybrid
    dA pass also carries dx's term and, deterministically, dB: three products in one launch)."""
    monkeypatch.setenv("FASTLORA_PATH", path)
    x, W, A, B, b, dy = make_inputs(70, 40, 96, 12, torch.float32, DEVICE)
    ts = {"x": x, "A": A, "B": B}
    for k in need:
        ts[k].requires_grad_()
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        y = fastlora.lora_linear(x, W, A, B, 1.5, b, dropout_p=0.2, seed=4)
        y.backward(dy)
    finally:
        torch.use_deterministic_algorithms(prev)
    ref = oracle(x, W, A, B, b, 1.5, fastlora.dropout_mask(x.shape, 0.2, 4, device=DEVICE, dtype=torch.float64), dy)
    for k, i in (("x", 1), ("A", 3), ("B", 4)):
        if k in need:
            assert_close(f"d{k}", ts[k].grad, ref[i], torch.float32, 136, BACKEND)
        else:
            assert ts[k].grad is None


@pytest.mark.parametrize("path", ["fused", "hybrid"])
@pytest.mark.parametrize("scale", [1e-20, 1e-8, 1.0, 1e6])
def test_fp32_lora_math_on_fp16_holds_over_magnitudes(monkeypatch, path, scale):
    """fp32 adapters on an fp16 model: the split of the fp32 operand into fp16 pieces stays exact
    for gradients far below and above fp16's range (dS is tiny early in training, B starting at 0)."""
    monkeypatch.setenv("FASTLORA_PATH", path)
    x, W, A, B, _, dy = make_inputs(64, 48, 96, 16, torch.float16, DEVICE, bias=False)
    B = (B * scale).requires_grad_()
    A.requires_grad_()
    fastlora.lora_linear(x, W, A, B, 1.0).backward(dy)
    ref = oracle(x, W, A, B, None, 1.0, None, dy)
    for name, g, r in (("dA", A.grad, ref[3]), ("dB", B.grad, ref[4])):
        rel = ((g.double() - r).norm() / r.norm()).item()
        assert rel < 1e-6, f"{name} at scale {scale}: {rel:.2e} (fp32 math gives ~2e-7)"


@pytest.mark.parametrize("path", ["fused", "hybrid"])
def test_the_autograd_function_under_autocast_keeps_its_dtypes(monkeypatch, path):
    """LoRALinearFunction does no autocast handling: inside an autocast region it computes in its
    inputs' dtypes on both paths (cuBLAS's GEMMs included), forward and backward."""
    monkeypatch.setenv("FASTLORA_PATH", path)
    x, W, A, B, b, dy = make_inputs(40, 48, 64, 8, torch.float32, DEVICE)
    x.requires_grad_()
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        y = fastlora.LoRALinearFunction.apply(x, W, A, B, 2.0, b)
        y.backward(dy)
    assert y.dtype == torch.float32
    ref = oracle(x, W, A, B, b, 2.0, None, dy)
    assert_close("y", y, ref[0], torch.float32, 72, BACKEND)
    assert_close("dx", x.grad, ref[1], torch.float32, 56, BACKEND)
