"""patch_peft_model: PEFT models trained through fastlora agree with PEFT (outputs, loss, every
LoRA gradient, an optimizer step), fall back to PEFT where they must, and unpatch cleanly."""
import copy
import warnings

import pytest
import torch
from torch import nn

from _lora_testing import backends, run
from _tiny_models import TARGETS, batch, build, peft, randomize_lora_B
from fastlora import patch_peft_model, unpatch_peft_model
from fastlora.peft import FastLoraPeftLinear
from fastlora.reference import SeededDropout


def peft_model(kind, dtype=torch.float32, p=0.1, **cfg):
    base = build(kind, dtype=dtype)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS[kind], lora_dropout=p,
                             fan_in_fan_out=kind == "gpt2", **cfg)
    pm = peft.get_peft_model(base, config)
    randomize_lora_B(pm)
    return pm


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, peft.tuners.lora.layer.Linear)]


def with_seeded_dropout(model):
    """PEFT's own forward, but with fastlora's dropout mask, so both see the same dropout."""
    for m in lora_layers(model):
        for name, d in m.lora_dropout.items():
            if isinstance(d, nn.Dropout):
                m.lora_dropout[name] = SeededDropout(d.p)
    return model


def step(model, kind, backend):
    """Forward + backward in train mode with a fixed RNG; returns logits, loss, LoRA grads."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    out = run(backend, model, **batch(kind))
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return out.logits.detach(), out.loss.detach(), grads


def rel(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


# In fp32 both errors are rounding noise (~1e-7) whose ratio fluctuates from case to case:
# fastlora must stay within 2x PEFT's error plus 1e-6 (≈8 fp32 ulps). In fp16 fastlora rounds
# less often than PEFT (one accumulator for base + LoRA), so the bound holds with room.
def assert_no_worse(name, fast, slow, ref):
    e_fast, e_peft = rel(fast, ref), rel(slow, ref)
    assert e_fast <= 2 * e_peft + 1e-6, f"{name}: fastlora error {e_fast:.2e} vs PEFT's {e_peft:.2e}"


def assert_grads_no_worse(fast, slow, ref, rtol=1e-3):
    """Gradients, measured against the scale G of the whole LoRA gradient: a tensor whose
    gradient is tiny (or zero in exact arithmetic, e.g. a key projection's lora_B bias, which
    softmax ignores) carries only rounding noise, and its relative error says nothing. So per
    tensor: ‖fast − ref‖/G no worse than PEFT's (2x + 1e-6 as for outputs), and every tensor
    within ``rtol`` of its own norm plus 1e-6·G (catches a wrong gradient anywhere above noise).
    Measured worst relative errors of a single tensor: 1.6e-4 (fp32 models; a BERT query's
    lora_A, whose gradient cancels), 2e-3 (fp16 models), for fastlora and PEFT alike."""
    G = torch.cat([g.double().reshape(-1) for g in ref.values()]).norm().item()
    for n in ref:
        d_fast = (fast[n].double() - ref[n]).norm().item()
        d_peft = (slow[n].double() - ref[n]).norm().item()
        assert d_fast / G <= 2 * d_peft / G + 1e-6, f"{n}: fastlora error {d_fast / G:.2e}·G vs PEFT's {d_peft / G:.2e}·G"
        assert d_fast <= rtol * ref[n].double().norm().item() + 1e-6 * G, f"{n}: wrong gradient ({d_fast:.2e})"


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("variant", ["plain", "rslora", "lora_bias"])
def test_patched_peft_matches_peft_against_fp64(backend, device, kind, variant):
    extra = {"use_rslora": True} if variant == "rslora" else {"lora_bias": True} if variant == "lora_bias" else {}
    pm = peft_model(kind, **extra)
    if variant == "lora_bias":
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n and n.endswith("bias"):
                    p.normal_()
    fast = copy.deepcopy(pm)
    slow = with_seeded_dropout(copy.deepcopy(pm))
    ref = with_seeded_dropout(copy.deepcopy(pm)).double()
    report = patch_peft_model(fast)
    assert len(report.patched) == len(lora_layers(pm)) and not report.skipped
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no silent or noisy fallback while training
        f_logits, f_loss, f_grads = step(fast, kind, backend)
    assert not report.fallbacks
    s_logits, s_loss, s_grads = step(slow, kind, "torch")
    r_logits, r_loss, r_grads = step(ref, kind, "torch")
    assert_no_worse("logits", f_logits, s_logits, r_logits)
    assert_no_worse("loss", f_loss.reshape(1), s_loss.reshape(1), r_loss.reshape(1))
    assert f_grads.keys() == r_grads.keys() and len(f_grads) >= 2 * len(report.patched)
    assert_grads_no_worse(f_grads, s_grads, r_grads)

    # one optimizer step on each: the next loss still agrees
    for model in (fast, slow):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        opt.step()
        model.eval()
    with torch.no_grad():
        ids = batch(kind)
        f2 = run(backend, fast, **ids).loss
        s2 = run("torch", slow, **ids).loss
    assert abs(f2.item() - s2.item()) <= 1e-4 * abs(s2.item()), (f2.item(), s2.item())


@pytest.mark.parametrize("backend,device", backends())
def test_fp16_model_with_fp32_adapters(backend, device):
    """PEFT's default on half models: fp32 adapters. fastlora computes in fp16 with fp32
    accumulation and returns fp32 adapter grads; its error is no worse than PEFT's."""
    pm = peft_model("llama", dtype=torch.float16)
    assert lora_layers(pm)[0].lora_A["default"].weight.dtype == torch.float32
    fast, slow = copy.deepcopy(pm), with_seeded_dropout(copy.deepcopy(pm))
    ref = with_seeded_dropout(copy.deepcopy(pm)).double()
    patch_peft_model(fast)
    f_logits, _, f_grads = step(fast, "llama", backend)
    s_logits, _, s_grads = step(slow, "llama", "torch")
    r_logits, _, r_grads = step(ref, "llama", "torch")
    assert f_logits.dtype == torch.float16 or f_logits.dtype == s_logits.dtype
    assert_no_worse("logits", f_logits, s_logits, r_logits)
    assert all(g.dtype == torch.float32 for g in f_grads.values())
    assert_grads_no_worse(f_grads, s_grads, r_grads, rtol=1e-2)


