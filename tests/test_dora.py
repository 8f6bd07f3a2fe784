"""DoRA (fastlora/dora.py, kernels/dora.py): the forward and every gradient (magnitude, lora_A,
lora_B, x, bias, W) against the fp64 oracle on both Triton paths and the torch path; the row
norm and dy kernels on their own; layers (PEFT's init, merge math), inject_lora, PEFT-format
adapters both ways, torch.compile, checkpointing, errors. PEFT models: tests/test_peft.py;
FSDP2: tests/test_training_setups.py."""
import copy
import itertools
import math

import pytest
import torch
from torch import nn

import fastlora
from _lora_testing import INTERPRETED, assert_close, backends, run, skip_unsupported
from fastlora import reference
from fastlora.backend import force_backend, kernels

KERNELS = [pytest.param("cpu", id="interp")] if INTERPRETED else \
    ([pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])
# (backend, path): the torch path, and each Triton path under the interpreter / on a GPU
PATHS = [pytest.param("torch", "", id="torch")] + (
    [pytest.param("triton-interpreter", p, id=f"interp-{p}") for p in ("fused", "hybrid")] if INTERPRETED else
    [pytest.param("triton", p, id=f"gpu-{p}", marks=pytest.mark.gpu) for p in ("fused", "hybrid")]
    if torch.cuda.is_available() else [])


def _device(backend):
    return "cuda" if backend == "triton" else "cpu"


def _inputs(M, N, K, r, dtype, device, seed=0, adapter_dtype=None, lead=None):
    """x [*lead or M, K], W [N, K], A [r, K], B [N, r] (B nonzero: g ≠ m/‖W‖), m [N] away from ‖W‖, b, dy."""
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype
    shape = (M, K) if lead is None else (*lead, K)
    x = torch.randn(shape, generator=g)
    W = torch.randn(N, K, generator=g) / math.sqrt(K)
    A = torch.randn(r, K, generator=g) / math.sqrt(K)
    B = torch.randn(N, r, generator=g) / math.sqrt(r)
    m = torch.linalg.vector_norm(W, dim=1) * (0.5 + torch.rand(N, generator=g))
    b = torch.randn(N, generator=g)
    dy = torch.randn(*shape[:-1], N, generator=g)
    to = lambda t, d=dtype: t.to(device=device, dtype=d)  # noqa: E731
    return to(x), to(W), to(A, adapter_dtype), to(B, adapter_dtype), to(m, adapter_dtype), to(b), to(dy)


def _oracle(x, W, A, B, m, b, scaling, mask, dy, needs):
    leaves = [t.detach().double().requires_grad_(bool(n)) if t is not None else None
              for t, n in zip((x, W, A, B, m, b), needs)]
    y = reference.dora_linear_ref(*leaves[:5], scaling, leaves[5], None if mask is None else mask.double())
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None and t.requires_grad], dy.double())
    return y.detach(), grads


def _call(backend, path, x, W, A, B, m, b, scaling, p, seed, monkeypatch):
    if path:
        monkeypatch.setenv("FASTLORA_PATH", path)
    return run(backend, fastlora.lora_linear, x, W, A, B, scaling, b, dropout_p=p, seed=seed, magnitude=m)


# (x, W, A, B, m, b): every gradient but the frozen base weight's (the usual case, which takes the
# folded backward, fastlora::dora_linear_bwd); a trainable W takes the dz route (test_trainable_base_weight)
FROZEN_W = (True, False, True, True, True, True)


