"""Validate before you mutate: every public function that changes a model checks every argument
(and the whole model) first, raises naming the argument, what was expected and what came, and
leaves every module, parameter, buffer and requires_grad flag as it was. One row per function
and argument."""
import json

import pytest
import torch
from torch import nn

from _tiny_models import build, peft
from fastlora import LoRALinear, inject_lora, load_adapter, patch_peft_model, save_adapter, unpatch_peft_model


def snapshot(model):
    """Everything a failed call must leave unchanged."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            {n: (t.detach().clone(), t.requires_grad, t.data_ptr()) for n, t in model.named_parameters()},
            {n: b.detach().clone() for n, b in model.named_buffers()})


def same(a, b):
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(
        torch.equal(a[1][k][0], b[1][k][0]) and a[1][k][1:] == b[1][k][1:] for k in a[1]) and \
        a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def _llama():
    return build("llama")


def _lora_model():
    m = build("llama")
    inject_lora(m, ["q_proj", "v_proj"], r=4)
    return m


def _adapter_dir(tmp_path, **config_changes):
    m = _lora_model()
    save_adapter(m, tmp_path)
    if config_changes:
        path = tmp_path / "adapter_config.json"
        cfg = json.load(open(path))
        cfg.update(config_changes)
        json.dump(cfg, open(path, "w"))
    return tmp_path


# (id, make model, call(model, tmp_path), exception, words the message must hold)
CASES = [
    # inject_lora: every argument
    ("inject-model", lambda: None, lambda m, d: inject_lora([1, 2], ["q_proj"]), TypeError, ["model", "list"]),
    ("inject-targets-int", _llama, lambda m, d: inject_lora(m, 3), TypeError, ["target_modules", "int"]),
    ("inject-targets-None", _llama, lambda m, d: inject_lora(m, None), TypeError, ["target_modules", "NoneType"]),
    ("inject-targets-elem", _llama, lambda m, d: inject_lora(m, ["q_proj", 3]), TypeError, ["target_modules", "3"]),
    ("inject-targets-empty", _llama, lambda m, d: inject_lora(m, []), ValueError, ["target_modules", "at least one"]),
    ("inject-targets-regex", _llama, lambda m, d: inject_lora(m, "(q_proj"), ValueError, ["target_modules", "regular"]),
    ("inject-targets-nomatch", _llama, lambda m, d: inject_lora(m, ["nope"]), ValueError, ["target_modules", "nope"]),
    ("inject-targets-notlinear", _llama, lambda m, d: inject_lora(m, ["embed_tokens"]), ValueError,
     ["target_modules", "Embedding"]),
    ("inject-exclude-int", _llama, lambda m, d: inject_lora(m, ["q_proj"], exclude_modules=3), TypeError,
     ["exclude_modules", "int"]),
    ("inject-r0", _llama, lambda m, d: inject_lora(m, ["q_proj"], r=0), ValueError, ["r", "0"]),
    ("inject-r-float", _llama, lambda m, d: inject_lora(m, ["q_proj"], r=2.5), TypeError, ["r", "2.5"]),
    ("inject-alpha-nan", _llama, lambda m, d: inject_lora(m, ["q_proj"], lora_alpha=float("nan")), ValueError,
     ["lora_alpha", "nan"]),
    ("inject-alpha-str", _llama, lambda m, d: inject_lora(m, ["q_proj"], lora_alpha="8"), TypeError,
     ["lora_alpha", "str"]),
    ("inject-dropout", _llama, lambda m, d: inject_lora(m, ["q_proj"], lora_dropout=1.5), ValueError,
     ["lora_dropout", "1.5"]),
    ("inject-rslora", _llama, lambda m, d: inject_lora(m, ["q_proj"], use_rslora="yes"), TypeError,
     ["use_rslora", "str"]),
    ("inject-peft-model", lambda: peft.get_peft_model(build("llama"), peft.LoraConfig(target_modules=["q_proj"])),
     lambda m, d: inject_lora(m, "all-linear"), ValueError, ["tuner layer", "patch_peft_model"]),
    # LoRALinear.from_linear: every argument, the caller's linear untouched
    ("from_linear-type", lambda: nn.Sequential(nn.Conv1d(4, 4, 1)), lambda m, d: LoRALinear.from_linear(m[0]),
     TypeError, ["linear", "Conv1d"]),
    ("from_linear-r0", lambda: nn.Sequential(nn.Linear(4, 4)), lambda m, d: LoRALinear.from_linear(m[0], r=0),
     ValueError, ["r"]),
    ("from_linear-alpha", lambda: nn.Sequential(nn.Linear(4, 4)),
     lambda m, d: LoRALinear.from_linear(m[0], lora_alpha=float("inf")), ValueError, ["lora_alpha", "inf"]),
    ("from_linear-dropout", lambda: nn.Sequential(nn.Linear(4, 4)),
     lambda m, d: LoRALinear.from_linear(m[0], lora_dropout=-0.1), ValueError, ["lora_dropout"]),
    ("from_linear-rslora", lambda: nn.Sequential(nn.Linear(4, 4)),
     lambda m, d: LoRALinear.from_linear(m[0], use_rslora=1), TypeError, ["use_rslora"]),
    # a layer's settable hyper-parameters
    ("layer-alpha", lambda: nn.Sequential(LoRALinear(4, 4)), lambda m, d: setattr(m[0], "lora_alpha", None),
     TypeError, ["lora_alpha", "NoneType"]),
    ("layer-dropout", lambda: nn.Sequential(LoRALinear(4, 4)), lambda m, d: setattr(m[0], "lora_dropout", 1.0),
     ValueError, ["lora_dropout", "1.0"]),
    ("layer-r", lambda: nn.Sequential(LoRALinear(4, 4)), lambda m, d: setattr(m[0], "r", 2), AttributeError,
     ["r", "fixed"]),
    ("layer-alpha-merged", lambda: _merged(), lambda m, d: setattr(m[0], "lora_alpha", 3.0), ValueError,
     ["lora_alpha", "unmerge"]),
    # load_adapter: every argument and every config field it uses
    ("load-model", lambda: None, lambda m, d: load_adapter("model", _adapter_dir(d)), TypeError, ["model", "str"]),
    ("load-directory", _lora_model, lambda m, d: load_adapter(m, 3), TypeError, ["directory", "int"]),
    ("load-missing", _lora_model, lambda m, d: load_adapter(m, d / "nothing"), FileNotFoundError,
     ["adapter_config.json"]),
    ("load-r", _lora_model, lambda m, d: load_adapter(m, _adapter_dir(d, r="4")), ValueError, ["r"]),
    ("load-alpha", _lora_model, lambda m, d: load_adapter(m, _adapter_dir(d, lora_alpha=None)), ValueError,
     ["lora_alpha"]),
    ("load-dropout", _lora_model, lambda m, d: load_adapter(m, _adapter_dir(d, lora_dropout=2.0)), ValueError,
     ["lora_dropout"]),
    ("load-rslora", _lora_model, lambda m, d: load_adapter(m, _adapter_dir(d, use_rslora="no")), ValueError,
     ["use_rslora"]),
    ("load-dora", _lora_model, lambda m, d: load_adapter(m, _adapter_dir(d, use_dora=True)), ValueError,
     ["use_dora"]),
    ("load-merged", lambda: _merged_model(), lambda m, d: load_adapter(m, _adapter_dir(d)), ValueError,
     ["merged", "unmerge"]),
    ("load-no-lora-layers", _llama, lambda m, d: load_adapter(m, _adapter_dir(d)), ValueError, ["no LoRALinear"]),
    # save_adapter: every argument (it changes no model, but must not half-write either)
    ("save-model", lambda: None, lambda m, d: save_adapter(nn.Linear(2, 2), d), ValueError, ["no fastlora"]),
    ("save-model-type", lambda: None, lambda m, d: save_adapter({}, d), TypeError, ["model", "dict"]),
    ("save-directory", _lora_model, lambda m, d: save_adapter(m, None), TypeError, ["directory", "NoneType"]),
    ("save-base-name", _lora_model, lambda m, d: save_adapter(m, d, base_model_name_or_path=3), TypeError,
     ["base_model_name_or_path", "int"]),
    ("save-task", _lora_model, lambda m, d: save_adapter(m, d, task_type=["CAUSAL_LM"]), TypeError, ["task_type"]),
    ("save-modules", _lora_model, lambda m, d: save_adapter(m, d, modules_to_save="lm_head"), TypeError,
     ["modules_to_save", "lm_head"]),
    ("save-modules-unknown", _lora_model, lambda m, d: save_adapter(m, d, modules_to_save=["nope"]), ValueError,
     ["modules_to_save", "nope"]),
    # patch / unpatch
    ("patch-type", lambda: None, lambda m, d: patch_peft_model("model"), TypeError, ["model", "str"]),
    ("patch-no-peft", _llama, lambda m, d: patch_peft_model(m), ValueError, ["no PEFT LoRA layer", "get_peft_model"]),
    ("patch-fastlora-model", _lora_model, lambda m, d: patch_peft_model(m), ValueError, ["inject_lora"]),
    ("unpatch-type", lambda: None, lambda m, d: unpatch_peft_model(42), TypeError, ["model", "int"]),
]


def _merged():
    layer = LoRALinear(4, 4)
    layer.merge()
    return nn.Sequential(layer)


def _merged_model():
    m = _lora_model()
    m.model.layers[0].self_attn.q_proj.merge()
    return m


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_arguments_raise_clearly_and_change_nothing(case, tmp_path):
    _, make, call, exc, words = case
    model = make()
    before = snapshot(model) if model is not None else None
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(exc) as info:
        call(model, tmp_path)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    if model is not None:
        assert same(before, snapshot(model)), "the model changed before the error"
    if case[0].startswith("save-"):
        assert sorted(p.name for p in tmp_path.iterdir()) == listing, "save_adapter wrote files before failing"