def _logits(model, kind, backend="torch"):
    with torch.no_grad():
        return run(backend, model, input_ids=batch(kind)["input_ids"]).logits


@pytest.mark.parametrize("backend,device", backends())
def test_fallbacks_are_decided_per_call_and_reported(backend, device):
    pm = peft_model("llama", p=0.0)
    pm.eval()
    plain = _logits(copy.deepcopy(pm), "llama")
    report = patch_peft_model(pm)
    torch.testing.assert_close(_logits(pm, "llama", backend), plain, rtol=1e-5, atol=1e-5)

    with pytest.warns(UserWarning, match="adapters disabled"):
        with pm.disable_adapter():
            base_out = _logits(pm, "llama", backend)
    torch.testing.assert_close(base_out, _logits(build("llama"), "llama"), rtol=0, atol=0)

    pm.merge_adapter()
    with pytest.warns(UserWarning, match="adapter merged"):
        torch.testing.assert_close(_logits(pm, "llama", backend), plain, rtol=1e-4, atol=1e-4)
    pm.unmerge_adapter()

    with pytest.warns(UserWarning, match="per-call adapter_names"):
        with torch.no_grad():
            run(backend, pm, input_ids=batch("llama")["input_ids"], adapter_names=["default", "default"])

    pm.add_adapter("other", peft.LoraConfig(r=4, target_modules=TARGETS["llama"]))
    pm.base_model.set_adapter(["default", "other"])
    with pytest.warns(UserWarning, match="2 active adapters"):
        _logits(pm, "llama", backend)
    pm.base_model.set_adapter("default")
    torch.testing.assert_close(_logits(pm, "llama", backend), plain, rtol=1e-5, atol=1e-5)
    reasons = {why for (_, why) in report.fallbacks}
    assert reasons == {"adapters disabled", "adapter merged", "per-call adapter_names", "2 active adapters"}
    assert "fell back" in str(report)


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_dora_layers_run_fused_and_match_peft(backend, device, kind):
    """PEFT DoRA (use_dora=True) runs fused, with no fallback, and agrees with PEFT's forward
    against the fp64 oracle: logits, loss, every gradient (lora_A, lora_B, the magnitude), then
    after AdamW steps. p = 0: with dropout PEFT also drops the base term's magnitude share
    (fastlora.peft's module doc), so only the dropout-free forward is the same function."""
    pm = peft_model(kind, p=0.0, use_dora=True)
    with torch.no_grad():  # magnitudes away from ‖W‖ so that g ≠ 1 and dm is not special
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    fast, slow, ref = copy.deepcopy(pm), copy.deepcopy(pm), copy.deepcopy(pm).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # DoRA is no longer a fallback
        report = patch_peft_model(fast)
        assert len(report.patched) == len(lora_layers(pm)) and not report.expected_fallbacks
        f_logits, f_loss, f_grads = step(fast, kind, backend)
    assert not report.fallbacks
    s_logits, s_loss, s_grads = step(slow, kind, "torch")
    r_logits, r_loss, r_grads = step(ref, kind, "torch")
    assert_no_worse("logits", f_logits, s_logits, r_logits)
    assert_no_worse("loss", f_loss.reshape(1), s_loss.reshape(1), r_loss.reshape(1))
    assert f_grads.keys() == r_grads.keys() and sum("lora_magnitude_vector" in n for n in f_grads) == len(report.patched)
    assert_grads_no_worse(f_grads, s_grads, r_grads)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (fast, slow)]
    ids = batch(kind)
    for _ in range(3):
        for model, opt, b in ((fast, opts[0], backend), (slow, opts[1], "torch")):
            model.train()
            opt.zero_grad()
            run(b, model, **ids).loss.backward()
            opt.step()
    with torch.no_grad():
        fast.eval(), slow.eval()
        f2, s2 = run(backend, fast, **ids).loss, run("torch", slow, **ids).loss
    # measured |Δ|/loss after 3 steps at lr 1e-2: ≤ 3e-6 (fp32 rounding the optimizer amplifies)
    assert abs(f2.item() - s2.item()) <= 1e-4 * abs(s2.item()), (f2.item(), s2.item())
    for layer in lora_layers(fast):  # PEFT's merge math on a patched layer: merged == unmerged forward
        x = torch.randn(3, layer.in_features)
        with torch.no_grad():
            before = layer(x)
            layer.merge()
            merged = layer(x)
            layer.unmerge()
        torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5)
        break


