"""LoRA on whole models: injection with PEFT's matching rules, and adapters in PEFT's format.

``inject_lora`` replaces matching ``nn.Linear`` / GPT-2 ``Conv1D`` modules with
:class:`fastlora.LoRALinear`; ``save_adapter`` / ``load_adapter`` read and write PEFT's LoRA
adapter format (``adapter_model.safetensors`` + ``adapter_config.json``), so adapters move
freely between fastlora, ``peft.PeftModel`` and anything that reads PEFT's format.
"""
import collections
import json
import os
import re
import warnings

import torch
from torch import nn

from .dropout import check_dropout_p
from .layer import LoRALinear, _check_hparams, is_conv1d

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"
# Heads that "all-linear" leaves alone when the model has no output embedding to tell (the
# names PEFT uses for sequence-classification heads, plus the usual LM head name).
_HEAD_NAMES = ("lm_head", "score", "classifier")


# ------------------------------------------------------------------------------------------
# Matching (peft/tuners/tuners_utils.py: check_target_module_exists)
# ------------------------------------------------------------------------------------------
def _matches(spec, name):
    """PEFT's rule: a string is a regex that must match the whole module name; a list matches a
    name equal to an entry or ending in ``"." + entry``."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith("." + t) for t in spec)


def _pattern_key(patterns, name):
    """Key of ``rank_pattern`` / ``alpha_pattern`` that applies to module ``name`` (PEFT:
    ``re.match(rf"(.*\\.)?({key})$", name)``), or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _is_linear(module):
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _all_linear_targets(model):
    """Every nn.Linear / Conv1D except the output head and modules inside LoRA layers."""
    exclude = set()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            exclude.update(f"{name}.{sub}" for sub, _ in module.named_modules() if sub)
        top = name.split(".")[0]
        if module is head or (head is None and top in _HEAD_NAMES):
            exclude.add(name)
    return [n for n, m in model.named_modules() if _is_linear(m) and n not in exclude]


def inject_lora(model, target_modules, *, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
                exclude_modules=None):
    """Replace matching linear layers of ``model`` in place with :class:`fastlora.LoRALinear`.

    Args:
        model: any ``nn.Module``.
        target_modules: PEFT's rules: a list of names (exact, or a dotted suffix such as
            ``"q_proj"`` or ``"attention.self.query"``), a regex string matched against the whole
            module name, or ``"all-linear"`` (every ``nn.Linear`` / ``Conv1D`` except the output
            head: the model's output embedding if it has one, else top-level ``lm_head``,
            ``score`` or ``classifier`` modules).
        r, lora_alpha, lora_dropout, use_rslora: as for :class:`fastlora.LoRALinear`.
        exclude_modules: names never to replace, same rules as ``target_modules``.

    Returns:
        The replaced module names, in ``named_modules`` order.

    Every parameter outside the LoRA adapters is frozen (``requires_grad=False``), as PEFT does
    with ``bias="none"``. Base weights are shared, not copied.

    Raises:
        ValueError: nothing matched, or a matched module is not an ``nn.Linear`` / ``Conv1D``.
    """
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        targets = _all_linear_targets(model)
        matched = [n for n in targets if not _matches(exclude_modules, n)]
    else:
        if not isinstance(target_modules, str):
            target_modules = list(target_modules)
        matched = [n for n, _ in model.named_modules()
                   if n and _matches(target_modules, n) and not _matches(exclude_modules, n)]
    modules = dict(model.named_modules())
    bad = [f"{n} ({type(modules[n]).__name__})" for n in matched if not _is_linear(modules[n])]
    if bad:
        raise ValueError(f"target_modules: matched modules that are not nn.Linear / Conv1D: {', '.join(bad)}")
    if not matched:
        raise ValueError(f"target_modules: {target_modules!r} matched no linear module of {type(model).__name__}")
    for name in matched:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, LoRALinear.from_linear(modules[name], r=r, lora_alpha=lora_alpha,
                                                      lora_dropout=lora_dropout, use_rslora=use_rslora))
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.requires_grad_(False)
    return matched


def lora_layers(model):
    """``{name: LoRALinear}`` of ``model``, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


# ------------------------------------------------------------------------------------------
# PEFT's adapter format
# ------------------------------------------------------------------------------------------
def _full(t):
    """A full, detached CPU copy of a parameter; a sharded ``DTensor`` (FSDP2) is gathered first,
    which is a collective: every rank must call :func:`save_adapter`."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.cpu().contiguous()


