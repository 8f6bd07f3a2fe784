"""Forward and every gradient of fastlora.lora_linear against the float64 oracle.

Runs on each backend this machine has: the torch path, the Triton interpreter (CPU, no GPU)
and the compiled kernels (CUDA). Every case checks y, dx, dA, dB and db.
"""
import itertools

import pytest
import torch

from _lora_testing import (INTERPRETED, assert_close, backends, coarser, fastlora, make_inputs, oracle, run,
                           skip_unsupported)

SHAPES = [  # (M, N, K): odd sizes, M = 1, K != N, a tall M that spans several row blocks
    pytest.param(37, 45, 70, id="M37-N45-K70"),
    pytest.param(1, 45, 70, id="M1-N45-K70"),
    pytest.param(130, 24, 96, id="M130-N24-K96"),
    pytest.param(20, 96, 33, id="M20-N96-K33"),
]
RANKS = [1, 12, 33, 64]


def check_all(backend, device, M, N, K, r, dtype, bias, p, scaling, seed=1234, adapter_dtype=torch.float32,
              lead=None):
    x, W, A, B, b, dy = make_inputs(M, N, K, r, dtype, device, bias=bias, adapter_dtype=adapter_dtype, lead=lead)
    x.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    if b is not None:
        b.requires_grad_()
    y = run(backend, fastlora.lora_linear, x, W, A, B, scaling, b, dropout_p=p, seed=seed)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], N)
    y.backward(dy)
    mask = fastlora.dropout_mask(x.shape, p, seed, dtype=torch.float64) if p > 0 else None
    y_ref, dx_ref, _, dA_ref, dB_ref, db_ref = oracle(x, W, A, B, b, scaling, mask, dy)
    M_all = x.numel() // K
    # The LoRA matmuls run in the adapters' dtype (PEFT casts the LoRA input to lora_A's dtype):
    # bf16 adapters on an fp32 model round the LoRA term of y and dx to bf16, as PEFT does.
    out_dtype = coarser(dtype, adapter_dtype)
    assert_close("y", y, y_ref, out_dtype, K + r, backend)
    assert_close("dx", x.grad, dx_ref, out_dtype, N + r, backend)
    assert_close("dA", A.grad, dA_ref, coarser(dtype, A.dtype), M_all, backend)
    assert_close("dB", B.grad, dB_ref, coarser(dtype, B.dtype), M_all, backend)
    assert A.grad.dtype == A.dtype and B.grad.dtype == B.dtype and x.grad.dtype == x.dtype
    if b is not None:
        assert_close("db", b.grad, db_ref, dtype, M_all, backend)
        assert b.grad.dtype == b.dtype


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("bias,p,scaling", [(True, 0.0, 2.0), (False, 0.25, 0.5)], ids=["bias-p0-s2", "nobias-p.25-s.5"])
def test_forward_backward(backend, device, M, N, K, r, dtype, bias, p, scaling):
    check_all(backend, device, M, N, K, r, dtype, bias, p, scaling)


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("r", [1, 128, 256], ids=lambda r: f"r{r}")
def test_large_and_oversized_ranks(backend, device, r):
    """r = 128, 256 span several rank blocks; r > min(K, N) is legal (a rank-deficient update)."""
    check_all(backend, device, 40, 48, 72, r, torch.float32, True, 0.1, 1.5)


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["A32", "Abf16", "A16"])
def test_adapter_dtypes(backend, device, dtype, adapter_dtype):
    """PEFT keeps adapters in fp32 on half models: the LoRA math runs in the adapters' dtype
    (PEFT casts the LoRA input to lora_A's dtype), grads come back in their own dtypes."""
    skip_unsupported(backend, dtype, adapter_dtype)
    check_all(backend, device, 33, 40, 64, 8, dtype, True, 0.1, 2.0, adapter_dtype=adapter_dtype)


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("lead", [(2, 19), (3, 1, 5), (0,), (2, 0)], ids=["2x19", "3x1x5", "M0", "2x0"])
def test_leading_dims(backend, device, lead):
    x, W, A, B, b, dy = make_inputs(0, 30, 40, 12, torch.float32, device, lead=lead)
    if x.numel() == 0:  # M = 0: empty output, zero LoRA grads, no launch
        x.requires_grad_()
        A.requires_grad_()
        B.requires_grad_()
        y = run(backend, fastlora.lora_linear, x, W, A, B, 2.0, b, dropout_p=0.1)
        assert y.shape == (*lead, 30)
        y.backward(dy)
        assert x.grad.shape == x.shape
        assert torch.equal(A.grad, torch.zeros_like(A)) and torch.equal(B.grad, torch.zeros_like(B))
        return
    check_all(backend, device, 0, 30, 40, 12, torch.float32, True, 0.2, 2.0, lead=lead)


