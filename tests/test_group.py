"""Sibling groups (fastlora/group.py): grouped_lora_linear against float64 and against the
ungrouped calls, and the discovery in inject_lora / patch_peft_model staying right when the
siblings do not behave as siblings."""
import copy
import math
import pickle

import pytest
import torch
from torch import nn

import fastlora
from fastlora import Sibling, grouped_lora_linear
from fastlora.group import SiblingGroups

from _lora_testing import assert_close, backends, make_inputs, oracle, run

# (N, r, scaling, bias, dropout_p): differ in everything a sibling may differ in
SIBS = [(45, 12, 2.0, True, 0.25), (19, 1, 0.5, False, 0.0), (33, 33, -1.5, True, 0.1)]


def _siblings(K, dtype, device, seed=0, requires_grad=True, sibs=SIBS):
    out = []
    for j, (N, r, s, has_bias, p) in enumerate(sibs):
        _, W, A, B, b, _ = make_inputs(2, N, K, r, dtype, device, bias=has_bias, adapter_dtype=dtype, seed=seed + j)
        A.requires_grad_(requires_grad)
        B.requires_grad_(requires_grad)
        if b is not None:
            b.requires_grad_(requires_grad)
        out.append(Sibling(W, A, B, s, b, p))
    return out


def _grads(tensors):
    return [None if t is None or t.grad is None else t.grad.clone() for t in tensors]


def _leaves(x, sibs):
    return [x] + [t for s in sibs for t in (s.lora_A, s.lora_B, s.bias)]


def _run_both(backend, x, sibs, dys, seed=7):
    """(ys, grads) grouped and ungrouped, after the same torch.manual_seed (the same masks)."""
    out = []
    for grouped in (True, False):
        for t in _leaves(x, sibs):
            if t is not None:
                t.grad = None
        torch.manual_seed(seed)
        if grouped:
            ys = run(backend, grouped_lora_linear, x, sibs)
        else:
            ys = [run(backend, fastlora.lora_linear, x, s.weight, s.lora_A, s.lora_B, s.scaling, s.bias,
                      dropout_p=s.dropout_p) for s in sibs]
        run(backend, torch.autograd.backward, list(ys), dys)
        out.append(([y.detach() for y in ys], _grads(_leaves(x, sibs))))
    return out


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("lead", [None, (3, 7)], ids=["2d", "3d"])
def test_grouped_equals_ungrouped(backend, device, lead):
    K, M = 70, 21
    x = make_inputs(M, 5, K, 2, torch.float32, device, lead=lead)[0].requires_grad_()
    sibs = _siblings(K, torch.float32, device)
    dys = [torch.randn(*x.shape[:-1], s.weight.shape[0], device=device) for s in sibs]
    (yg, gg), (yu, gu) = _run_both(backend, x, sibs, dys)
    for j in range(len(sibs)):
        assert torch.equal(yg[j], yu[j]), f"y[{j}] differs from the ungrouped call"
    # dA, dB, db: the same ops on the same dy: bitwise on the torch path; the interpreter's
    # atomics add in launch order, also equal here (one process, one order)
    for j, (a, b) in enumerate(zip(gg[1:], gu[1:])):
        if a is not None or b is not None:
            assert torch.equal(a, b), f"gradient {j} of the siblings' parameters differs"
    # dx: one buffer instead of autograd's sum, i.e. another order of the same fp32 sum.
    # Measured here: max |diff| 2.4e-7 on |dx| up to ~10; bound at 8 ulps of the largest value.
    diff = (gg[0] - gu[0]).abs().max().item()
    assert diff <= 8 * 2.0 ** -24 * gu[0].abs().max().item(), f"dx differs by {diff:.3e}"


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_against_float64(backend, device, dtype):
    K, M = 66, 37
    x, *_ = make_inputs(M, 5, K, 2, dtype, device, seed=11)
    x.requires_grad_()
    sibs = [s._replace(seed=100 + j) for j, s in enumerate(_siblings(K, dtype, device, seed=3))]
    for s in sibs:
        s.weight.requires_grad_()
    dys = [torch.randn(M, s.weight.shape[0], device=device, dtype=dtype) for s in sibs]
    ys = run(backend, grouped_lora_linear, x, sibs)
    run(backend, torch.autograd.backward, list(ys), dys)
    dx_ref = torch.zeros(M, K, dtype=torch.float64, device=device)
    for j, (s, y, dy) in enumerate(zip(sibs, ys, dys)):
        mask = None if s.dropout_p == 0 else fastlora.dropout_mask(x.shape, s.dropout_p, s.seed, device=device,
                                                                  dtype=torch.float64)
        y64, dx64, dW64, dA64, dB64, db64 = oracle(x, s.weight, s.lora_A, s.lora_B, s.bias, s.scaling, mask, dy)
        dx_ref += dx64
        assert_close(f"y[{j}]", y, y64, dtype, K, backend)
        assert_close(f"dW[{j}]", s.weight.grad, dW64, dtype, M, backend)
        assert_close(f"dA[{j}]", s.lora_A.grad, dA64, dtype, M, backend)
        assert_close(f"dB[{j}]", s.lora_B.grad, dB64, dtype, M, backend)
        if s.bias is not None:
            assert_close(f"db[{j}]", s.bias.grad, db64, dtype, M, backend)
    assert_close("dx", x.grad, dx_ref, dtype, sum(s.weight.shape[0] + s.lora_A.shape[0] for s in sibs), backend)


