"""Shared test helpers: backends to test, input factories, the fp64 oracle and tolerances."""
import math

import pytest
import torch

import fastlora
from fastlora import reference
from fastlora.backend import force_backend, kernels

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = kernels() is not None and kernels().INTERPRETED


def backends():
    """(backend, device) pairs this machine can run, as pytest params with readable ids."""
    out = [pytest.param("torch", "cpu", id="torch")]
    if INTERPRETED:
        out.append(pytest.param("triton-interpreter", "cpu", id="interp"))
    if HAS_CUDA and not INTERPRETED:
        out.append(pytest.param("triton", "cuda", id="triton", marks=pytest.mark.gpu))
    return out


def skip_unsupported(backend, dtype, lora_dtype=None):
    """Skip bf16 math on the interpreter (fastlora routes it to the torch path there, and a forced
    interpreter backend refuses it: tests/test_errors.py checks both)."""
    if backend == "triton-interpreter" and torch.bfloat16 in (dtype, lora_dtype):
        pytest.skip("bf16 tl.dot is wrong under the Triton interpreter (triton#11584); tested compiled on GPU")


# Unit roundoff of each dtype; tf32 keeps 10 mantissa bits.
EPS = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
       torch.bfloat16: 2.0 ** -8}
TF32_EPS = 2.0 ** -11


def coarser(*dtypes):
    """The least precise of ``dtypes`` (a gradient rounded to its tensor's dtype)."""
    return max(dtypes, key=EPS.get)


def tolerance(dtype, L, backend="torch"):
    """Bound on the relative error of a fastlora output against the fp64 oracle.

    Low precision: rounding x̃, S, dS and the output to ``dtype`` (a few ulps, independent of
    the reduction length). Accumulation: fp32 (fp64) error growing like √L. Measured on this
    suite's cases (fp32 ≤ 7e-7 at L ≤ 300, fp16 ≤ 6e-4), the bound keeps a 3-8x margin.
    """
    eps = EPS[dtype]
    if dtype == torch.float32 and backend == "triton" and torch.backends.cuda.matmul.allow_tf32:
        eps = TF32_EPS
    acc_eps = EPS[torch.float64] if dtype == torch.float64 else EPS[torch.float32]
    return 8 * eps + 4 * acc_eps * math.sqrt(L)


def assert_close(name, out, ref, dtype, L, backend="torch"):
    """Relative Frobenius error ≤ tolerance, and every element within 8·tol of the ref's scale."""
    assert out is not None, f"{name}: no gradient returned"
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    ref = ref.detach()
    out64 = out.detach().to(device=ref.device, dtype=torch.float64)
    assert torch.isfinite(out64).all(), f"{name}: non-finite values"
    tol = tolerance(dtype, L, backend)
    denom = ref.norm().item()
    assert denom > 0, f"{name}: the reference is all zeros, the test would prove nothing"
    rel = (out64 - ref).norm().item() / denom
    assert rel <= tol, f"{name}: relative error {rel:.3e} > tolerance {tol:.3e} (dtype {dtype}, L={L})"
    scale = ref.pow(2).mean().sqrt().item()
    worst = (out64 - ref).abs().max().item()
    assert worst <= 8 * tol * (scale + ref.abs().max().item()), \
        f"{name}: max abs error {worst:.3e} too large (scale {scale:.3e}, tol {tol:.3e})"
    if ref.dim() == 2 and ref.shape[0] > 1 and ref.shape[1] > 1:
        # a wrong row or column hides in a global norm over many rows; check each on its own
        for dim, what in ((1, "row"), (0, "column")):
            err = (out64 - ref).norm(dim=dim)
            size = ref.norm(dim=dim).clamp_min(ref.norm().item() / ref.shape[1 - dim] ** 0.5)
            bad = (err / size).max().item()
            assert bad <= 4 * tol, f"{name}: a {what} has relative error {bad:.3e} > {4 * tol:.3e}"


def make_inputs(M, N, K, r, dtype, device, bias=True, adapter_dtype=torch.float32, seed=0, lead=None):
    """Random inputs with unit-scale outputs: x [*lead or M, K], W [N, K], A [r, K], B [N, r]."""
    g = torch.Generator().manual_seed(seed)
    shape = (M, K) if lead is None else (*lead, K)
    x = torch.randn(shape, generator=g).to(dtype)
    W = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(dtype)
    A = (torch.randn(r, K, generator=g) / math.sqrt(K)).to(adapter_dtype)
    B = (torch.randn(N, r, generator=g) / math.sqrt(r)).to(adapter_dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    dy = torch.randn(*shape[:-1], N, generator=g).to(dtype)
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return mv(x), mv(W), mv(A), mv(B), mv(b), mv(dy)


def oracle(x, W, A, B, b, scaling, mask, dy):
    """fp64 forward and gradients of the plain formula (autograd), from the same rounded inputs,
    computed on the inputs' device."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, W, A, B, b)]
    x64, W64, A64, B64, b64 = leaves
    m64 = None if mask is None else mask.double()
    y = reference.lora_linear_ref(x64, W64, A64, B64, scaling, b64, m64)
    y.backward(dy.detach().double())
    return y.detach(), x64.grad, W64.grad, A64.grad, B64.grad, None if b64 is None else b64.grad


def run(backend, fn, *args, **kwargs):
    """Call ``fn`` with fastlora forced onto ``backend`` (CUDA tensors run "triton" anyway)."""
    if backend == "triton":
        return fn(*args, **kwargs)
    with force_backend(backend):
        return fn(*args, **kwargs)


__all__ = ["fastlora", "backends", "skip_unsupported", "tolerance", "assert_close", "make_inputs", "oracle",
           "run", "coarser", "HAS_CUDA", "INTERPRETED"]