def _views(device):
    """(name, make(x, W, A, B) -> (x, W, A, B) as non-contiguous views with the same values)."""
    def transposed(t):
        return t.t().contiguous().t()

    def strided(t):  # every other element of a twice-as-wide buffer
        buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        buf[..., ::2] = t
        return buf[..., ::2]

    return {
        "x-transposed": lambda x, W, A, B: (transposed(x), W, A, B),
        "x-strided": lambda x, W, A, B: (strided(x), W, A, B),
        "W-transposed": lambda x, W, A, B: (x, transposed(W), A, B),
        "AB-transposed": lambda x, W, A, B: (x, W, transposed(A), transposed(B)),
        "all-strided": lambda x, W, A, B: (strided(x), strided(W), strided(A), strided(B)),
    }


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_bias_views(backend, device, layout):
    """A bias read through its stride: every other element of a buffer, or one value expanded
    (stride 0) over N."""
    x, W, A, B, b, dy = make_inputs(37, 45, 70, 12, torch.float32, device)
    if layout == "strided":
        buf = torch.zeros(2 * 45, device=device)
        buf[::2] = b
        bv = buf[::2]
    else:
        bv = b[:1].expand(45)
    y = run(backend, fastlora.lora_linear, x, W, A, B, 2.0, bv)
    assert_close("y", y, oracle(x, W, A, B, bv.contiguous(), 2.0, None, dy)[0], torch.float32, 82, backend)


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("view", list(_views("cpu")))
def test_strided_and_transposed_views(backend, device, view):
    M, N, K, r, p, seed = 37, 45, 70, 12, 0.2, 99
    x, W, A, B, b, dy = make_inputs(M, N, K, r, torch.float32, device)
    xv, Wv, Av, Bv = _views(device)[view](x, W, A, B)
    assert torch.equal(xv, x) and torch.equal(Wv, W) and torch.equal(Av, A) and torch.equal(Bv, B)
    for t in (xv, Av, Bv):
        t.requires_grad_()
    y = run(backend, fastlora.lora_linear, xv, Wv, Av, Bv, 2.0, b, dropout_p=p, seed=seed)
    y.backward(dy)
    mask = fastlora.dropout_mask(x.shape, p, seed, dtype=torch.float64)
    y_ref, dx_ref, _, dA_ref, dB_ref, _ = oracle(x, W, A, B, b, 2.0, mask, dy)
    assert_close("y", y, y_ref, torch.float32, K + r, backend)
    assert_close("dx", xv.grad, dx_ref, torch.float32, N + r, backend)
    assert_close("dA", Av.grad, dA_ref, torch.float32, M, backend)
    assert_close("dB", Bv.grad, dB_ref, torch.float32, M, backend)