@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("adapter_grad", [True, False])
@pytest.mark.parametrize("used", [(0, 1, 2), (1,), (0, 2)])
def test_requires_grad_and_unused_outputs(x_grad, adapter_grad, used):
    K, M = 40, 9
    x = torch.randn(M, K, requires_grad=x_grad)
    sibs = _siblings(K, torch.float32, "cpu", requires_grad=adapter_grad)
    if not (x_grad or adapter_grad):  # something must need a gradient: the base weights (dW by torch)
        for sib in sibs:
            sib.weight.requires_grad_()
    torch.manual_seed(0)
    ys = grouped_lora_linear(x, sibs)
    loss = sum((ys[j] * (j + 1)).sum() for j in used)
    loss.backward()
    torch.manual_seed(0)
    originals = _leaves(x, sibs) + [s.weight for s in sibs]
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in originals]
    x2 = leaves[0]
    sibs2 = [s._replace(lora_A=leaves[1 + 3 * j], lora_B=leaves[2 + 3 * j], bias=leaves[3 + 3 * j],
                        weight=leaves[10 + j]) for j, s in enumerate(sibs)]
    ys2 = [fastlora.lora_linear(x2, *s[:5], dropout_p=s.dropout_p) for s in sibs2]
    for j in range(3):
        assert torch.equal(ys[j], ys2[j])
    sum((ys2[j] * (j + 1)).sum() for j in used).backward()
    for j, (a, b) in enumerate(zip(originals, leaves)):
        if a is None:
            continue
        assert (a.grad is None) == (b.grad is None), f"leaf {j}: gradient present in one run only"
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=8 * 2.0 ** -24 * b.grad.abs().max().item())


def test_bad_sibling_names_itself_and_draws_nothing():
    x = torch.randn(5, 8, requires_grad=True)
    good = Sibling(torch.randn(4, 8), torch.randn(2, 8, requires_grad=True), torch.randn(4, 2), 1.0, None, 0.5)
    bad = Sibling(torch.randn(4, 9), torch.randn(2, 8), torch.randn(4, 2))
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"siblings\[1\]"):
        grouped_lora_linear(x, [good, bad])
    assert torch.equal(state, torch.get_rng_state()), "a seed was drawn before the error"
    with pytest.raises(ValueError, match="siblings"):
        grouped_lora_linear(x, [])
    with pytest.raises(TypeError, match="siblings"):
        grouped_lora_linear(x, [(1, 2, 3, 4, 5, 6, 7, 8)])
    with pytest.raises(TypeError, match=r"siblings\[0\].*dropout_p"):
        grouped_lora_linear(x, [good._replace(dropout_p="a")])


def test_explain_grouped_path():
    x = torch.randn(6, 40, requires_grad=True)
    sibs = _siblings(40, torch.float32, "cpu")
    lines = fastlora.explain_grouped_path(x, sibs)
    assert lines[0].startswith(f"one autograd node for {len(sibs)} siblings") and len(lines) == 1 + len(sibs)
    for j, (line, s) in enumerate(zip(lines[1:], sibs)):
        info = fastlora.explain_path(x, s.weight, s.lora_A, s.lora_B, s.bias, dropout_p=s.dropout_p)
        assert line == f"siblings[{j}]: {info}"
    with torch.no_grad():
        assert fastlora.explain_grouped_path(x, sibs)[0].startswith("per layer: grad mode is off")
    bad = sibs[1]._replace(weight=torch.randn(4, 9))
    with pytest.raises(ValueError, match=r"siblings\[1\]"):
        fastlora.explain_grouped_path(x, [sibs[0], bad])


