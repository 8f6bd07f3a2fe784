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
    """Key of ``rank_pattern`` / ``alpha_pattern`` that applies to module ``name``, or None: PEFT's
    rule (``peft.utils.other.get_pattern_key``): the first key, in the dict's order, for which
    ``re.match(rf"(.*\\.)?({key})$", name)`` holds."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _inside_lora(model):
    """Names of the modules inside fastlora LoRA layers (their lora_A / lora_B)."""
    inside = set()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            inside.update(f"{name}.{sub}" if name else sub for sub, _ in module.named_modules() if sub)
    return inside


def _is_linear(module):
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _all_linear_targets(model):
    """Every nn.Linear / Conv1D except the output head and modules inside LoRA layers."""
    exclude = _inside_lora(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        top = name.split(".")[0]
        if module is head or (head is None and top in _HEAD_NAMES):
            exclude.add(name)
    return [n for n, m in model.named_modules() if _is_linear(m) and n not in exclude]


def _check_targets(name, spec, allow_none=False):
    """``target_modules`` / ``exclude_modules``: a string (regex, or "all-linear" for targets) or
    a list / tuple / set of strings; returns it normalised (lists for collections)."""
    if spec is None and allow_none:
        return None
    if isinstance(spec, str):
        if not spec:
            raise ValueError(f"{name}: expected a non-empty string or a list of module names, got ''")
        try:
            re.compile(spec)
        except re.error as e:
            raise ValueError(f"{name}: {spec!r} is not a valid regular expression ({e})") from None
        return spec
    if isinstance(spec, (list, tuple, set, frozenset)) and all(isinstance(t, str) and t for t in spec):
        if not spec:
            raise ValueError(f"{name}: expected at least one module name, got an empty {type(spec).__name__}")
        return sorted(spec) if isinstance(spec, (set, frozenset)) else list(spec)
    bad = next((t for t in spec if not (isinstance(t, str) and t)), None) if isinstance(spec, (list, tuple, set)) \
        else None
    what = f"an element {bad!r}" if isinstance(spec, (list, tuple, set)) else f"{type(spec).__name__} {spec!r}"
    raise TypeError(f"{name}: expected a regex string, 'all-linear' or a list of module names, got {what}")


def tuner_layers(model):
    """Names of PEFT tuner layers (``BaseTunerLayer``) in ``model``, if PEFT is installed."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def inject_lora(model, target_modules, *, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
                exclude_modules=None, use_dora=False, group_siblings=True):
    """Replace matching linear layers of ``model`` in place with :class:`fastlora.LoRALinear`.

    Args:
        model: any ``nn.Module`` without PEFT tuner layers (for a PEFT model, use
            :func:`fastlora.patch_peft_model`).
        target_modules: PEFT's rules: a list of names (exact, or a dotted suffix such as
            ``"q_proj"`` or ``"attention.self.query"``), a regex string matched against the whole
            module name, or ``"all-linear"`` (every ``nn.Linear`` / ``Conv1D`` except the output
            head: the model's output embedding if it has one, else top-level ``lm_head``,
            ``score`` or ``classifier`` modules). Modules inside existing fastlora LoRA layers
            are never matched.
        r, lora_alpha, lora_dropout, use_rslora, use_dora: as for :class:`fastlora.LoRALinear`
            (``use_dora=True``: DoRA layers, each with a trainable ``lora_magnitude_vector``).
        exclude_modules: names never to replace, same rules as ``target_modules`` (no "all-linear").
        group_siblings: run sibling layers fed the same input (q/k/v, gate/up) as one group
            (fastlora/group.py: one autograd node, one dx buffer; the same outputs, masks and LoRA
            gradients), learned from the calls of training forwards; :func:`sibling_groups` names
            them. ``False``, or ``FASTLORA_GROUP=0`` in the environment, keeps every layer alone.

    Returns:
        The replaced module names, in ``named_modules`` order.

    Every parameter outside the LoRA adapters is frozen (``requires_grad=False``), as PEFT does
    with ``bias="none"``. Base weights are shared, not copied. Every argument and the whole model
    are checked first: on an error nothing (no module, parameter or ``requires_grad`` flag) changes.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``target_modules`` / ``exclude_modules`` are
            not a string or a list of strings; a hyper-parameter of the wrong type.
        ValueError: the model holds PEFT tuner layers; nothing matched; a matched module is not an
            ``nn.Linear`` / ``Conv1D``; a hyper-parameter out of range; an invalid regex.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    target_modules = _check_targets("target_modules", target_modules)
    exclude_modules = _check_targets("exclude_modules", exclude_modules, allow_none=True)
    _check_hparams(r, lora_alpha, lora_dropout, use_rslora, use_dora)
    tuners = tuner_layers(model)
    if tuners:
        raise ValueError(f"model: {type(model).__name__} holds {len(tuners)} PEFT tuner layer(s) (e.g. {tuners[0]}): "
                         "inject_lora would put LoRA on top of PEFT's; to run a PEFT model through fastlora, call "
                         "fastlora.patch_peft_model(model)")
    inside = _inside_lora(model)
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        matched = [n for n in _all_linear_targets(model) if not _matches(exclude_modules, n)]
    else:
        matched = [n for n, _ in model.named_modules()
                   if n and n not in inside and _matches(target_modules, n) and not _matches(exclude_modules, n)]
    modules = dict(model.named_modules())
    bad = [f"{n} ({type(modules[n]).__name__})" for n in matched if not _is_linear(modules[n])]
    if bad:
        raise ValueError(f"target_modules: matched modules that are not nn.Linear / Conv1D: {_summary(bad)}")
    if not matched:
        raise ValueError(f"target_modules: {target_modules!r} matched no linear module of {type(model).__name__}")
    groups = None
    if group_siblings and os.environ.get("FASTLORA_GROUP", "1") != "0":
        from .group import SiblingGroups
        groups = next((m.__dict__["_fastlora_groups"] for m in modules.values() if "_fastlora_groups" in m.__dict__),
                      None) or SiblingGroups()  # a second inject_lora joins the first one's groups
    for name in matched:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        layer = LoRALinear.from_linear(modules[name], r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                       use_rslora=use_rslora, use_dora=use_dora)
        if groups is not None:
            layer._fastlora_groups = groups
        setattr(parent, child, layer)
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.requires_grad_(False)
    return matched


def _summary(items, show=5):
    """The first ``show`` items and how many more: long problem lists stay readable."""
    items = list(items)
    head = ", ".join(items[:show])
    return head + (f", ... ({len(items) - show} more)" if len(items) > show else "")


def sibling_groups(model):
    """The sibling groups fastlora runs as one call in ``model`` (:func:`inject_lora` or
    :func:`fastlora.patch_peft_model`): tuples of module names, head first, learned from the
    calls of the last training forward (empty before one)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    names, seen, out = {}, set(), []
    for n, m in model.named_modules():
        names[m] = n
    for m in names:
        report = m.__dict__.get("_fastlora_report")
        groups = m.__dict__.get("_fastlora_groups") or (report.groups if report is not None else None)
        if groups is not None and id(groups) not in seen:
            seen.add(id(groups))
            out += [tuple(names.get(layer, "?") for layer in g) for g in groups.groups()]
    return out