@pytest.mark.parametrize("backend,device", backends())
def test_noncontiguous_and_broadcast_grad_output(backend, device):
    """dy with stride 0 (from .sum()) and a transposed dy must be read correctly."""
    x, W, A, B, b, _ = make_inputs(21, 30, 40, 6, torch.float32, device)
    for make_loss in (lambda y: y.sum(), lambda y: (y.t().contiguous().t() * 1.0).mul(torch.arange(30.)).sum()):
        xg, Ag = x.clone().requires_grad_(), A.clone().requires_grad_()
        y = run(backend, fastlora.lora_linear, xg, W, Ag, B, 2.0, b)
        make_loss(y).backward()
        x64, A64 = x.double().requires_grad_(), A.double().requires_grad_()
        from fastlora.reference import lora_linear_ref
        y64 = lora_linear_ref(x64, W.double(), A64, B.double(), 2.0, b.double())
        make_loss(y64).backward()
        assert_close("dx", xg.grad, x64.grad, torch.float32, 36, backend)
        assert_close("dA", Ag.grad, A64.grad, torch.float32, 21, backend)


@pytest.mark.parametrize("backend,device", backends())
def test_every_requires_grad_combination(backend, device):
    """All 32 subsets of (input, weight, lora_A, lora_B, bias) requiring grad."""
    M, N, K, r = 19, 24, 40, 5
    base = make_inputs(M, N, K, r, torch.float32, device)
    x0, W0, A0, B0, b0, dy = base
    ref = oracle(x0, W0, A0, B0, b0, 1.5, None, dy)  # y, dx, dW, dA, dB, db
    L = {"x": N + r, "W": M, "A": M, "B": M, "b": M}
    for flags in itertools.product([False, True], repeat=5):
        ts = [t.clone().requires_grad_(f) for t, f in zip((x0, W0, A0, B0, b0), flags)]
        y = run(backend, fastlora.lora_linear, ts[0], ts[1], ts[2], ts[3], 1.5, ts[4])
        assert_close("y", y, ref[0], torch.float32, K + r, backend)
        if not any(flags):
            assert not y.requires_grad
            continue
        y.backward(dy)
        for name, t, f, g in zip("xWABb", ts, flags, ref[1:]):
            if f:
                assert_close(f"d{name} {flags}", t.grad, g, torch.float32, L[name], backend)
            else:
                assert t.grad is None, f"d{name} computed though not requested ({flags})"


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("M,K", [(50, 72), (3, 13)])
def test_applied_mask_is_dropout_mask_bitwise(backend, device, M, K):
    """With x = 1, A = I, B = I, W = 0: y = x̃·Aᵀ·Bᵀ = the mask itself, exactly."""
    p, seed = 0.3, 7
    x = torch.ones(M, K, device=device)
    eye = torch.eye(K, device=device)
    y = run(backend, fastlora.lora_linear, x, torch.zeros(K, K, device=device), eye, eye, 1.0,
            dropout_p=p, seed=seed)
    assert torch.equal(y, fastlora.dropout_mask((M, K), p, seed, device=device))


