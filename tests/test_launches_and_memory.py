"""Launch budget (forward 2, backward 3 + one memset; deterministic: 3) and bytes saved for
backward (the input itself, S [M, r] and the seed, plus on the CPU's torch path the bit-packed
dropout mask, M·K/8 bytes: nothing of size M×K or M×N)."""
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _lora_testing import HAS_CUDA, INTERPRETED, backends, fastlora, make_inputs, run
from fastlora.kernels import LAUNCH_COUNTS

# aten ops that allocate or alias and launch no kernel
_NO_KERNEL = ("empty", "new_empty", "view", "_unsafe_view", "slice", "select", "detach", "alias", "as_strided",
              "lift_fresh", "_local_scalar_dense", "set_", "t.", "transpose", "expand", "reshape", "unsqueeze",
              "squeeze")


class TorchOps(TorchDispatchMode):
    """Records the aten ops that launch a kernel, except those inside a fastlora Triton launch
    (the interpreter moves tensors with torch ops of its own). fastlora's own ``torch.library``
    operators show up as one op each (their insides are not dispatched through this mode)."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self.inside_launch = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func).removeprefix("aten.")
        if not self.inside_launch and not name.startswith(_NO_KERNEL):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def torch_ops(monkeypatch):
    mode = TorchOps()
    for mod in ("fastlora.kernels.lora_forward", "fastlora.kernels.lora_backward"):
        m = importlib.import_module(mod)
        original = m.launch

        def wrapped(*args, _original=original, **kwargs):
            mode.inside_launch = True
            try:
                return _original(*args, **kwargs)
            finally:
                mode.inside_launch = False

        monkeypatch.setattr(m, "launch", wrapped)
    return mode


def triton_backends():
    return [p for p in backends() if p.values[0] != "torch"]


@pytest.mark.skipif(not (INTERPRETED or HAS_CUDA), reason="needs the Triton interpreter or a GPU")
@pytest.mark.parametrize("backend,device", triton_backends())
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_launch_budget(backend, device, torch_ops, deterministic):
    if device == "cuda":
        pytest.skip("dispatch modes do not see the CUDA backward thread; test_gpu.py counts CUDA kernels")
    x, W, A, B, b, dy = make_inputs(150, 48, 96, 16, torch.float32, device, bias=True)
    x.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        run(backend, fastlora.lora_linear, x, W, A, B, 2.0, b, dropout_p=0.1, seed=5)  # caches the scale tensor
        before = LAUNCH_COUNTS.copy()
        with torch_ops:
            y = run(backend, fastlora.lora_linear, x, W, A, B, 2.0, b, dropout_p=0.1, seed=5)
        fwd = LAUNCH_COUNTS - before
        fwd_ops, torch_ops.ops = torch_ops.ops, []
        before = LAUNCH_COUNTS.copy()
        with torch_ops:
            y.backward(dy)
        bwd = LAUNCH_COUNTS - before
    finally:
        torch.use_deterministic_algorithms(prev)
    assert dict(fwd) == {"shrink": 1, "fwd": 1}, fwd
    assert dict(bwd) == {"bwd_dy": 1, "bwd_dx": 1, "bwd_da": 1}, bwd
    # around the kernels (called directly outside torch.compile): no kernel but, in the default
    # mode, the memset of the backward's atomic [dB | dA] workspace (split reductions zero their
    # own outputs inside the launches)
    assert fwd_ops == [], fwd_ops
    assert torch_ops.ops == ([] if deterministic else ["zeros.default"]), torch_ops.ops

    # the backward launcher alone: one memset of the atomic workspace; deterministic mode has no
    # atomics and needs none
    from fastlora.backend import kernels
    from fastlora.dropout import keep_params
    S = torch.randn(150, 16, device=device)
    scale = torch.tensor([2.0], device=device)
    torch.use_deterministic_algorithms(deterministic)
    try:
        torch_ops.ops = []
        with torch_ops:
            kernels().lora_linear_bwd(dy, x.detach(), W, A.detach(), B.detach(), S, scale,
                                      torch.tensor([5], device=device), *keep_params(0.1))
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch_ops.ops == ([] if deterministic else ["zeros.default"]), torch_ops.ops


@pytest.mark.skipif(not (INTERPRETED or HAS_CUDA), reason="needs the Triton interpreter or a GPU")
@pytest.mark.parametrize("backend,device", triton_backends())
def test_backward_skips_what_is_not_needed(backend, device):
    x, W, A, B, b, dy = make_inputs(40, 24, 32, 4, torch.float32, device)
    cases = {  # which leaves require grad -> expected launches
        "x": ({"bwd_dy": 1, "bwd_dx": 1}),
        "A": ({"bwd_dy": 1, "bwd_da": 1}),
        "B": ({"bwd_dy": 1}),
        "xAB": ({"bwd_dy": 1, "bwd_dx": 1, "bwd_da": 1}),
    }
    for leaves, expected in cases.items():
        ts = {"x": x.clone(), "A": A.clone(), "B": B.clone()}
        for k in leaves:
            ts[k].requires_grad_()
        y = run(backend, fastlora.lora_linear, ts["x"], W, ts["A"], ts["B"], 2.0, b, dropout_p=0.2, seed=1)
        before = LAUNCH_COUNTS.copy()
        y.backward(dy)
        assert dict(LAUNCH_COUNTS - before) == expected, leaves


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saved_for_backward_is_input_S_and_seed_only(backend, device, p):
    M, N, K, r = 120, 80, 96, 8
    x, W, A, B, b, dy = make_inputs(M, N, K, r, torch.float16, device, bias=True)
    if backend == "triton-interpreter":
        x, W, b, dy = x.float(), W.float(), b.float(), dy.float()
    x.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = run(backend, fastlora.lora_linear, x, W, A, B, 2.0, b, dropout_p=p, seed=3)
    params = {t.data_ptr() for t in (x, W, A, B)}
    extra = [t for t in saved if t.data_ptr() not in params]
    extra_bytes = sum(t.numel() * t.element_size() for t in extra)
    assert all(t.numel() < min(M * K, M * N) for t in extra), [tuple(t.shape) for t in extra]
    # the torch path on a CPU also keeps the bit-packed dropout mask (M·K/8 bytes) for the backward
    packed = M * -(-K // 8) if backend == "torch" and p > 0 else 0
    assert extra_bytes == M * r * 4 + (8 if p > 0 else 0) + packed, [(tuple(t.shape), t.dtype) for t in extra]
    y.backward(dy)  # the saved set suffices
