"""Never silently wrong, never less than nn.Linear: stacked tuner layers, adapter files PEFT reads
back exactly, merged state, bf16 under the interpreter, PEFT's precision with fp32 adapters,
in-place ops on outputs, the meta device, torch.func, and PEFT's repr."""
import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn

from _lora_testing import INTERPRETED, assert_close, backends, fastlora, make_inputs, oracle, run, skip_unsupported
from _tiny_models import TARGETS, batch, build, peft, randomize_lora_B
from fastlora import LoRALinear, inject_lora, load_adapter, patch_peft_model, save_adapter


# ------------------------------------------------------------------------------------------
# 1. Only the computation fastlora reproduces is fused
# ------------------------------------------------------------------------------------------
def _mixed(kind_cfg):
    base = build("llama")
    other = kind_cfg(target_modules=TARGETS["llama"], init_weights=False)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"], init_lora_weights=False)
    model = peft.PeftMixedModel(base, other, "other")
    model.add_adapter("lora", lora)
    model.set_adapter(["other", "lora"])
    return model


@pytest.mark.parametrize("other", ["loha", "lokr"])
def test_lora_stacked_on_another_tuner_runs_peft_exactly(other):
    cfg = {"loha": lambda **kw: peft.LoHaConfig(r=4, alpha=8, **kw), "lokr": lambda **kw: peft.LoKrConfig(r=4, alpha=8, **kw)}
    model = _mixed(cfg[other])
    ids = batch("llama")["input_ids"]
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    with pytest.warns(UserWarning, match="base layer is a tuner layer"):
        report = patch_peft_model(model)
    assert not report.patched and len(report.skipped) == 14
    assert all("tuner layer" in why for why in report.skipped.values())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)


class _Scaled(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return 2 * self.lin(x)


@pytest.mark.parametrize("change", ["pre-hook", "post-hook", "wrapper", "parametrized", "lora_A-hook", "forward"])
def test_whatever_sits_between_lora_and_the_weight_runs_peft(change):
    """Hooks, wrappers and parametrizations change the computation: PEFT's forward runs for that
    layer (its output stays PEFT's exactly), and it is reported."""
    pm = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    randomize_lora_B(pm)
    layer = next(m for m in pm.modules() if isinstance(m, peft.tuners.lora.layer.Linear))
    if change == "pre-hook":
        layer.base_layer.register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))
    elif change == "post-hook":
        layer.base_layer.register_forward_hook(lambda m, args, out: out + 1)
    elif change == "wrapper":
        layer.base_layer = _Scaled(layer.base_layer)
    elif change == "parametrized":
        torch.nn.utils.parametrize.register_parametrization(layer.base_layer, "weight", _Double())
    elif change == "lora_A-hook":
        layer.lora_A["default"].register_forward_hook(lambda m, args, out: out * 3)
    else:
        layer.base_layer.forward = lambda x: torch.zeros(*x.shape[:-1], layer.base_layer.out_features)
    pm.eval()
    ids = batch("llama")["input_ids"]
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, ref_layer = pm(input_ids=ids).logits, layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = patch_peft_model(pm)
        with torch.no_grad():
            out, out_layer = pm(input_ids=ids).logits, layer(x)
    assert torch.equal(out_layer, ref_layer), change  # this layer runs PEFT's own forward
    # the model's other q_proj layers run fastlora: its fp32 accumulation order, not PEFT's
    # (measured here: max |diff| 1.2e-7 to 1.8e-7 on logits up to 0.56)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=change)
    name = next(n for n, m in pm.named_modules() if m is layer)
    assert name in report.skipped or any(n == name for n, _ in report.fallbacks), (report, change)


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