def lora_layers(model):
    """``{name: LoRALinear}`` of ``model``, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


# ------------------------------------------------------------------------------------------
# PEFT's adapter format
# ------------------------------------------------------------------------------------------
def _full(t):
    """A full, detached CPU copy of a parameter; a sharded ``DTensor`` (FSDP2) or a partitioned
    DeepSpeed ZeRO-3 parameter is gathered first, which is a collective: every rank must call
    :func:`save_adapter`."""
    from .engines import zero3_gathered
    with zero3_gathered([t]):
        t = t.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        # a copy: a ZeRO-3 parameter's gathered data is freed when the block ends
        return torch.empty_like(t, device="cpu", memory_format=torch.contiguous_format).copy_(t)


# Only the language-model tasks are inferred: for SEQ_CLS / TOKEN_CLS / QUESTION_ANS, PEFT adds the
# task head to modules_to_save and then requires its weights in the file.
_TASKS = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
          ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"))


def _task_type_of(model):
    """PEFT's task type for a transformers language model's class name (None otherwise)."""
    name = type(model).__name__
    return next((task for suffix, task in _TASKS if name.endswith(suffix)), None)


def _base_name_of(model):
    """The name or path transformers recorded for the model (``config._name_or_path``), or None."""
    for obj in (getattr(model, "config", None), model):
        value = getattr(obj, "name_or_path", None) or getattr(obj, "_name_or_path", None)
        if isinstance(value, str) and value:
            return value
    return None


def _peft_names(model):
    """Module names PEFT sees when it loads an adapter into ``model``'s base: every module but
    those inside fastlora LoRA layers (a LoRALinear stands where its linear was)."""
    inside = _inside_lora(model)
    return [n for n, _ in model.named_modules() if n and n not in inside]


def minimal_target_modules(model, layer_names):
    """``target_modules`` that PEFT matches to exactly ``layer_names`` among the modules of the
    model: the layers' last name components (``["q_proj", "v_proj"]``) if that selects no other
    module, else their shortest dotted suffixes that do not, else a regex matching the full names."""
    layers, names = set(layer_names), _peft_names(model)

    def selects(spec):
        return {n for n in names if _matches(spec, n)} == layers

    short = sorted({n.rpartition(".")[2] for n in layers})
    if selects(short):
        return short
    suffixes = set()
    for layer in layers:
        parts = layer.split(".")
        for i in range(len(parts) - 1, -1, -1):
            cand = ".".join(parts[i:])
            if all(not (n == cand or n.endswith("." + cand)) or n in layers for n in names):
                suffixes.add(cand)
                break
    if selects(sorted(suffixes)):
        return sorted(suffixes)
    return "(" + "|".join(re.escape(n) for n in sorted(layers)) + ")"


def _patterns(layers, attr, default):
    """``rank_pattern`` / ``alpha_pattern`` for the layers whose ``attr`` differs from ``default``,
    keyed so that PEFT's rule (:func:`_pattern_key`) gives every layer its own value: short names
    (a layer's last component) when they suffice, else exact, anchored full names."""
    want = {n: getattr(m, attr) for n, m in layers.items()}

    def resolves(patterns):
        return all((patterns[k] if (k := _pattern_key(patterns, n)) is not None else default) == v
                   for n, v in want.items())

    odd = {n: v for n, v in want.items() if v != default}
    short = {}
    for n, v in odd.items():
        short.setdefault(re.escape(n.rpartition(".")[2]), v)
    if resolves(short):
        return short
    exact = {"^" + re.escape(n): v for n, v in odd.items()}  # "^": matches the whole name only
    if not resolves(exact):  # cannot happen: each key matches exactly one name
        raise AssertionError(f"{attr} pattern does not reproduce the layers' values")
    return exact


def save_adapter(model, directory, *, base_model_name_or_path=None, task_type=None, modules_to_save=None):
    """Write the LoRA adapters of ``model`` in PEFT's format.

    Files: ``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight``
    ``[r, in]`` and ``.lora_B.weight`` ``[out, r]``, for DoRA layers ``.lora_magnitude_vector``
    ``[out]`` and ``use_dora: true`` in the config, adapter name stripped, as PEFT saves),
    ``adapter_config.json`` and a short ``README.md`` model card (as PEFT writes one). The config's
    ``target_modules`` are the shortest names PEFT matches to exactly the model's LoRA layers
    (e.g. ``["q_proj", "v_proj"]``); the most common r / alpha are ``r`` / ``lora_alpha`` and
    the others go to ``rank_pattern`` / ``alpha_pattern`` under keys that PEFT's matching rule
    resolves to each layer's own value (checked before writing). After it,
    ``peft.PeftModel.from_pretrained(base_model, directory)`` computes what ``model`` computes, and
    with ``base_model_name_or_path`` (default: the model's ``config._name_or_path``) and a task
    type, ``peft.AutoPeftModelFor...from_pretrained(directory)`` finds the base.

    Args:
        model: a model with :class:`fastlora.LoRALinear` layers (e.g. from :func:`inject_lora`).
        directory: created if missing.
        base_model_name_or_path: recorded in the config (PEFT uses it to find the base model).
        task_type: PEFT's task type (e.g. ``"CAUSAL_LM"``); default: from a transformers language
            model's class name (``...ForCausalLM`` -> ``CAUSAL_LM``, ``...ForConditionalGeneration``
            -> ``SEQ_2_SEQ_LM``), else None (for ``SEQ_CLS`` and the like PEFT then requires the task
            head in the file: pass it with ``modules_to_save``).
        modules_to_save: names of extra modules saved whole (PEFT's ``modules_to_save``, e.g. a
            trained classification head), stored under ``base_model.model.<module>.<param>``.

    Sharded models (FSDP2 ``fully_shard``, DeepSpeed ZeRO-3): call it on every rank; the shards
    are gathered into full tensors and only rank 0 writes the files.

    Raises:
        TypeError: ``model`` not a Module; ``directory``, ``base_model_name_or_path``, ``task_type``
            not strings; ``modules_to_save`` not a list of names.
        ValueError: no LoRA layer, layers that disagree on rsLoRA or on DoRA, an unknown module to save.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory: expected a path, got {type(directory).__name__} {directory!r}")
    for name, value in (("base_model_name_or_path", base_model_name_or_path), ("task_type", task_type)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name}: expected a string or None, got {type(value).__name__} {value!r}")
    if modules_to_save is not None and (isinstance(modules_to_save, str) or not all(isinstance(m, str)
                                                                                    for m in modules_to_save)):
        raise TypeError(f"modules_to_save: expected a list of module names, got {modules_to_save!r}")
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"model: no fastlora.LoRALinear layer in {type(model).__name__}")
    rslora = {m.use_rslora for m in layers.values()}
    if len(rslora) > 1:
        raise ValueError("model: layers mix use_rslora True and False, which PEFT's config cannot express")
    dora = {m.use_dora for m in layers.values()}
    if len(dora) > 1:
        raise ValueError("model: layers mix use_dora True and False, which PEFT's config cannot express")
    modules = dict(model.named_modules())
    for name in modules_to_save or []:
        if name not in modules:
            raise ValueError(f"modules_to_save: no module {name!r} in {type(model).__name__}")
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
        if m.use_dora:
            tensors[f"{_PREFIX}{name}.lora_magnitude_vector"] = _full(m.lora_magnitude_vector)
    for name in modules_to_save or []:
        from .engines import zero3_gathered
        with zero3_gathered(list(modules[name].parameters())):
            for k, v in modules[name].state_dict().items():
                tensors[f"{_PREFIX}{name}.{k}"] = _full(v)
    base_name = base_model_name_or_path or _base_name_of(model)
    task = task_type or _task_type_of(model)
    config = {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": base_name,
        "inference_mode": True,
        "r": r_default,
        "lora_alpha": alpha_default,
        "lora_dropout": dropout,
        "use_rslora": rslora.pop(),
        "target_modules": minimal_target_modules(model, list(layers)),
        "rank_pattern": _patterns(layers, "r", r_default),
        "alpha_pattern": _patterns(layers, "lora_alpha", alpha_default),
        "fan_in_fan_out": any(m.fan_in_fan_out for m in layers.values()),
        "bias": "none",
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "init_lora_weights": True,
        "use_dora": dora.pop(),
    }
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    with open(os.path.join(directory, "README.md"), "w") as f:
        f.write(_model_card(config, len(layers)))


def _model_card(config, n_layers):
    """A short model card in the layout PEFT writes (YAML front matter with ``library_name: peft``)."""
    base = config["base_model_name_or_path"]
    front = ["---", "library_name: peft"] + ([f"base_model: {base}"] if base else []) + \
        ["tags:", "- lora", "- fastlora", "---", ""]
    target = config["target_modules"]
    body = [f"# LoRA adapter{f' for {base}' if base else ''}", "",
            f"A LoRA adapter in PEFT's format, written by fastlora: {n_layers} layers "
            f"(target_modules {target!r}), r={config['r']}, lora_alpha={config['lora_alpha']}"
            + (", rsLoRA" if config["use_rslora"] else "") + ".", "",
            "Load it with `peft.PeftModel.from_pretrained(base_model, path)` or `fastlora.load_adapter(model, path)`.",
            ""]
    return "\n".join(front + body)


# LoraConfig fields fastlora implements (their values are used).
_SUPPORTED = {"r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "target_modules", "exclude_modules",
              "rank_pattern", "alpha_pattern", "fan_in_fan_out", "modules_to_save", "bias"}
# Metadata and initialisation options with no effect on a loaded adapter's math.
_IGNORED = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
            "peft_version", "init_lora_weights", "runtime_config", "megatron_core", "qalora_group_size",
            "loftq_config", "eva_config", "corda_config", "lora_ga_config"}
# Everything else must be off: these change the math or the layout if set (values from PEFT 0.21).
_MUST_BE_OFF = {"lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
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


_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?:(?P<ab>[AB])(?:\.[^.]+)?\.weight|"
                  r"(?P<mag>magnitude_vector)(?:\.[^.]+)?(?:\.weight)?)$")


def load_adapter(model, directory):
    """Load a PEFT-saved LoRA adapter into a model with :class:`fastlora.LoRALinear` layers.

    Per-module ranks and alphas (``rank_pattern``, ``alpha_pattern``, resolved with PEFT's own
    matching rule), rsLoRA and the dropout come from the config; a layer whose rank differs from
    the adapter's is resized, which gives it new ``lora_A`` / ``lora_B`` parameters: one warning
    says how many layers and which ranks (rebuild optimizers after loading). Every value, tensor
    name and shape is checked before anything changes: all problems (tensors for modules that are
    not LoRA layers, LoRA layers the file lacks, shapes that disagree with the layer or the
    config, invalid hyper-parameters) are raised together in one ValueError (long lists
    summarised: the first lines and how many more), and the model is untouched. Load before
    sharding a model (FSDP2).

    Returns:
        The loaded LoRA layer names.

    Raises:
        TypeError: ``model`` not a Module, ``directory`` not a path. FileNotFoundError: a missing
        file. ValueError: see above and :func:`read_adapter_config`.
    """
    from safetensors.torch import load_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory: expected a path, got {type(directory).__name__} {directory!r}")
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
            found[m["module"]][m["ab"] or "m"] = (key, t)
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
        check_dropout_p(dropout, "lora_dropout")
    except (TypeError, ValueError) as e:
        problems.append(f"config: {e}")
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        problems.append(f"config: use_rslora: expected true or false, got {use_rslora!r}")
    use_dora = config.get("use_dora", False)
    if not isinstance(use_dora, bool):
        problems.append(f"config: use_dora: expected true or false, got {use_dora!r}")
        use_dora = False
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
        except (TypeError, ValueError) as e:
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
        if use_dora and "m" not in got:
            problems.append(f"{name}.lora_magnitude_vector: missing from the file (the config has use_dora=true)")
        elif use_dora and tuple(got["m"][1].shape) != (layer.out_features,):
            problems.append(f"{got['m'][0]}: shape {tuple(got['m'][1].shape)}, expected ({layer.out_features},)")
        elif not use_dora and "m" in got:
            problems.append(f"{got['m'][0]}: a DoRA magnitude, but the config has use_dora=false")
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise ValueError(f"{path}: {len(problems)} problem(s), nothing loaded:\n  " + "\n  ".join(shown))

    resized = collections.Counter((layers[n].r, hparams[n][0]) for n in layers if hparams[n][0] != layers[n].r)
    switched = [n for n in layers if layers[n].use_dora != use_dora]
    if switched:
        warnings.warn(f"load_adapter: {len(switched)} layer(s) made {'DoRA' if use_dora else 'plain LoRA'} to match "
                      f"the adapter (use_dora={use_dora}, e.g. {switched[0]}): they have new parameters, so rebuild "
                      "optimizers after loading", stacklevel=2)
    if resized:
        warnings.warn(f"load_adapter: {sum(resized.values())} LoRA layer(s) resized to the adapter's rank ("
                      + ", ".join(f"{n} from r={a} to r={b}" for (a, b), n in resized.items())
                      + "): they have new lora_A / lora_B parameters, so rebuild optimizers (and anything else "
                      "holding the old ones) after loading", stacklevel=2)
    with torch.no_grad():
        for name, layer in layers.items():
            r, alpha = hparams[name]
            if r != layer.r or layer.use_dora != use_dora:
                layer._init_lora(r, alpha, layer.lora_dropout, layer.use_rslora, use_dora)
            layer.lora_alpha = alpha
            layer.use_rslora = use_rslora
            layer.lora_dropout = float(config.get("lora_dropout", 0.0))
            layer.lora_A.weight.copy_(found[name]["A"][1])
            layer.lora_B.weight.copy_(found[name]["B"][1])
            if use_dora:
                layer.lora_magnitude_vector.copy_(found[name]["m"][1])
        for local, t in extra.items():
            params[local].copy_(t)
    return list(layers)


__all__ = ["inject_lora", "save_adapter", "load_adapter", "read_adapter_config", "lora_layers"]