def test_no_grad_and_compile_contexts_run_per_layer():
    """Outside plain eager autograd the siblings run one by one: the same results."""
    x = torch.randn(6, 40)
    sibs = _siblings(40, torch.float32, "cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        ys = grouped_lora_linear(x, sibs)
    torch.manual_seed(1)
    with torch.no_grad():
        ref = [fastlora.lora_linear(x, *s[:5], dropout_p=s.dropout_p) for s in sibs]
    assert all(torch.equal(a, b) for a, b in zip(ys, ref))


# ------------------------------------------------------------------------------------------
# Discovery in models
# ------------------------------------------------------------------------------------------
class Block(nn.Module):
    """q/k/v read one tensor, o reads another: q/k/v are siblings. ``mode`` bends the rules."""

    def __init__(self, d=24, kv=8):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, kv, bias=False), nn.Linear(d, kv)
        self.o = nn.Linear(d + 2 * kv, d)
        self.mode = "plain"

    def forward(self, x):
        h = self.norm(x)
        q = self.q(h)
        if self.mode == "inplace":
            h = h.mul_(2.0)  # same object, new values and version: k must not take q's group output
        if self.mode == "rng":
            torch.rand(1)  # a draw between siblings: grouping would move k's mask
        k = self.k(h)
        if self.mode == "other":
            h = h.clone()
        v = self.v(h) if self.mode != "skip_v" else torch.zeros(*h.shape[:-1], self.v.out_features)
        return x + self.o(torch.cat([q, k, v], -1))[..., :x.shape[-1]]


class Net(nn.Module):
    def __init__(self, n=2):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _net(group, seed=0, dropout=0.2, r=4):
    torch.manual_seed(seed)
    net = Net()
    fastlora.inject_lora(net, ["q", "k", "v", "o"], r=r, lora_alpha=8, lora_dropout=dropout, group_siblings=group)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return net