# ------------------------------------------------------------------------------------------
# 2. Adapter files PEFT reads back exactly
# ------------------------------------------------------------------------------------------
class Nested(nn.Module):
    """Module names that are dotted suffixes of each other: ``q``, ``blocks.0.q``, ``blocks.1.q``,
    and ``k`` / ``blocks.0.k`` with ``blocks.1.k`` left without LoRA."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.k = nn.Linear(16, 16)
        self.blocks = nn.ModuleList([nn.ModuleDict({"q": nn.Linear(16, 16), "k": nn.Linear(16, 16)})
                                     for _ in range(2)])

    def forward(self, x):
        x = self.q(x) + self.k(x)
        for b in self.blocks:
            x = torch.tanh(b["q"](x) + b["k"](x))
        return x


def _nested_lora():
    torch.manual_seed(0)
    model = Nested()
    ranks = {"q": 2, "k": 6, "blocks.0.q": 4, "blocks.1.q": 6, "blocks.0.k": 6}
    alphas = {"q": 3.0, "k": 6.0, "blocks.0.q": 6.0, "blocks.1.q": 40.0, "blocks.0.k": 6.0}
    for name, r in ranks.items():
        inject_lora(model, [name] if name.count(".") else f"{name}", r=r, lora_alpha=alphas[name])
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B.weight)
    return model, ranks, alphas


def test_saved_config_reproduces_every_layer_under_peft_rules(tmp_path):
    model, ranks, alphas = _nested_lora()
    save_adapter(model, tmp_path)
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    torch.manual_seed(0)
    base = Nested()
    pm = peft.PeftModel.from_pretrained(base, tmp_path)
    got = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
           if isinstance(m, peft.tuners.lora.layer.Linear)}
    assert set(got) == set(ranks), (sorted(got), cfg["target_modules"])  # blocks.1.k gets no LoRA
    for name, m in got.items():
        assert m.r["default"] == ranks[name], (name, m.r, cfg["rank_pattern"])
        assert m.scaling["default"] == pytest.approx(alphas[name] / ranks[name]), (name, cfg["alpha_pattern"])
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x), rtol=1e-5, atol=1e-5)
    # and fastlora reads it the same way
    torch.manual_seed(0)
    again = Nested()
    for name in ranks:
        inject_lora(again, [name] if name.count(".") else name, r=8, lora_alpha=1.0)
    with pytest.warns(UserWarning, match="resized"):
        load_adapter(again, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=1e-5, atol=1e-5)


def test_target_modules_are_minimal_and_exact(tmp_path):
    from fastlora.model import minimal_target_modules
    base = build("llama")
    inject_lora(base, ["q_proj", "v_proj"], r=4)
    save_adapter(base, tmp_path)
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert cfg["target_modules"] == ["q_proj", "v_proj"]  # PEFT's own short form
    model, ranks, _ = _nested_lora()
    spec = minimal_target_modules(model, list(ranks))
    from fastlora.model import _matches, _peft_names
    assert {n for n in _peft_names(model) if _matches(spec, n)} == set(ranks), spec


# ------------------------------------------------------------------------------------------
# 3. Merged state
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", ["lora_alpha", "use_rslora", "lora_A", "lora_B", "weight"])
def test_changes_that_invalidate_a_merge_raise(change):
    torch.manual_seed(0)
    layer = LoRALinear(12, 10, r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    w0 = layer.weight.detach().clone()
    layer.merge()
    merged = layer.weight.detach().clone()
    if change == "lora_alpha":
        with pytest.raises(ValueError, match="lora_alpha.*unmerge"):
            layer.lora_alpha = 20
    elif change == "use_rslora":
        with pytest.raises(ValueError, match="use_rslora.*unmerge"):
            layer.use_rslora = True
    else:
        target = {"lora_A": layer.lora_A.weight, "lora_B": layer.lora_B.weight, "weight": layer.weight}[change]
        with torch.no_grad():
            target.add_(0.5)
        with pytest.raises(RuntimeError, match=f"{change}.*changed after merge"):
            layer(torch.randn(2, 12))
        with pytest.raises(RuntimeError, match="changed after merge"):
            layer.unmerge()
        assert layer.merged
        return
    assert layer.merged and torch.equal(layer.weight, merged) and layer.scaling == 2.0  # nothing changed
    layer.unmerge()
    assert (layer.weight - w0).abs().max() <= 1e-6  # restored within fp32 rounding


def test_a_merge_survives_device_and_dtype_moves():
    torch.manual_seed(0)
    layer = LoRALinear(12, 10, r=4)
    nn.init.normal_(layer.lora_B.weight)
    w0 = layer.weight.detach().double().clone()
    layer.merge()
    layer.double()
    layer.unmerge()
    assert (layer.weight - w0).abs().max() <= 1e-6


# ------------------------------------------------------------------------------------------
# 4. bf16 under the interpreter: routed to torch, or refused when forced
# ------------------------------------------------------------------------------------------
@pytest.mark.skipif(not INTERPRETED, reason="the Triton interpreter")
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32], ids=["Abf16", "A32"])
def test_bf16_under_the_interpreter_is_computed_by_torch(adapter_dtype):
    from fastlora.backend import force_backend
    assert fastlora.kernel_backend("cpu", torch.bfloat16) == "torch"
    assert fastlora.kernel_backend("cpu", torch.float16, torch.bfloat16) == "torch"
    assert fastlora.kernel_backend("cpu", torch.float16) == "triton-interpreter"
    x, W, A, B, b, dy = make_inputs(37, 45, 70, 12, torch.bfloat16, "cpu", adapter_dtype=adapter_dtype)
    y = fastlora.lora_linear(x, W, A, B, 2.0, b)
    assert_close("y", y, oracle(x, W, A, B, b, 2.0, None, dy)[0], torch.bfloat16, 82)
    assert "bfloat16" in fastlora.explain_path(x, W, A, B, b).reason
    with force_backend("triton-interpreter"):
        with pytest.raises(ValueError, match="bfloat16.*11584"):
            fastlora.lora_linear(x, W, A, B, 2.0, b)


# ------------------------------------------------------------------------------------------
# 5. PEFT's precision in PEFT's default setup: fp32 adapters on a half model, no autocast
# ------------------------------------------------------------------------------------------
def _peft_layer(W, A, B, scaling):
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False, dtype=W.dtype)
    lin.weight = nn.Parameter(W.clone(), requires_grad=False)
    model = peft.get_peft_model(nn.Sequential(lin), peft.LoraConfig(r=A.shape[0], lora_alpha=scaling * A.shape[0],
                                                                     target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fp32_adapters_on_a_half_model_no_worse_than_peft(backend, device, dtype):
    skip_unsupported(backend, dtype)
    x, W, A, B, _, dy = make_inputs(64, 48, 96, 8, dtype, device, bias=False, adapter_dtype=torch.float32)
    layer, pa, pb = _peft_layer(W, A, B, 2.0)
    assert pa.dtype == torch.float32  # PEFT's default (autocast_adapter_dtype)
    xp = x.clone().requires_grad_()
    layer(xp).backward(dy)
    xf, af, bf = x.clone().requires_grad_(), A.clone().requires_grad_(), B.clone().requires_grad_()
    run(backend, fastlora.lora_linear, xf, W, af, bf, 2.0).backward(dy)
    ref = oracle(x, W, A, B, None, 2.0, None, dy)
    for name, fast, slow, r in (("dx", xf.grad, xp.grad, ref[1]), ("dA", af.grad, pa.grad, ref[3]),
                                ("dB", bf.grad, pb.grad, ref[4])):
        e_fast = ((fast.double() - r).norm() / r.norm()).item()
        e_peft = ((slow.double() - r).norm() / r.norm()).item()
        # measured: dA, dB at fp32 rounding (~1e-7) for both; dx at the half dtype's rounding
        assert e_fast <= 1.1 * e_peft + 1e-6, f"{name}: fastlora {e_fast:.2e} vs PEFT {e_peft:.2e}"
        if name != "dx":
            assert e_fast < 1e-5, f"{name}: {e_fast:.2e} is not fp32 LoRA math"


# ------------------------------------------------------------------------------------------
# 6. In-place ops on the output, as on nn.Linear's
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("op", ["relu_", "iadd", "mul_", "index_put"])
def test_in_place_ops_on_the_output(backend, device, op):
    torch.manual_seed(0)
    layer = LoRALinear(12, 10, r=4, lora_dropout=0.1)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 3, 12, requires_grad=True)

    def f(y):
        if op == "relu_":
            return nn.ReLU(inplace=True)(y)
        if op == "iadd":
            y += 1.0
        elif op == "mul_":
            y.mul_(2.0)
        else:
            y[:, 0] = 0.0
        return y

    torch.manual_seed(5)
    out = run(backend, lambda: f(layer(x)))
    out.square().sum().backward()
    g = x.grad.clone()
    x.grad = None
    torch.manual_seed(5)
    ref = f(run(backend, lambda: layer(x)).clone())  # the same on a copy: the autograd reference
    ref.square().sum().backward()
    assert torch.allclose(out, ref) and torch.allclose(g, x.grad)


# ------------------------------------------------------------------------------------------
# 7. The meta device
# ------------------------------------------------------------------------------------------
def test_meta_forward_and_low_memory_loading():
    layer = LoRALinear(12, 10, r=4, device="meta")
    y = layer(torch.empty(3, 5, 12, device="meta"))
    assert y.shape == (3, 5, 10) and y.device.type == "meta"
    y = fastlora.lora_linear(torch.empty(2, 12, device="meta"), *(torch.empty(s, device="meta") for s in
                                                                 ((10, 12), (4, 12), (10, 4))), 2.0, dropout_p=0.1)
    assert y.shape == (2, 10)
    real = LoRALinear(12, 10, r=4)
    nn.init.normal_(real.lora_B.weight)
    with torch.device("meta"):
        shell = LoRALinear(12, 10, r=4)
    shell.load_state_dict(real.state_dict(), assign=True)  # transformers / accelerate's low-memory path
    x = torch.randn(3, 12)
    assert torch.equal(shell(x), real(x))
    shell = LoRALinear(12, 10, r=4, lora_alpha=8, device="meta").to_empty(device="cpu")
    assert shell._scale.item() == 2.0


def test_meta_peft_model_forward():
    with torch.device("meta"):
        base = build("llama")
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    patch_peft_model(pm)
    out = pm(input_ids=torch.zeros(2, 5, dtype=torch.long, device="meta")).logits
    assert out.device.type == "meta" and out.shape[:2] == (2, 5)


# ------------------------------------------------------------------------------------------
# 8. torch.func
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", backends())
def test_torch_func_transforms(backend, device):
    from torch.func import functional_call, grad, jacrev, vmap
    torch.manual_seed(0)
    layer = LoRALinear(12, 10, r=4)
    nn.init.normal_(layer.lora_B.weight)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    xs = torch.randn(3, 5, 12)

    def loss(p, x):
        return functional_call(layer, p, (x,)).square().sum()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no batching-rule fallback warning
        per_sample = run(backend, lambda: vmap(grad(loss), in_dims=(None, 0))(params, xs))
    for i in range(3):
        layer.zero_grad()
        run(backend, lambda: loss(dict(layer.named_parameters()), xs[i]).backward())
        for k in ("lora_A.weight", "lora_B.weight"):
            g = dict(layer.named_parameters())[k].grad
            torch.testing.assert_close(per_sample[k][i], g, rtol=1e-4, atol=1e-4)
    J = run(backend, lambda: jacrev(lambda x: layer(x))(xs[0, 0]))
    W = layer.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    torch.testing.assert_close(J, W.detach(), rtol=1e-5, atol=1e-5)
    ys = run(backend, lambda: vmap(layer)(xs))
    torch.testing.assert_close(ys, torch.stack([layer(x) for x in xs]), rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="forward-mode AD.*jacrev"):
        torch.func.jvp(layer, (xs[0],), (torch.ones_like(xs[0]),))
    layer.lora_dropout = 0.1
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(layer)(xs)  # torch's rule: random ops under vmap need randomness="same" or "different"
    assert vmap(layer, randomness="same")(xs).shape == (3, 5, 10)


# ------------------------------------------------------------------------------------------
# 9. print(model)
# ------------------------------------------------------------------------------------------
def test_patched_model_prints_as_peft():
    pm = peft.get_peft_model(build("gpt2"), peft.LoraConfig(r=4, target_modules=TARGETS["gpt2"], fan_in_fan_out=True))
    before = repr(pm)
    report = patch_peft_model(pm)
    assert repr(pm) == before and "lora.Linear(" in before
    assert report.patched and fastlora.peft.patch_report(pm) is report


def test_scaling_math_reference():
    assert math.isclose(LoRALinear(4, 4, r=4, lora_alpha=8, use_rslora=True).scaling, 4.0)


def test_adapter_files_are_complete_for_auto_peft(tmp_path):
    """save_adapter records the base (config._name_or_path) and the task type of a language model,
    and writes a model card: AutoPeftModelForCausalLM finds everything from the folder alone."""
    import transformers
    build("llama").save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    inject_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8)
    randomize_lora_B(model)
    save_adapter(model, tmp_path / "adapter")
    cfg = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert cfg["base_model_name_or_path"] == str(tmp_path / "base") and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card and str(tmp_path / "base") in card
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    ids = batch("llama")["input_ids"]
    with torch.no_grad():
        # PEFT (auto) vs fastlora layers: accumulation order only (measured here: max |diff| 2.2e-7)
        torch.testing.assert_close(auto(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