def save_adapter(model, directory, *, base_model_name_or_path=None, modules_to_save=None):
    """Write the LoRA adapters of ``model`` in PEFT's format.

    Files: ``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight``
    ``[r, in]`` and ``.lora_B.weight`` ``[out, r]``, adapter name stripped, as PEFT saves) and
    ``adapter_config.json`` (``peft_type: LORA``; the most common r / alpha as ``r`` /
    ``lora_alpha``, the others in ``rank_pattern`` / ``alpha_pattern``). After it,
    ``peft.PeftModel.from_pretrained(base_model, directory)`` computes what ``model`` computes.

    Args:
        model: a model with :class:`fastlora.LoRALinear` layers (e.g. from :func:`inject_lora`).
        directory: created if missing.
        base_model_name_or_path: recorded in the config (PEFT uses it to find the base model).
        modules_to_save: names of extra modules saved whole (PEFT's ``modules_to_save``, e.g. a
            trained classification head), stored under ``base_model.model.<module>.<param>``.

    Sharded models (FSDP2 ``fully_shard``): call it on every rank; the shards are gathered into
    full tensors and only rank 0 writes the files.

    Raises:
        ValueError: no LoRA layer, layers that disagree on rsLoRA, an unknown module to save.
    """
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"model: no fastlora.LoRALinear layer in {type(model).__name__}")
    rslora = {m.use_rslora for m in layers.values()}
    if len(rslora) > 1:
        raise ValueError("model: layers mix use_rslora True and False, which PEFT's config cannot express")
    r_default = collections.Counter(m.r for m in layers.values()).most_common(1)[0][0]
    alpha_default = collections.Counter(m.lora_alpha for m in layers.values()).most_common(1)[0][0]
    dropouts = collections.Counter(m.lora_dropout for m in layers.values())
    dropout = dropouts.most_common(1)[0][0]
    if len(dropouts) > 1:
        warnings.warn(f"save_adapter: layers use dropouts {sorted(dropouts)}; PEFT's config holds one, "
                      f"lora_dropout={dropout} is written", stacklevel=2)
    tensors = {}
    for name, m in layers.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = _full(m.lora_A.weight)
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = _full(m.lora_B.weight)
    modules = dict(model.named_modules())
    for name in modules_to_save or []:
        if name not in modules:
            raise ValueError(f"modules_to_save: no module {name!r} in {type(model).__name__}")
        for k, v in modules[name].state_dict().items():
            tensors[f"{_PREFIX}{name}.{k}"] = _full(v)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": r_default,
        "lora_alpha": alpha_default,
        "lora_dropout": dropout,
        "use_rslora": rslora.pop(),
        "target_modules": list(layers),
        "rank_pattern": {re.escape(n): m.r for n, m in layers.items() if m.r != r_default},
        "alpha_pattern": {re.escape(n): m.lora_alpha for n, m in layers.items() if m.lora_alpha != alpha_default},
        "fan_in_fan_out": any(m.fan_in_fan_out for m in layers.values()),
        "bias": "none",
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "init_lora_weights": True,
        "use_dora": False,
    }
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


# LoraConfig fields fastlora implements (their values are used).
_SUPPORTED = {"r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "exclude_modules",
              "rank_pattern", "alpha_pattern", "fan_in_fan_out", "modules_to_save", "bias"}
# Metadata and initialisation options with no effect on a loaded adapter's math.
_IGNORED = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
            "peft_version", "init_lora_weights", "runtime_config", "megatron_core", "qalora_group_size",
            "loftq_config", "eva_config", "corda_config", "lora_ga_config"}
# Everything else must be off: these change the math or the layout if set (values from PEFT 0.21).
_MUST_BE_OFF = {"use_dora": False, "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
                "layer_replication": None, "use_qalora": False, "alora_invocation_tokens": None,
                "velora_config": None, "monteclora_config": None, "arrow_config": None, "kasa_config": None,
                "use_bdlora": None, "trainable_token_indices": None, "target_parameters": None,
                "megatron_config": None, "ensure_weight_tying": False}


def _off(value):
    return value in (None, False, "", [], {})


def read_adapter_config(directory):
    """Load and check ``adapter_config.json``; returns the dict.

    Raises ValueError naming every field fastlora does not implement that is not at its off
    value (unknown fields included), and for a non-LoRA adapter or ``bias`` other than "none".
    """
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"directory: no {CONFIG_NAME} in {directory}")
    with open(path) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: expected peft_type 'LORA', got {config.get('peft_type')!r}")
    problems = []
    for key, value in config.items():
        if key in _SUPPORTED or key in _IGNORED:
            continue
        if key in _MUST_BE_OFF:
            if value != _MUST_BE_OFF[key] and not _off(value):
                problems.append(f"{key}={value!r} (not supported by fastlora)")
        elif not _off(value):
            problems.append(f"{key}={value!r} (unknown field)")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} (only 'none' is supported)")
    if problems:
        raise ValueError(f"{path}: cannot load this adapter: " + "; ".join(problems))
    return config


