"""inject_lora (PEFT's matching rules, freezing) and adapters in PEFT's format, both ways."""
import copy
import json
import os

import pytest
import torch
from torch import nn

from _tiny_models import TARGETS, batch, build, peft, randomize_lora_B
from fastlora import LoRALinear, inject_lora, load_adapter, save_adapter
from fastlora.backend import force_backend


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleDict({"q": nn.Linear(8, 8), "k": nn.Linear(8, 8), "mlp": nn.Sequential(nn.Linear(8, 16))})
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 4)

    def forward(self, x):
        return self.lm_head(self.norm(self.encoder["q"](x) + self.encoder["k"](x)))


def test_target_rules_names_suffixes_regex_all_linear_and_exclude():
    assert inject_lora(Plain(), ["q"]) == ["encoder.q"]
    assert inject_lora(Plain(), ["encoder.k", "0"]) == ["encoder.k", "encoder.mlp.0"]
    assert inject_lora(Plain(), r"encoder\.(q|k)") == ["encoder.q", "encoder.k"]
    assert inject_lora(Plain(), "all-linear") == ["encoder.q", "encoder.k", "encoder.mlp.0"]
    assert inject_lora(Plain(), "all-linear", exclude_modules=["k"]) == ["encoder.q", "encoder.mlp.0"]
    with pytest.raises(ValueError, match="matched no linear"):
        inject_lora(Plain(), ["nope"])
    with pytest.raises(ValueError, match="not nn.Linear"):
        inject_lora(Plain(), ["norm"])


def test_inject_freezes_all_but_lora_and_shares_weights():
    model = Plain()
    w = model.encoder["q"].weight
    inject_lora(model, ["q", "k"], r=4, lora_alpha=8, lora_dropout=0.1)
    assert isinstance(model.encoder["q"], LoRALinear) and model.encoder["q"].weight is w
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["encoder.k.lora_A.weight", "encoder.k.lora_B.weight",
                         "encoder.q.lora_A.weight", "encoder.q.lora_B.weight"]
    assert model.encoder["q"].r == 4 and model.encoder["q"].lora_dropout == 0.1


@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
def test_all_linear_matches_peft(kind):
    model = build(kind)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear"))
    peft_names = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                        if isinstance(m, peft.tuners.lora.LoraLayer))
    ours = sorted(inject_lora(model, "all-linear"))
    if kind == "bert":  # PEFT keeps a classifier head only with task_type=SEQ_CLS; fastlora always does
        peft_names = [n for n in peft_names if n != "classifier"]
    assert ours == peft_names


def _outputs(model, kind):
    model.eval()
    with torch.no_grad(), force_backend("torch"):
        out = model(**{k: v for k, v in batch(kind).items() if k == "input_ids"})
    return out.logits


@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
def test_fastlora_save_loads_in_peft(kind, tmp_path):
    base = build(kind)
    model = copy.deepcopy(base)
    inject_lora(model, TARGETS[kind], r=6, lora_alpha=12)
    randomize_lora_B(model)
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 6 and cfg["lora_alpha"] == 12
    pm = peft.PeftModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(_outputs(pm, kind), _outputs(model, kind), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("variant", ["plain", "patterns", "rslora"])
def test_peft_save_loads_in_fastlora(kind, variant, tmp_path):
    base = build(kind)
    t = TARGETS[kind]
    kwargs = dict(r=8, lora_alpha=16, target_modules=t, fan_in_fan_out=kind == "gpt2")
    if variant == "patterns":
        kwargs.update(rank_pattern={t[0]: 4}, alpha_pattern={t[1]: 40})
    if variant == "rslora":
        kwargs.update(use_rslora=True)
    if kind == "bert":
        kwargs.update(modules_to_save=["classifier"])
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    randomize_lora_B(pm)
    if kind == "bert":
        with torch.no_grad():
            pm.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    pm.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    inject_lora(model, t, r=8)
    loaded = load_adapter(model, tmp_path)
    assert sorted(loaded) == sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    if variant == "patterns":
        ranks = {n: m.r for n, m in model.named_modules() if isinstance(m, LoRALinear)}
        assert {r for n, r in ranks.items() if n.endswith(t[0])} == {4}
    torch.testing.assert_close(_outputs(model, kind), _outputs(pm, kind), rtol=1e-5, atol=1e-5)
    # and back: fastlora's save of what it loaded reproduces PEFT's model again
    save_adapter(model, tmp_path / "again", modules_to_save=["classifier"] if kind == "bert" else None)
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again")
    torch.testing.assert_close(_outputs(pm2, kind), _outputs(pm, kind), rtol=1e-5, atol=1e-5)


def _saved(tmp_path):
    base = build("bert")
    model = copy.deepcopy(base)
    inject_lora(model, ["query", "value"], r=4)
    randomize_lora_B(model)
    save_adapter(model, tmp_path)
    return base, model


def _edit(tmp_path, tensors=None, config=None):
    from safetensors.torch import load_file, save_file
    if tensors:
        t = load_file(tmp_path / "adapter_model.safetensors")
        tensors(t)
        save_file(t, tmp_path / "adapter_model.safetensors")
    if config:
        c = json.load(open(tmp_path / "adapter_config.json"))
        config(c)
        json.dump(c, open(tmp_path / "adapter_config.json", "w"))


def test_bad_adapter_files_give_one_clear_error_and_load_nothing(tmp_path):
    base, _ = _saved(tmp_path)
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"

    def damage(t):
        t[key] = torch.zeros(5, 64)  # wrong rank for this layer
        del t["base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"]
        t["base_model.model.bert.pooler.dense.lora_A.weight"] = torch.zeros(4, 64)

    _edit(tmp_path, tensors=damage)
    target = copy.deepcopy(base)
    inject_lora(target, ["query", "value"], r=4)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_adapter(target, tmp_path)
    msg = str(info.value)
    assert "3 problem(s)" in msg and "(5, 64)" in msg and "missing" in msg and "pooler.dense" in msg
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items()), "partially loaded"