def test_dora_with_lora_bias_keeps_peft_forward():
    """What fastlora does not fuse for DoRA (lora_bias; DoRA on a quantized base runs fused,
    tests/test_qlora.py), reported when patching and at call time."""
    pm = peft_model("llama", p=0.0, use_dora=True)
    layer = lora_layers(pm)[0]
    layer.lora_bias["default"] = True  # PEFT's config refuses lora_bias with DoRA; set by hand
    layer.lora_B["default"].bias = nn.Parameter(torch.zeros(layer.out_features))
    plain = _logits(copy.deepcopy(pm), "llama")
    with pytest.warns(UserWarning, match="DoRA with lora_bias"):
        report = patch_peft_model(pm)
    assert list(report.expected_fallbacks.values()) == ["DoRA with lora_bias"]
    torch.testing.assert_close(_logits(pm, "llama"), plain, rtol=1e-6, atol=1e-6)


def test_unsupported_lora_layer_types_are_skipped_with_a_warning():
    base = build("llama")
    pm = peft.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj", "embed_tokens"]))
    with pytest.warns(UserWarning, match="embed_tokens"):
        report = patch_peft_model(pm)
    assert any(n.endswith("embed_tokens") for n in report.skipped)
    assert all(n.endswith("q_proj") for n in report.patched)


def test_unpatch_restores_peft_and_peft_api_still_works(tmp_path):
    pm = peft_model("gpt2", p=0.0)
    pm.eval()
    plain = _logits(copy.deepcopy(pm), "gpt2")
    patch_peft_model(pm)
    assert patch_peft_model(pm).patched == patch_peft_model(pm).patched  # idempotent
    assert all(isinstance(m, FastLoraPeftLinear) for m in lora_layers(pm))
    pm.save_pretrained(tmp_path)  # PEFT's own save, unchanged file
    reloaded = peft.PeftModel.from_pretrained(build("gpt2"), tmp_path)
    torch.testing.assert_close(_logits(reloaded, "gpt2"), plain, rtol=1e-5, atol=1e-5)
    restored = unpatch_peft_model(pm)
    assert len(restored) == len(lora_layers(pm))
    assert all(type(m) is peft.tuners.lora.layer.Linear for m in lora_layers(pm))
    assert torch.equal(_logits(pm, "gpt2"), plain), "unpatched model is not PEFT's forward"
    merged = copy.deepcopy(pm)
    patch_peft_model(merged)
    unloaded = merged.merge_and_unload()
    torch.testing.assert_close(_logits(unloaded, "gpt2"), plain, rtol=1e-4, atol=1e-4)


def test_hooks_on_the_base_layer_keep_peft_forward():
    """A hook on the base layer (accelerate's offloading works that way) must run: fastlora
    reads the weight directly, so it hands such layers back to PEFT."""
    pm = peft_model("llama", p=0.0)
    pm.eval()
    layer = lora_layers(pm)[0]
    layer.get_base_layer().register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
    plain = _logits(copy.deepcopy(pm), "llama")
    report = patch_peft_model(pm)
    with pytest.warns(UserWarning, match="hooks on the base layer"):
        out = _logits(pm, "llama")
    assert torch.equal(out, plain)
    assert any(why == "hooks on the base layer" for (_, why) in report.fallbacks)