@pytest.mark.skipif(not INTERPRETED, reason="the float64 Triton path runs under the interpreter here")
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64_triton_interpreter(p):
    torch.manual_seed(0)
    x = torch.randn(3, 2, 9, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def f(x, W, A, B, b):  # 0.75 is exact in fp32, the precision the kernels apply scaling in
        return fastlora.lora_linear(x, W, A, B, 0.75, b, dropout_p=p, seed=3)

    assert fastlora.kernel_backend("cpu") == "triton-interpreter"
    assert torch.autograd.gradcheck(f, (x, W, A, B, b), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_float64_torch_path():
    torch.manual_seed(0)
    args = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((4, 7), (3, 7), (2, 7), (3, 2), (3,))]

    def f(x, W, A, B, b):
        return run("torch", fastlora.lora_linear, x, W, A, B, 1.7, b, dropout_p=0.4, seed=11)

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_reference_explicit_backward_matches_autograd():
    """reference.lora_backward (the CPU fallback's math) against autograd of the plain formula."""
    from fastlora import reference
    x, W, A, B, b, dy = make_inputs(23, 31, 17, 5, torch.float64, "cpu", adapter_dtype=torch.float64)
    mask = fastlora.dropout_mask(x.shape, 0.4, 5, dtype=torch.float64)
    y, S = reference.lora_forward(x, W, A, B, 0.6, b, mask)
    dx, dA, dB = reference.lora_backward(dy, x, W, A, B, S, 0.6, mask)
    y_ref, dx_ref, _, dA_ref, dB_ref, _ = oracle(x, W, A, B, b, 0.6, mask, dy)
    for name, out, ref in (("y", y, y_ref), ("dx", dx, dx_ref), ("dA", dA, dA_ref), ("dB", dB, dB_ref)):
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16], ids=["amp16", "ampbf16"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, "amp"], ids=["W32", "Wamp"])
def test_autocast_behaves_like_linear_plus_peft(backend, device, amp, weight_dtype):
    """Under autocast: input, weight, bias cast to the autocast dtype (as nn.Linear), LoRA matmuls
    in that dtype (as PEFT), fp32 adapters keep fp32 grads; an fp32 activation with half weights works."""
    skip_unsupported(backend, amp)
    device_type = torch.device(device).type
    x, W, A, B, b, dy = make_inputs(37, 45, 70, 12, torch.float32, device)
    if weight_dtype == "amp":
        W, b = W.to(amp), b.to(amp)
    x.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    with torch.autocast(device_type, dtype=amp):
        y = run(backend, fastlora.lora_linear, x, W, A, B, 2.0, b, dropout_p=0.1, seed=4)
        base = torch.nn.functional.linear(x, W, b)
    assert y.dtype == amp == base.dtype
    y.float().backward(dy)
    assert x.grad.dtype == torch.float32 and A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    # the same computation written out in the autocast dtype
    mask = fastlora.dropout_mask(x.shape, 0.1, 4, device=device, dtype=torch.float64)
    ref = oracle(x.to(amp), W.to(amp), A.to(amp), B.to(amp), b.to(amp), 2.0, mask, dy.to(amp))
    assert_close("y", y, ref[0], amp, 82, backend)
    assert_close("dx", x.grad, ref[1], amp, 57, backend)
    assert_close("dA", A.grad, ref[3], amp, 37, backend)
    assert_close("dB", B.grad, ref[4], amp, 37, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", [(7,), (2, 3, 5), (0,)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scaling", [1.7, 2, "np", "tensor"])
def test_no_grad_cpu_fast_path_matches_autograd_path_bitwise(dtype, lead, bias, scaling, monkeypatch):
    """The torch path's no-grad shortcut (decode steps) gives the autograd path's exact bits,
    with dropout off by ``training=False`` too, strided inputs, and every kind of scaling; the
    shortcut is taken (the operator body is not reached)."""
    import numpy as np

    from fastlora import ops
    from fastlora.backend import force_backend
    scaling = {"np": np.float32(1.7), "tensor": torch.tensor(1.7, dtype=dtype)}.get(scaling, scaling)
    g = torch.Generator().manual_seed(3)
    K, N, r = 33, 20, 12
    x = torch.randn(*lead, 2 * K, dtype=dtype, generator=g)[..., ::2]  # strided last dim
    W = torch.randn(N, K, dtype=dtype, generator=g)
    A = torch.randn(r, K, dtype=dtype, generator=g)
    B = torch.randn(N, r, dtype=dtype, generator=g)
    b = torch.randn(N, dtype=dtype, generator=g) if bias else None
    with force_backend("torch"):
        with torch.no_grad(), monkeypatch.context() as m:
            if lead != (0,):
                m.setattr(ops, "forward_impl", lambda *a, **k: pytest.fail("the no-grad shortcut was not taken"))
            fast = fastlora.lora_linear(x, W, A, B, scaling, b, dropout_p=0.3, training=False)
        Ag = A.clone().requires_grad_()
        full = fastlora.lora_linear(x, W, Ag, B, scaling, b, dropout_p=0.3, training=False)
    assert fast.shape == (*lead, N) and fast.dtype == dtype
    assert torch.equal(fast, full.detach())
    ref = (x.double() @ W.double().t() + float(scaling) * (x.double() @ A.double().t()) @ B.double().t()
           + (b.double() if bias else 0))
    if fast.numel():
        assert_close("y", fast, ref, dtype, K)