def _train(net, steps=3, mode="plain", seed=5, step_fn=None):
    for b in net.blocks:
        b.mode = mode
    torch.manual_seed(seed)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    out = []
    for i in range(steps):
        x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(i))
        loss = (step_fn or (lambda net, x: net(x)))(net, x).pow(2).mean()
        loss.backward()
        out.append((loss.item(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
        opt.step()
        opt.zero_grad()
    return out


def _assert_same_training(a, b, what):
    for i, ((la, ga), (lb, gb)) in enumerate(zip(a, b)):
        # Step 0: the same parameters, the same masks: the same loss, bit for bit. Later steps
        # start from parameters updated with gradients that differ in rounding (below); measured
        # loss difference 3.6e-7 on 1.71 (2e-7 relative).
        if i == 0:
            assert la == lb, f"{what}: step {i} loss {la} != {lb}"
        else:
            assert abs(la - lb) <= 1e-5 * abs(lb), f"{what}: step {i} loss {la} != {lb}"
        for n in ga:
            # LoRA grads of layers after the group are bitwise; upstream of a group dx's order
            # of summation differs (fp32 rounding). Measured: max |diff| 6e-8 on grads ~0.1-1.
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-6, msg=f"{what}: step {i} {n}")


def _grouped_now(net):
    return [tuple(n.rsplit(".", 1)[-1] for n in g) for g in fastlora.sibling_groups(net)]


def test_inject_lora_groups_qkv_and_trains_like_ungrouped():
    ref = _train(_net(False))
    net = _net(True)
    got = _train(net)
    _assert_same_training(got, ref, "grouped")
    assert sorted(_grouped_now(net)) == [("q", "k", "v")] * 2
    groups = net.blocks[0].q._fastlora_groups
    assert groups.counts["grouped"] == 2 * 2 and groups.counts["handed"] == 2 * 2 * 2, groups.counts
    assert _grouped_now(_net(False)) == []


def test_input_modified_in_place_between_siblings():
    """k and v see h changed in place after q: they compute from the new h (as ungrouped); the
    backward then refuses, as the ungrouped layers' backward does (q saved h at its old version)."""
    net, ref_net = _apply_steps(_net(True), 1), _apply_steps(_net(False), 1)
    outs = []
    for n in (net, ref_net):
        for b in n.blocks:
            b.mode = "inplace"
        torch.manual_seed(3)
        outs.append(n(torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(0))))
    assert torch.equal(outs[0], outs[1])
    assert net.blocks[0].q._fastlora_groups.counts["dropped"] >= 2
    for out in outs:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


@pytest.mark.parametrize("mode", ["rng", "other", "skip_v"])
def test_siblings_that_stop_being_siblings(mode):
    """A group learned from plain calls, then: a random draw between q and k, v fed another
    tensor, v not called. The results stay
    the ungrouped ones (same masks: the random stream never moves) and the groups follow the calls."""
    net = _apply_steps(_net(True), 1)
    assert sorted(_grouped_now(net)) == [("q", "k", "v")] * 2
    got = _train(net, steps=3, mode=mode)
    ref = _train(_apply_steps(_net(False), 1), steps=3, mode=mode)
    _assert_same_training(got, ref, mode)
    expected = {"rng": ("q", "k", "v"), "other": ("q", "k"), "skip_v": ("q", "k")}[mode]
    assert sorted(_grouped_now(net)) == [expected] * 2
    counts = net.blocks[0].q._fastlora_groups.counts
    assert counts["dropped"] >= (2 if mode != "rng" else 2 * 2 * 3), counts


def _apply_steps(net, steps):
    _train(net, steps=steps)
    return net


def test_hooked_sibling_is_left_out():
    ref = _train(_apply_steps(_net(False), 1), steps=2)
    net = _apply_steps(_net(True), 1)
    calls = []
    for b in net.blocks:
        b.k.register_forward_pre_hook(lambda m, args: calls.append(1))
    got = _train(net, steps=2)
    _assert_same_training(got, ref, "hooked k")
    assert len(calls) == 2 * 2
    # q cannot hand k its output (k's pre-hook runs first); k and v still read one tensor
    assert sorted(_grouped_now(net)) == [("q", "k", "v")] * 2
    assert net.blocks[0].q._fastlora_groups.counts["handed"] >= 2


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(reentrant):
    from torch.utils.checkpoint import checkpoint

    def step(net, x):
        # Reentrant checkpointing gives gradients only through inputs that require grad (what
        # transformers' enable_input_require_grads does for a frozen embedding).
        x = x.detach().requires_grad_(reentrant)
        for b in net.blocks:
            x = checkpoint(b, x, use_reentrant=reentrant)
        return x

    ref = _train(_net(False), steps=3)
    net = _net(True)
    got = _train(net, steps=3, step_fn=step)
    _assert_same_training(got, ref, f"checkpoint reentrant={reentrant}")
    if reentrant:
        # The checkpointed forward runs under no_grad (per layer: nothing is saved); the
        # recomputation is an ordinary forward under enable_grad and groups, from the second
        # step on (the first one learns the chains): 2 blocks x 2 steps.
        assert sorted(_grouped_now(net)) == [("q", "k", "v")] * 2
        assert net.blocks[0].q._fastlora_groups.counts["grouped"] == 2 * 2
    else:
        # Non-reentrant checkpointing packs saved tensors through saved-tensor hooks and checks
        # that the recomputation saves the same tensors as the forward; a group linked at the
        # end of the first forward would recompute differently, so under those hooks every
        # layer runs alone (stated in group.py and the README).
        assert net.blocks[0].q._fastlora_groups.counts["grouped"] == 0


def test_compile_runs_per_layer():
    net = _net(True, dropout=0.0)
    x = torch.randn(2, 3, 24)
    ref = _net(False, dropout=0.0)(x)
    compiled = torch.compile(net, backend="eager", fullgraph=False)
    torch.testing.assert_close(compiled(x), ref, rtol=0, atol=0)


def test_copies_and_pickles_start_afresh():
    net = _net(True)
    _train(net, steps=2)
    clone = copy.deepcopy(net)
    groups = clone.blocks[0].q._fastlora_groups
    assert groups is clone.blocks[1].v._fastlora_groups and groups is not net.blocks[0].q._fastlora_groups
    assert groups.groups() == []
    loaded = pickle.loads(pickle.dumps(net))
    assert loaded.blocks[0].q._fastlora_groups.groups() == []
    _assert_same_training(_train(clone, steps=2), _train(loaded, steps=2), "copies")


def test_disabled_by_env(monkeypatch):
    monkeypatch.setenv("FASTLORA_GROUP", "0")
    net = _net(True)
    _train(net, steps=2)
    assert fastlora.sibling_groups(net) == []


def test_peft_model_groups_llama_siblings():
    from _tiny_models import batch, build, randomize_lora_B
    import peft
    results, reports = {}, {}
    for group in (False, True):
        model = build("llama")
        cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"])
        model = peft.get_peft_model(model, cfg)
        randomize_lora_B(model)
        reports[group] = fastlora.patch_peft_model(model, group_siblings=group)
        bt = batch("llama")
        torch.manual_seed(5)
        out = []
        for _ in range(3):
            loss = model(**bt).loss
            loss.backward()
            out.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
            model.zero_grad()
        results[group] = out
    _assert_same_training(results[True], results[False], "PEFT llama")
    names = [tuple(n.rsplit(".", 1)[-1] for n in g) for g in reports[True].sibling_groups()]
    assert sorted(names) == [("gate_proj", "up_proj")] * 2 + [("q_proj", "k_proj", "v_proj")] * 2
    assert "sibling group" in str(reports[True]) and reports[False].sibling_groups() == []
    assert not reports[True].fallbacks