def _check_all(backend, path, M, N, K, r, dtype, scaling, p, monkeypatch, needs=FROZEN_W, lead=None, seed=0,
               W_layout="nk", bias=True):
    device = _device(backend)
    x, W, A, B, m, b, dy = _inputs(M, N, K, r, dtype, device, seed=seed, lead=lead)
    if W_layout == "kn":  # GPT-2 Conv1D: the weight stored [K, N], passed transposed
        W = W.t().contiguous().t()
    b = b if bias else None
    leaves = [t.detach().clone().requires_grad_(bool(n)) if t is not None else None
              for t, n in zip((x, W, A, B, m, b), needs)]
    y = _call(backend, path, *leaves, scaling, p, 5, monkeypatch)
    mask = fastlora.dropout_mask(x.shape, p, 5, device=device, dtype=torch.float64) if p > 0 else None
    y_ref, g_ref = _oracle(x, W, A, B, m, b, scaling, mask, dy, needs)
    L = max(K, N, M)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close("y", y, y_ref, dtype, L, backend)
    want = [t for t in leaves if t is not None and t.requires_grad]
    if not want:
        return
    got = torch.autograd.grad(y, want, dy)
    names = [n for n, t in zip(("dx", "dW", "dA", "dB", "dm", "db"), leaves) if t is not None and t.requires_grad]
    for name, gv, gr, t in zip(names, got, g_ref, want):
        assert gv.dtype == t.dtype and gv.shape == t.shape, name
        assert_close(name, gv, gr, dtype, L * 4, backend)


# ---------------------------------------------------------------------------------------------
# forward and gradients against the fp64 oracle
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("M,N,K,r,scaling", [(37, 45, 29, 1, 2.0), (19, 24, 70, 12, 0.7), (5, 67, 33, 33, 1.5)])
def test_forward_and_every_gradient(backend, path, dtype, M, N, K, r, scaling, monkeypatch):
    _check_all(backend, path, M, N, K, r, dtype, scaling, 0.0, monkeypatch)


@pytest.mark.parametrize("backend,path", PATHS)
def test_dropout_mask_on_the_lora_branch_only(backend, path, monkeypatch):
    """fastlora.dropout_mask(x.shape, p, seed) is the mask: y = g ⊙ (x·Wᵀ + s·((mask ⊙ x)·Aᵀ)·Bᵀ) + b."""
    _check_all(backend, path, 23, 40, 36, 12, torch.float32, 0.8, 0.3, monkeypatch, lead=(23,))