def _in_saved_module(param_name, save_names):
    """Whether ``param_name`` lies in a module of ``modules_to_save``, which PEFT names by a
    module name or its dotted suffix (``"head"`` matches ``enc.head``)."""
    parts = param_name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts))]
    return any(p == s or p.endswith("." + s) for p in prefixes for s in save_names)


_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def load_adapter(model, directory):
    """Load a PEFT-saved LoRA adapter into a model with :class:`fastlora.LoRALinear` layers.

    Per-module ranks and alphas (``rank_pattern``, ``alpha_pattern``), rsLoRA and the dropout
    come from the config; a layer whose rank differs from the adapter's is resized, which gives
    it new ``lora_A`` / ``lora_B`` parameters (build optimizers after loading). Every value,
    tensor name and shape is checked before anything changes: all problems (tensors for modules
    that are not LoRA layers, LoRA layers the file lacks, shapes that disagree with the layer or
    the config, invalid hyper-parameters) are raised together in one ValueError, and the model
    is untouched. Load before sharding a model (FSDP2).

    Returns:
        The loaded LoRA layer names.

    Raises:
        FileNotFoundError: a missing file. ValueError: see above and :func:`read_adapter_config`.
    """
    from safetensors.torch import load_file

    config = read_adapter_config(directory)
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"directory: no {WEIGHTS_NAME} in {directory}")
    tensors = load_file(path)
    layers = lora_layers(model)
    params = dict(model.state_dict())
    save_names = config.get("modules_to_save") or []
    problems, found, extra = [], collections.defaultdict(dict), {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m:
            found[m["module"]][m["ab"]] = (key, t)
            continue
        local = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if _in_saved_module(local, save_names) and local in params:
            if tuple(params[local].shape) != tuple(t.shape):
                problems.append(f"{key}: shape {tuple(t.shape)}, the model's is {tuple(params[local].shape)}")
            extra[local] = t
        else:
            problems.append(f"{key}: not a LoRA weight nor a parameter of modules_to_save {save_names}")
    hparams = {}
    dropout = config.get("lora_dropout", 0.0)
    try:
        check_dropout_p(dropout)
    except (TypeError, ValueError) as e:
        problems.append(f"lora_dropout: {e}")
    for name in found:
        if name not in layers:
            problems.append(f"{name}: the file has LoRA weights for it but the model has no LoRALinear there")
    for name, layer in layers.items():
        rk = _pattern_key(config.get("rank_pattern") or {}, name)
        ak = _pattern_key(config.get("alpha_pattern") or {}, name)
        r = config["rank_pattern"][rk] if rk is not None else config.get("r", 8)
        alpha = config["alpha_pattern"][ak] if ak is not None else config.get("lora_alpha", 8)
        hparams[name] = (r, alpha)
        try:
            _check_hparams(r, alpha, 0.0)
        except ValueError as e:
            problems.append(f"{name}: {e} (from the config's r / lora_alpha / rank_pattern / alpha_pattern)")
            continue
        if layer.merged:
            problems.append(f"{name}: the layer is merged; unmerge() it before loading")
        got = found.get(name, {})
        for ab, shape in (("A", (r, layer.in_features)), ("B", (layer.out_features, r))):
            if ab not in got:
                problems.append(f"{name}.lora_{ab}.weight: missing from the file")
            elif tuple(got[ab][1].shape) != shape:
                problems.append(f"{got[ab][0]}: shape {tuple(got[ab][1].shape)}, expected {shape} "
                                f"(r={r} from the config, layer {layer.in_features}->{layer.out_features})")
    if problems:
        raise ValueError(f"{path}: {len(problems)} problem(s), nothing loaded:\n  " + "\n  ".join(problems))

    with torch.no_grad():
        for name, layer in layers.items():
            r, alpha = hparams[name]
            if r != layer.r:
                layer._init_lora(r, alpha, layer.lora_dropout, layer.use_rslora)
            layer.lora_alpha = alpha
            layer.use_rslora = bool(config.get("use_rslora", False))
            layer.lora_dropout = float(config.get("lora_dropout", 0.0))
            layer.lora_A.weight.copy_(found[name]["A"][1])
            layer.lora_B.weight.copy_(found[name]["B"][1])
        for local, t in extra.items():
            params[local].copy_(t)
    return list(layers)


__all__ = ["inject_lora", "save_adapter", "load_adapter", "read_adapter_config", "lora_layers"]
