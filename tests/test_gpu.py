"""Compiled-kernel tests: need a CUDA device (they skip cleanly without one).

bf16 (which the interpreter cannot run), LLM-sized shapes, the autotuned configs, the CUDA
kernel count per pass, bitwise reproducibility in deterministic mode, and an input with
M·K > 2³¹ elements. ``bench/device_check.sh`` runs this file on a lent GPU.
"""
import pytest
import torch

from _lora_testing import assert_close, coarser, fastlora, make_inputs, oracle

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("M,N,K,r", [(4096, 4096, 4096, 16), (2048, 1024, 4096, 64), (1000, 14336, 4096, 8),
                                     (3000, 4096, 14336, 16), (77, 333, 4096, 33), (8192, 512, 768, 256)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("adapter_dtype", [torch.float32, "same"], ids=["A32", "Asame"])
def test_large_shapes(dtype, M, N, K, r, adapter_dtype):
    adapter_dtype = dtype if adapter_dtype == "same" else adapter_dtype
    x, W, A, B, b, dy = make_inputs(M, N, K, r, dtype, "cuda", adapter_dtype=adapter_dtype)
    for t in (x, A, B, b):
        t.requires_grad_()
    p, seed = 0.1, 42
    y = fastlora.lora_linear(x, W, A, B, 2.0, b, dropout_p=p, seed=seed)
    y.backward(dy)
    mask = fastlora.dropout_mask(x.shape, p, seed, device="cuda", dtype=torch.float64)
    ref = oracle(x, W, A, B, b, 2.0, mask, dy)  # fp64 on the GPU
    assert_close("y", y, ref[0], dtype, K + r, "triton")
    assert_close("dx", x.grad, ref[1], dtype, N + r, "triton")
    assert_close("dA", A.grad, ref[3], coarser(dtype, A.dtype), M, "triton")
    assert_close("dB", B.grad, ref[4], coarser(dtype, B.dtype), M, "triton")
    assert_close("db", b.grad, ref[5], dtype, M, "triton")


def test_fp32_with_and_without_tf32():
    x, W, A, B, b, dy = make_inputs(512, 384, 1024, 16, torch.float32, "cuda")
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        for allow in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = allow
            y = fastlora.lora_linear(x, W, A, B, 2.0, b)
            ref = oracle(x, W, A, B, b, 2.0, None, dy)[0]
            assert_close(f"y tf32={allow}", y, ref, torch.float32, 1040, "triton")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def _cuda_kernels(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and "memcpy" not in e.name.lower()]


@pytest.mark.parametrize("path", ["fused", "hybrid"])
def test_cuda_kernel_counts(monkeypatch, path):
    """Forward: 2 Triton kernels (shrink; the fused GEMM, or the rank-r update after cuBLAS's
    GEMM); backward: 3 (fused) or 2 (hybrid: dS/dB, dA + dx's LoRA term; cuBLAS does dy·W), plus
    at most one memset per split reduction."""
    monkeypatch.setenv("FASTLORA_PATH", path)
    x, W, A, B, b, dy = make_inputs(4096, 1024, 2048, 16, torch.bfloat16, "cuda")
    x.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    fastlora.lora_linear(x, W, A, B, 2.0, b, dropout_p=0.1, seed=1).backward(dy)  # tune first
    ys = []
    fwd = _cuda_kernels(lambda: ys.append(fastlora.lora_linear(x, W, A, B, 2.0, b, dropout_p=0.1, seed=1)))
    bwd = _cuda_kernels(lambda: ys[0].backward(dy))
    lora = lambda names: [n for n in names if "_lora_" in n]  # noqa: E731
    assert len(lora(fwd)) == 2 and len(lora(bwd)) == (3 if path == "fused" else 2), (fwd, bwd)
    others = [n for n in fwd + bwd if "_lora_" not in n]
    assert len(others) <= (3 if path == "fused" else 5), others  # memsets (+ cuBLAS GEMMs on the hybrid path)


def test_deterministic_mode_is_bitwise_reproducible():
    x, W, A, B, b, dy = make_inputs(3000, 1024, 2048, 16, torch.bfloat16, "cuda")
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        outs = []
        for _ in range(2):
            xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
            y = fastlora.lora_linear(xg, W, Ag, Bg, 2.0, b, dropout_p=0.1, seed=9)
            y.backward(dy)
            outs.append((y, xg.grad, Ag.grad, Bg.grad))
    finally:
        torch.use_deterministic_algorithms(prev)
    for name, u, v in zip(("y", "dx", "dA", "dB"), *outs):
        assert torch.equal(u, v), name


def test_input_larger_than_2_pow_31_elements():
    """M·K > 2³¹ (8.8 GiB of bf16): int64 block offsets must address every row, forward and
    backward (dx written, x re-read for dA)."""
    M, K, N, r = (1 << 20) + 3, 2048 + 64, 64, 16
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2 ** 30:
        pytest.skip("needs 40 GiB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) / K ** 0.5
    A = (torch.randn(r, K, device="cuda", generator=g) / K ** 0.5).requires_grad_()
    B = torch.randn(N, r, device="cuda", generator=g).requires_grad_()
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, generator=g)
    y = fastlora.lora_linear(x, W, A, B, 2.0, dropout_p=0.1, seed=3)
    y.backward(dy)
    from fastlora.dropout import keep_bits, keep_params
    thresh, scale = keep_params(0.1)

    def mask_rows(m0, n):  # rows m0 .. m0+n of the [M, K] mask, without building all of it
        return keep_bits(n, K, 3, thresh, "cuda", row0=m0).double() * scale

    rows = torch.tensor([0, 1, M // 2, M - 2, M - 1], device="cuda")
    xs, ys, dys = x.detach()[rows], y.detach()[rows], dy[rows]
    mask = torch.cat([mask_rows(int(m), 1) for m in rows])
    x64, A64, B64 = xs.double(), A.detach().double(), B.detach().double()
    ref_y = x64 @ W.double().t() + 2.0 * ((x64 * mask) @ A64.t()) @ B64.t()
    assert_close("y rows", ys, ref_y, torch.bfloat16, K + r, "triton")
    ref_dx = dys.double() @ W.double() + mask * ((2.0 * dys.double() @ B64) @ A64)
    assert_close("dx rows", x.grad[rows], ref_dx, torch.bfloat16, N + r, "triton")
    # dA = Σ over all M rows: compare with a float64 sum computed in row chunks
    dA_ref = torch.zeros(r, K, device="cuda", dtype=torch.float64)
    dB_ref = torch.zeros(N, r, device="cuda", dtype=torch.float64)
    for m0 in range(0, M, 1 << 17):
        xc = x.detach()[m0:m0 + (1 << 17)].double()
        mc = mask_rows(m0, xc.shape[0])
        dyc = dy[m0:m0 + (1 << 17)].double()
        xt = (xc * mc).to(torch.bfloat16).double()
        dA_ref += (2.0 * dyc @ B64).t() @ xt
        dB_ref += 2.0 * dyc.t() @ (xt @ A64.t())
    assert_close("dA", A.grad, dA_ref, torch.bfloat16, M, "triton")
    assert_close("dB", B.grad, dB_ref, torch.bfloat16, M, "triton")


def test_compile_reduce_overhead_cuda_graphs():
    """torch.compile(mode="reduce-overhead") captures fastlora's kernels in CUDA graphs: same
    outputs as eager without dropout, and dropout masks that change from replay to replay."""
    import torch._inductor.config as inductor_config
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(1024, 2048, r=16, lora_alpha=32, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up runs, then capture
        compiled(x).float().square().mean().backward()
    y = compiled(x)
    assert_close("y", y, layer(x).double(), torch.bfloat16, 1040, "triton")
    layer.lora_dropout = 0.1
    prev = inductor_config.fallback_random
    inductor_config.fallback_random = True
    try:
        torch._dynamo.reset()
        compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
        outs = [compiled(x).detach().clone() for _ in range(5)]
    finally:
        inductor_config.fallback_random = prev
    assert not torch.equal(outs[-1], outs[-2]), "the dropout mask is frozen inside the CUDA graph"