@pytest.mark.parametrize("backend,path", PATHS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_trainable_base_weight(backend, path, p, monkeypatch):
    """W requires grad too (dW = dzᵀ·x needs dz: the dy pass writes it, then LoRA's backward)."""
    _check_all(backend, path, 23, 40, 36, 12, torch.float32, 0.8, p, monkeypatch, needs=(True,) * 6, lead=(23,))


@pytest.mark.parametrize("backend,path", PATHS)
def test_conv1d_layout_batched_input_no_bias(backend, path, monkeypatch):
    _check_all(backend, path, 0, 31, 48, 5, torch.float32, 1.3, 0.0, monkeypatch, lead=(3, 7), W_layout="kn",
               bias=False)


@pytest.mark.parametrize("backend,path", PATHS[:2])
@pytest.mark.parametrize("needs", [n for n in itertools.product([False, True], repeat=5) if sum(n) in (1, 2, 4)])
def test_every_requires_grad_combination(backend, path, needs, monkeypatch):
    """(x, A, B, m, b) requires_grad subsets (W never): only those gradients, each right."""
    x_, A_, B_, m_, b_ = needs
    _check_all(backend, path, 9, 20, 16, 3, torch.float64, 0.6, 0.0, monkeypatch, needs=(x_, False, A_, B_, m_, b_))


TRITON_PATHS = PATHS[1:]


@pytest.mark.parametrize("backend,path", TRITON_PATHS)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
def test_several_row_column_and_rank_blocks(backend, path, deterministic, monkeypatch):
    """M, N and r each over several blocks (interpreter: 3 row blocks, N split in 2 programs, 2
    rank blocks), so that the fused backward's per-row-block magnitude sums, written by the first
    rank block only, and its g-scaled dy tiles in B1, B2 and (deterministic mode) B3's dB are all
    exercised; deterministic mode twice, bitwise equal."""
    r = 100 if path == "fused" else 20  # the hybrid backward takes r <= 32 (larger r runs fused)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        _check_all(backend, path, 130, 150, 40, r, torch.float32, 0.9, 0.0, monkeypatch)
        _check_all(backend, path, 130, 150, 40, r, torch.float32, 0.9, 0.0, monkeypatch,
                   needs=(False, False, True, True, True, False))  # no dx: the hybrid path folds g too
        if deterministic:
            x, W, A, B, m, b, dy = _inputs(130, 150, 40, r, torch.float32, _device(backend))
            outs = []
            for _ in range(2):
                leaves = [t.clone().requires_grad_() for t in (x, A, B, m)]
                y = _call(backend, path, leaves[0], W, leaves[1], leaves[2], leaves[3], b, 0.9, 0.0, None,
                          monkeypatch)
                outs.append(torch.autograd.grad(y, leaves, dy))
            assert all(torch.equal(u, v) for u, v in zip(*outs))
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("device", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("path", ["fused", "hybrid"])
def test_folded_backward_has_the_bits_of_lora_backward_on_dz(device, dtype, path):
    """Applying g to each dy tile as it loads (rounded to dy's dtype) is exactly LoRA's backward on
    a stored ``dz = round(dy ⊙ g)``: dx, dA and dB bitwise equal in deterministic mode (one fixed
    config, no atomics), and B1's per-row-block sums of dy ⊙ z match the fp64 sums."""
    k = kernels()
    x, W, A, B, _, _, dy = _inputs(70, 150, 40, 12, dtype, device)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(70, 150, generator=gen).to(device, dtype)
    g = (0.5 + torch.rand(150, generator=gen)).to(device)
    S = x.float() @ A.float().t()
    scale = torch.tensor([0.7], device=device)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    ref = (dy.double() * z.double()).sum(0)
    try:
        dz = (dy.float() * g).to(dtype)
        for need_dx in (True, False):  # the hybrid path folds g only without dx (cuBLAS's dz·W reads dz)
            dx0, dAB0 = k.lora_linear_bwd(dz, x, W, A, B, S, scale, need_dx=need_dx, path=path)
            dx1, dAB1, cs = k.dora_linear_bwd(dy, z, g, x, W, A, B, S, scale, need_dx=need_dx, path=path)
            assert (dx0 is None and dx1 is None) or torch.equal(dx0, dx1)
            assert torch.equal(dAB0, dAB1)
            assert (cs.double() - ref).abs().max() <= 1e-5 * ref.abs().max() * 70 ** 0.5  # fp32 sums of 70 terms
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("backend,path", TRITON_PATHS)
@pytest.mark.parametrize("needs", ["xABm", "ABm", "m", "xAB"])
def test_no_dz_tensor_on_the_fused_path(backend, path, needs, monkeypatch):
    """The fused backward folds dz = dy ⊙ g into the kernels that read dy and sums Σ dy ⊙ z in B1:
    the dy pass (D2) runs only where nothing else reads dy (the magnitude alone needs a gradient:
    the sums, no dz) and on the hybrid path when dx is needed (cuBLAS's dz·W reads dz)."""
    import fastlora.kernels.dora as kd
    import fastlora.kernels.lora_backward as kb
    calls = []
    real = kd.dora_dy
    counted = lambda *a, **k: calls.append((k.get("scale_dy", True), k.get("colsum", True))) or real(*a, **k)  # noqa: E731
    for module in (kd, kb):  # D2's definition and the backward launcher's import of it
        monkeypatch.setattr(module, "dora_dy", counted)
    device = _device(backend)
    x, W, A, B, m, b, dy = _inputs(33, 70, 24, 5, torch.float32, device)
    flags = {c: c in needs for c in "xABm"}
    leaves = [t.clone().requires_grad_(flags[c]) for t, c in zip((x, A, B, m), "xABm")]
    y = _call(backend, path, leaves[0], W, leaves[1], leaves[2], leaves[3], b, 0.9, 0.0, None, monkeypatch)
    want = [t for t in leaves if t.requires_grad]
    got = torch.autograd.grad(y, want, dy)
    _, ref = _oracle(x, W, A, B, m, b, 0.9, None, dy, (flags["x"], False, flags["A"], flags["B"], flags["m"], False))
    for gv, gr in zip(got, ref):
        assert_close("grad", gv, gr, torch.float32, 280, backend)
    if needs == "m":
        assert calls == [(False, True)], calls
    elif path == "hybrid" and flags["x"]:
        assert calls == [(True, flags["m"])], calls
    else:
        assert calls == [], calls


@pytest.mark.parametrize("backend,path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("adapters", ["fp32", "model"])
def test_half_precision_against_the_oracle(backend, path, dtype, adapters, monkeypatch):
    """fp16 / bf16 compute with fp32 adapters (PEFT's default on half models) or adapters in the
    model dtype: within the dtype's tolerance of the oracle. Measured relative (Frobenius) errors
    of y / the grads: fp16 ≤ 3.2e-4 / 4.5e-4 on every path, bf16 (torch path) ≤ 2.6e-3 / 3.5e-3.
    bf16 runs compiled on a GPU (the interpreter's bf16 dot is wrong)."""
    skip_unsupported(backend, dtype)
    device = _device(backend)
    adapter_dtype = torch.float32 if adapters == "fp32" else dtype
    x, W, A, B, m, b, dy = _inputs(21, 40, 56, 8, dtype, device, adapter_dtype=adapter_dtype)
    leaves = [t.detach().clone().requires_grad_(bool(n)) for t, n in zip((x, W, A, B, m, b), (1, 0, 1, 1, 1, 1))]
    y = _call(backend, path, *leaves, 1.5, 0.0, None, monkeypatch)
    assert y.dtype == dtype
    y_ref, g_ref = _oracle(x, W, A, B, m, b, 1.5, None, dy, (1, 0, 1, 1, 1, 1))
    assert_close("y", y, y_ref, dtype, 56, backend)
    got = torch.autograd.grad(y, [leaves[i] for i in (0, 2, 3, 4, 5)], dy)
    for name, gv, gr in zip(("dx", "dA", "dB", "dm", "db"), got, g_ref):
        assert_close(name, gv, gr, dtype, 56 * 4, backend)
    assert [t.dtype for t in got] == [dtype, adapter_dtype, adapter_dtype, adapter_dtype, dtype]


@pytest.mark.parametrize("backend,path", PATHS)
def test_strided_views_and_empty_batch(backend, path, monkeypatch):
    device = _device(backend)
    x, W, A, B, m, b, dy = _inputs(12, 40, 34, 4, torch.float64, device)
    xs = torch.randn(12, 2 * 34, dtype=torch.float64, device=device)[:, ::2].requires_grad_()  # stride 2
    Ws = W.t().contiguous().t()
    y = _call(backend, path, xs, Ws, A, B, m, b, 0.9, 0.0, None, monkeypatch)
    y_ref, _ = _oracle(xs, W, A, B, m, b, 0.9, None, dy, (1, 0, 0, 0, 0, 0))
    assert_close("y", y, y_ref, torch.float64, 40, backend)
    (dx,) = torch.autograd.grad(y, xs, dy)
    _, (dx_ref,) = _oracle(xs, W, A, B, m, b, 0.9, None, dy, (1, 0, 0, 0, 0, 0))
    assert_close("dx", dx, dx_ref, torch.float64, 40, backend)
    m_ = m.clone().requires_grad_()
    empty = torch.zeros(0, 34, dtype=torch.float64, device=device, requires_grad=True)
    y0 = _call(backend, path, empty, W, A, B, m_, b, 0.9, 0.0, None, monkeypatch)
    assert y0.shape == (0, 40)
    y0.sum().backward()
    assert torch.equal(m_.grad, torch.zeros_like(m))


def test_fresh_magnitude_reproduces_the_base_exactly():
    """m = ‖W + s·B·A‖ gives g = 1: y equals the LoRA output (PEFT's init property)."""
    x, W, A, B, _, b, _ = _inputs(10, 24, 20, 4, torch.float64, "cpu")
    m = fastlora.dora.weight_norm(W, A, B, 0.5, acc=torch.float64, backend="torch")
    torch.testing.assert_close(fastlora.lora_linear(x, W, A, B, 0.5, b, magnitude=m),
                               fastlora.lora_linear(x, W, A, B, 0.5, b), rtol=1e-14, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# the kernels on their own
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", KERNELS)
@pytest.mark.parametrize("r", [1, 20, 33, 100, 200])  # rank blocks 16, 32, 64, 128 and the chunked loop
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_row_norm_kernel(device, r, layout, dtype):
    """‖W + s·B·A‖ per row in one pass over W (K split into partial sums), both weight layouts;
    measured relative errors: fp32 ≤ 2e-7, fp64 ≤ 8e-16."""
    N, K = 70, 300
    g = torch.Generator().manual_seed(r)
    W = torch.randn(N, K, generator=g, dtype=torch.float64)
    A, B = torch.randn(r, K, generator=g, dtype=torch.float64), torch.randn(N, r, generator=g, dtype=torch.float64)
    ref = torch.linalg.vector_norm(W + 0.3 * B @ A, dim=1)
    Wd = W.to(dtype).to(device)
    Wd = Wd.t().contiguous().t() if layout == "kn" else Wd
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n = kernels().dora.dora_norm(Wd, A.to(dtype).to(device), B.to(dtype).to(device),
                                 torch.tensor([0.3], dtype=acc, device=device))
    assert n.dtype == acc and n.shape == (N,)
    err = ((n.double().cpu() - ref) / ref).abs().max().item()
    assert err <= (1e-6 if dtype == torch.float32 else 1e-14), err


@pytest.mark.parametrize("device", KERNELS)
def test_dy_kernel(device):
    """dz = dy ⊙ g exactly (one rounding), Σ_M dy ⊙ z over row slabs (deterministic partial sums)."""
    M, N = 150, 77
    g_ = torch.Generator().manual_seed(0)
    dy, z = torch.randn(M, N, generator=g_), torch.randn(M, N, generator=g_)
    g = torch.rand(N, generator=g_) + 0.5
    dyd, zd = dy.to(device).t().contiguous().t(), z.to(device)  # column-major dy
    dz, cs = kernels().dora.dora_dy(dyd, zd, g.to(device))
    assert torch.equal(dz.cpu(), dy * g) and dz.is_contiguous()
    ref = (dy.double() * z.double()).sum(0)
    assert ((cs.double().cpu() - ref).abs() / ref.abs().clamp_min(1)).max() <= 1e-5
    dz2, none = kernels().dora.dora_dy(dyd, zd, g.to(device), colsum=False)
    assert none is None and torch.equal(dz2, dz)
    assert torch.equal(kernels().dora.dora_dy(dyd, zd, g.to(device), scale_dy=False)[1], cs)


# ---------------------------------------------------------------------------------------------
# layers, inject_lora, adapters
# ---------------------------------------------------------------------------------------------
def _dora_layer(K=24, N=18, r=4, bias=True, seed=0, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(K, N, bias=bias)
    layer = fastlora.LoRALinear.from_linear(copy.deepcopy(base), r=r, lora_alpha=8, use_dora=True, **kw)
    return base, layer


@pytest.mark.parametrize("backend,device", backends())
def test_fresh_layer_equals_its_base_and_trains_the_magnitude(backend, device):
    base, layer = _dora_layer()
    assert layer.use_dora and "use_dora=True" in repr(layer)
    assert layer.lora_magnitude_vector.shape == (18,) and layer.lora_magnitude_vector.requires_grad
    torch.testing.assert_close(layer.lora_magnitude_vector, torch.linalg.vector_norm(base.weight, dim=1))
    x = torch.randn(5, 24)
    with force_backend(backend):
        torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)
        layer(x).square().sum().backward()
    assert layer.lora_magnitude_vector.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0
    assert "lora_magnitude_vector" in dict(layer.named_parameters())
    fresh = fastlora.LoRALinear(24, 18, r=4, use_dora=True)
    torch.testing.assert_close(fresh.lora_magnitude_vector, torch.linalg.vector_norm(fresh.weight, dim=1))


def test_merge_unmerge_and_merged_linear_follow_peft():
    """PEFT's DoRA merge: W' = m/‖W + ΔW‖ ⊙ (W + ΔW), unmerge with the norm of the merge."""
    _, layer = _dora_layer(bias=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 18))
    x = torch.randn(6, 24)
    with torch.no_grad():
        y = layer(x)
        lin = layer.merged_linear()
        torch.testing.assert_close(lin(x), y, rtol=1e-5, atol=1e-5)
        W0 = layer.weight.detach().clone()
        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.weight, lin.weight, rtol=1e-6, atol=1e-6)
        layer.unmerge()
        torch.testing.assert_close(layer.weight, W0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_inject_lora_dora_and_peft_adapter_round_trips(tmp_path):
    """save_adapter writes PEFT's DoRA format (PeftModel.from_pretrained gives the same outputs);
    load_adapter reads what PEFT saves."""
    peft = pytest.importorskip("peft")
    from _tiny_models import TARGETS, batch, build
    base = build("llama")
    model = copy.deepcopy(base)
    fastlora.inject_lora(model, TARGETS["llama"], r=4, lora_alpha=8, use_dora=True)
    layers = [m for m in model.modules() if isinstance(m, fastlora.LoRALinear)]
    assert layers and all(m.use_dora for m in layers)
    with torch.no_grad():
        for m in layers:
            m.lora_B.weight.normal_(std=0.1)
            m.lora_magnitude_vector.mul_(1.2)
    ids = batch("llama")["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    fastlora.save_adapter(model, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert pm.peft_config["default"].use_dora
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-5)
        for n, p in pm.named_parameters():  # PEFT perturbs nothing when loading: magnitude as saved
            if "lora_magnitude_vector" in n:
                assert p.abs().sum() > 0
    # PEFT -> fastlora: a PEFT DoRA model saved by PEFT, loaded into plain LoRA layers (made DoRA)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"], use_dora=True)
    pm2 = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, p in pm2.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
            if "lora_magnitude_vector" in n:
                p.mul_(0.9)
        theirs = pm2(input_ids=ids).logits
    pm2.save_pretrained(tmp_path / "theirs")
    target = copy.deepcopy(base)
    fastlora.inject_lora(target, TARGETS["llama"], r=4, lora_alpha=8)
    with pytest.warns(UserWarning, match="made DoRA"):
        fastlora.load_adapter(target, tmp_path / "theirs")
    assert all(m.use_dora for m in target.modules() if isinstance(m, fastlora.LoRALinear))
    with torch.no_grad():
        torch.testing.assert_close(target(input_ids=ids).logits, theirs, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# torch.compile, checkpointing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", backends())
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    _, layer = _dora_layer()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 24, requires_grad=True)
    outs = []
    with force_backend(backend):
        for m in (compiled, layer):
            y = m(x)
            y.square().sum().backward()
            outs.append((y.detach(), x.grad.clone(), layer.lora_magnitude_vector.grad.clone(),
                         layer.lora_A.weight.grad.clone()))
            x.grad = None
            layer.zero_grad(set_to_none=True)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", backends())
def test_activation_checkpointing_same_gradients(backend, device):
    from torch.utils.checkpoint import checkpoint
    _, layer = _dora_layer(lora_dropout=0.2)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x0 = torch.randn(4, 3, 24)
    grads = []
    with force_backend(backend):
        for ckpt in (False, True):
            torch.manual_seed(3)
            x = x0.clone().requires_grad_()
            y = checkpoint(layer, x, use_reentrant=False) if ckpt else layer(x)
            y.square().mean().backward()
            grads.append([x.grad] + [p.grad.clone() for p in layer.parameters() if p.grad is not None])
            layer.zero_grad(set_to_none=True)
    assert len(grads[0]) == len(grads[1]) == 4  # x, lora_A, lora_B, magnitude
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_bad_magnitudes_raise_before_any_work():
    x, W, A, B, m, b, _ = _inputs(4, 6, 5, 2, torch.float32, "cpu")
    for bad, exc, words in [(m[:5], ValueError, ["magnitude", "[6]", "(5,)"]),
                            (m.to(torch.int64), TypeError, ["magnitude"]),
                            (m[None], ValueError, ["magnitude"]),
                            (m.to("meta"), ValueError, ["magnitude", "device"])]:
        with pytest.raises(exc) as info:
            fastlora.lora_linear(x, W, A, B, 1.0, b, magnitude=bad)
        assert all(w in str(info.value) for w in words), (str(info.value), words)
    with pytest.raises(TypeError, match="use_dora"):
        fastlora.LoRALinear(4, 4, use_dora="yes")