@pytest.mark.parametrize("field,value,words", [("use_dora", "yes", "use_dora"), ("lora_bias", True, "lora_bias"),
                                               ("layers_to_transform", [0], "layers_to_transform"),
                                               ("some_future_option", 3, "unknown field"),
                                               ("bias", "all", "bias"), ("peft_type", "IA3", "peft_type")])
def test_unsupported_config_fields_raise(tmp_path, field, value, words):
    base, _ = _saved(tmp_path)
    _edit(tmp_path, config=lambda c: c.update({field: value}))
    target = copy.deepcopy(base)
    inject_lora(target, ["query", "value"], r=4)
    with pytest.raises(ValueError, match=words):
        load_adapter(target, tmp_path)


def test_unknown_fields_at_their_off_value_are_accepted(tmp_path):
    base, model = _saved(tmp_path)
    _edit(tmp_path, config=lambda c: c.update({"some_future_option": None, "megatron_config": None}))
    target = copy.deepcopy(base)
    inject_lora(target, ["query", "value"], r=2)
    load_adapter(target, tmp_path)
    torch.testing.assert_close(_outputs(target, "bert"), _outputs(model, "bert"))


def test_missing_files_name_the_file(tmp_path):
    base, _ = _saved(tmp_path)
    target = copy.deepcopy(base)
    inject_lora(target, ["query"], r=4)
    os.remove(tmp_path / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(target, tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(target, tmp_path / "nowhere")


def test_invalid_hyperparameters_in_the_config_change_nothing(tmp_path):
    base, _ = _saved(tmp_path)
    key = "bert.encoder.layer.1.attention.self.value"
    _edit(tmp_path, config=lambda c: c.update({"alpha_pattern": {key: float("nan")}, "r": 4}))
    target = copy.deepcopy(base)
    inject_lora(target, ["query", "value"], r=4, lora_alpha=8)
    before = {n: (m.lora_alpha, m.lora_dropout, m.lora_A.weight.clone()) for n, m in target.named_modules()
              if isinstance(m, LoRALinear)}
    with pytest.raises(ValueError, match="lora_alpha"):
        load_adapter(target, tmp_path)
    for n, m in target.named_modules():
        if isinstance(m, LoRALinear):
            alpha, dropout, a = before[n]
            assert (m.lora_alpha, m.lora_dropout) == (alpha, dropout) and torch.equal(m.lora_A.weight, a), n


def test_nested_modules_to_save_from_peft(tmp_path):
    """PEFT names modules_to_save by a suffix ("head" for enc.head); its saved keys load."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.ModuleDict({"proj": nn.Linear(8, 8), "head": nn.Linear(8, 3)})

        def forward(self, x):
            return self.enc["head"](self.enc["proj"](x))

    torch.manual_seed(0)
    base = Net()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["proj"],
                                                                   modules_to_save=["head"]))
    randomize_lora_B(pm)
    with torch.no_grad():
        pm.base_model.model.enc["head"].modules_to_save["default"].weight.normal_()
    pm.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    inject_lora(model, ["proj"], r=2)
    load_adapter(model, tmp_path)
    x = torch.randn(4, 8)
    with torch.no_grad(), force_backend("torch"):
        torch.testing.assert_close(model(x), pm(x))
