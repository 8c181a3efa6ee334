"""The finetune loop: every registered strategy trains, frozen parts stay put, encoder checks, weak labels, and the
loop never names a strategy."""

from __future__ import annotations

import ast
import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from radpretrain.cli import main
from radpretrain.data.cohorts import Case, load_cohort
from radpretrain.errors import CohortError, ConfigError
from radpretrain.finetune import build, loop, sweep
from radpretrain.finetune.config import DwpConfig, FinetuneConfig, WeakConfig
from radpretrain.finetune.strategies import STRATEGIES, Phase
from radpretrain.finetune.sweep import run_finetune
from radpretrain.models.encoders import build_encoder, save_encoder

from .conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[2]

#: A spec for each registered strategy (those that take an argument get one).
SPECS = {name: ("transfusion:2" if name == "transfusion" else name) for name in STRATEGIES.names()}


def tiny(cohort, encoder, out, **overrides) -> FinetuneConfig:
    values = {
        "cohort": cohort,
        "structure": "lungs",
        "encoder": str(encoder),
        "size": 32,
        "epochs": 2,
        "batch_size": 4,
        "n_train": 6,
        "cpu": True,
        "out": out,
        "progress": False,
        "dwp": DwpConfig(vae_steps=30, vae_batch=256, hidden=16, kernel_sample=256, init="encoder"),
    }
    values.update(overrides)
    return FinetuneConfig(**values)


def encoder_tensors(state: dict[str, torch.Tensor], prefix: str = "encoder.") -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_strategy_builds_and_trains(name, lung_cohort, pretrained_encoder, tmp_path):
    result = run_finetune(tiny(lung_cohort, pretrained_encoder, tmp_path, strategy=SPECS[name]))
    assert result["steps"] >= 2 and result["n_train"] + result["n_val"] == 6 and result["n_test"] > 0
    assert 0.0 <= result["metrics"]["dice"] <= 1.0 and 0.0 <= result["metrics"]["iou"] <= result["metrics"]["dice"]
    before = load_file(str(pretrained_encoder / "encoder.safetensors"))
    after = encoder_tensors(load_file(str(tmp_path / "model.safetensors")))
    moved = {k for k in before if k in after and before[k].is_floating_point() and not torch.equal(before[k], after[k])}
    if name == "frozen":
        assert not moved  # weights and batch-norm statistics
    elif name == "partial":
        assert moved and not any(k.startswith(("layer1.", "layer2.", "layer3.")) for k in moved)
        assert any(k.startswith("layer4.") for k in moved) and any(k.startswith("conv1.") for k in moved)
    else:
        assert any(k.endswith("weight") and k.startswith("layer2.") for k in moved)
    if name == "dwp":
        assert any(k.endswith("log_var") for k in after)
        log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
        assert all(row["kl"] > 0 for row in log)
    if name == "lp-ft":
        log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
        assert [row["phase"] for row in log] == ["probe", "finetune"]
    # The finetuned 2D encoder is exported like any other and loads into plain timm.
    card = json.loads((tmp_path / "encoder" / "encoder.json").read_text())
    assert card["finetuned"]["strategy"] == SPECS[name] and card["timm_name"] == "test_resnet"


def test_lp_ft_probe_phase_leaves_the_encoder_alone(lung_cohort, pretrained_encoder, tmp_path):
    # One probe epoch and no finetune epoch: the encoder must come out exactly as it went in.
    cfg = tiny(lung_cohort, pretrained_encoder, tmp_path, strategy="lp-ft", epochs=1)
    assert loop.split_epochs([Phase("a", 0.5), Phase("b", 0.5)], 1) == [1, 1]
    cfg.options.lp_fraction = 0.9
    built = build.build_model(cfg, load_cohort(lung_cohort, structure="lungs"))
    phases = built.strategy.phases(built.ctx)
    assert loop.split_epochs(phases, 10) == [9, 1]
    reference = {k: v.clone() for k, v in built.model.encoder.state_dict().items()}
    loop.set_trainable(built.model, phases[0].frozen)
    assert not any(p.requires_grad for p in built.model.encoder.parameters())
    assert all(p.requires_grad for n, p in built.model.named_parameters() if not n.startswith("encoder."))
    built.model.train()
    loop.hold_frozen_norms(built.model, phases[0].frozen)
    built.model(torch.randn(4, 1, 32, 32)).mean().backward()
    for k, v in built.model.encoder.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_classification_cohort_end_to_end_through_the_cli(body_part_cohort, pretrained_encoder, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "finetune",
        f"cohort={body_part_cohort}",
        f"encoder={pretrained_encoder}",
        "strategy=lp-ft",
        "size=32",
        "epochs=3",
        "batch_size=4",
        "test_fraction=0.3",
        "cpu=true",
        "progress=false",
        f"out={out}",
    ]
    assert main(args) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["kind"] == "cls2d" and json.loads(capsys.readouterr().out)["metrics"] == result["metrics"]
    assert set(result["metrics"]) == {"loss", "auroc", "accuracy", "balanced_accuracy"}
    assert 0.0 <= result["metrics"]["accuracy"] <= 1.0
    assert (out / "config.yaml").read_text().count("strategy: lp-ft") == 1
    assert main([*args, "optim.lr=-1"]) == 2


def test_encoders_that_do_not_fit_are_refused(lung_cohort, pretrained_encoder, tmp_path):
    other = tmp_path / "other-convention"
    shutil.copytree(pretrained_encoder, other)
    card = json.loads((other / "encoder.json").read_text())
    card["intensity_convention"] = "raw-hu-v0"
    (other / "encoder.json").write_text(json.dumps(card))
    with pytest.raises(ConfigError, match="uses intensity convention 'raw-hu-v0'"):
        run_finetune(tiny(lung_cohort, other, tmp_path / "a"))
    save_encoder(build_encoder("test_resnet", in_chans=3), tmp_path / "rgb", {})
    with pytest.raises(ConfigError, match="takes 3 input channels but cohort images have 1"):
        run_finetune(tiny(lung_cohort, tmp_path / "rgb", tmp_path / "b"))
    # A CNN exported at 64 px takes any size; a ViT's position embeddings fix its input size.
    assert build.fixed_input_size({"timm_name": "test_resnet", "img_size": 64}) is None
    assert build.fixed_input_size({"timm_name": "test_vit", "img_size": 64}) == 64
    save_encoder(build_encoder("test_vit", img_size=64), tmp_path / "vit", {})
    with pytest.raises(ConfigError, match="fixed input size of 64 px but size=32; set size=64"):
        run_finetune(tiny(lung_cohort, tmp_path / "vit", tmp_path / "c"))
    with pytest.raises(ConfigError, match="transfers pretrained weights but encoder 'test_resnet' is not an exported"):
        run_finetune(tiny(lung_cohort, "test_resnet", tmp_path / "d", strategy="full"))
    with pytest.raises(ConfigError, match=r"no encoder\.json in"):
        run_finetune(tiny(lung_cohort, tmp_path / "missing" / "encoder", tmp_path / "f"))
    with pytest.raises(CohortError, match="label count 500 is larger than the pool"):
        run_finetune(tiny(lung_cohort, pretrained_encoder, tmp_path / "e", n_train=500))


def test_weak_label_stage(lung_cohort, weak_lung_cohort, tmp_path):
    weak = WeakConfig(cohort=weak_lung_cohort, epochs=1)
    only = run_finetune(tiny(lung_cohort, "test_resnet", tmp_path / "only", strategy="weak-only", weak=weak))
    assert only["n_train"] == 0 and only["n_weak"] == 40 and len(only["epochs"]) == 1
    then = run_finetune(tiny(lung_cohort, "test_resnet", tmp_path / "then", strategy="weak+random", weak=weak))
    stages = [json.loads(line)["stage"] for line in (tmp_path / "then" / "log.jsonl").read_text().splitlines()]
    assert stages == ["weak", "finetune", "finetune"]
    assert then["n_train"] > 0 and 0.0 <= then["metrics"]["dice"] <= 1.0
    with pytest.raises(ConfigError, match=r"set weak\.cohort"):
        run_finetune(tiny(lung_cohort, "test_resnet", tmp_path / "x", strategy="weak-only"))


def test_split_val_keeps_patients_apart():
    cases = [Case(f"c{i}", f"p{i // 3}", None, 0) for i in range(12)]  # type: ignore[arg-type]
    train, val = loop.split_val(cases, 0.25, seed=3)
    assert len(train) + len(val) == 12 and {c.patient for c in train}.isdisjoint({c.patient for c in val})
    assert len(val) == 3
    assert loop.split_val(cases[:2], 0.5, seed=0) == (cases[:2], [])


def test_from_scratch_3d_baseline_on_real_volumes(tmp_path):
    volumes = SHARED_DATA / "volumes-3d"
    cfg = FinetuneConfig(
        cohort=volumes,
        model="unet",
        strategy="random",
        size=32,
        epochs=1,
        batch_size=2,
        n_train=2,
        test_fraction=0.25,
        cpu=True,
        out=tmp_path,
        progress=False,
    )
    result = run_finetune(cfg)
    assert result["encoder"] == "model:unet" and result["kind"] == "seg3d" and result["n_test"] == 1
    assert 0.0 <= result["metrics"]["dice"] <= 1.0
    cfg.strategy = "full"
    with pytest.raises(ConfigError, match="from-scratch baseline without a pretrained encoder"):
        run_finetune(cfg)


@pytest.mark.parametrize("module", [loop, build])
def test_the_loop_and_the_build_never_name_a_strategy(module):
    # Strategy-specific work goes through the registry entry's hooks, so a new strategy needs no loop change.
    tree = ast.parse(Path(module.__file__).read_text())
    names = set(STRATEGIES.names())
    literals = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value in names}
    assert not literals, f"{module.__name__} names strategies {sorted(literals)}; give the strategy a hook instead"
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    assert "radpretrain.finetune.dwp" not in imported


def test_only_a_dwp_run_imports_the_deep_weight_prior(lung_cohort, pretrained_encoder, tmp_path):
    # A fresh interpreter: in this one the dwp tests have imported it already.
    code = f"""
import sys
from radpretrain.finetune.config import DwpConfig, FinetuneConfig
from radpretrain.finetune.sweep import run_finetune

def run(strategy):
    run_finetune(FinetuneConfig(
        cohort={str(lung_cohort)!r}, structure="lungs", encoder={str(pretrained_encoder)!r}, size=32, epochs=1,
        batch_size=4, n_train=4, cpu=True, progress=False, out={str(tmp_path)!r} + "/" + strategy,
        strategy=strategy, dwp=DwpConfig(vae_steps=2, vae_batch=64, hidden=8, kernel_sample=64, init="encoder"),
    ))
    return "radpretrain.finetune.dwp" in sys.modules

print(run("full"), run("dwp"))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(ROOT)}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True"]


def spy_fits(monkeypatch) -> list[dict]:
    """Record what each call of loop.fit trained on, validated on and which rule it used (it still trains)."""
    calls: list[dict] = []
    real = loop.fit

    def fit(built, train_set, val_set, **kwargs):
        calls.append(
            {
                "stage": kwargs["stage"],
                "train": [c.id for c in train_set.cases],
                "val": [] if val_set is None else [c.id for c in val_set.cases],
                "selection": kwargs["selection"],
            }
        )
        return real(built, train_set, val_set, **kwargs)

    monkeypatch.setattr(loop, "fit", fit)
    return calls


@pytest.mark.parametrize("n", [5, 6])
def test_the_tiny_n_rule_engages_below_the_threshold_and_not_at_it(
    n, lung_cohort, pretrained_encoder, tmp_path, monkeypatch
):
    # Threshold 6 stands in for the default 30 so that the runs stay tiny; the rule is `n < fixed_schedule_below`.
    calls = spy_fits(monkeypatch)
    cfg = tiny(lung_cohort, pretrained_encoder, tmp_path, n_train=n, fixed_schedule_below=6, epochs=3, val_fraction=0.3)
    cohort = load_cohort(lung_cohort, structure="lungs")
    pool, test = sweep.split_test(sweep.labeled_cases(cohort), fraction=0.2, seed=0)
    labeled = sweep.draw_labeled(pool, n, seed=0)
    result = loop.train_and_evaluate(cfg, cohort, labeled, test, out_dir=tmp_path)
    (call,) = calls
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    if n == 5:  # below: every labeled case trains, no validation, every epoch runs and the last one is kept
        assert sorted(call["train"]) == sorted(c.id for c in labeled) and call["val"] == []
        assert call["selection"] == result["selection"] == "fixed schedule (n < 6)"
        assert (result["n_train"], result["n_val"]) == (5, 0)
        assert not any("val_loss" in row for row in log) and len(log) == 3 and result["best_epoch"] == [3]
    else:  # at the threshold: a patient-level validation split picks the epoch
        assert call["val"] and set(call["train"]).isdisjoint(call["val"])
        assert sorted(call["train"] + call["val"]) == sorted(c.id for c in labeled)
        assert call["selection"] == result["selection"] == "best val epoch"
        assert result["n_val"] == len(call["val"]) and all("val_loss" in row for row in log)
        best = min(log, key=lambda row: row["val_loss"])["epoch"]
        assert result["best_epoch"] == [best]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["selection"] == result["selection"]


def test_the_default_threshold_is_30_labeled_cases():
    cases = [Case(f"c{i}", f"p{i}", None, 0) for i in range(30)]  # type: ignore[arg-type]
    cfg = FinetuneConfig()
    assert loop.split_for_selection(cases[:29], cfg, seed=0) == (cases[:29], [], "fixed schedule (n < 30)")
    train, val, rule = loop.split_for_selection(cases, cfg, seed=0)
    assert rule == "best val epoch" and len(val) == 6 and len(train) == 24
    with pytest.raises(ConfigError, match="fixed_schedule_below must be >= 0"):
        FinetuneConfig(fixed_schedule_below=-1).validate()


def lp_ft_and_frozen(lung_cohort, pretrained_encoder, tmp_path, **overrides) -> dict[str, dict]:
    out = {}
    for name in ("frozen", "lp-ft"):
        cfg = tiny(lung_cohort, pretrained_encoder, tmp_path / name, strategy=name, epochs=4, **overrides)
        cfg.options.lp_fraction = 0.5
        out[name] = run_finetune(cfg)
    return out


def test_lp_ft_keeps_a_model_of_its_finetune_phase(lung_cohort, pretrained_encoder, tmp_path, monkeypatch):
    # The validation loss is lowest in the probe phase (epoch 2): selecting across both phases would keep the
    # probe, whose encoder is the pretrained one, and lp-ft would score exactly as frozen (issue #13).
    losses = iter([1.0, 0.1, 5.0, 6.0] * 2)
    real = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: {**real(*a, **k), "loss": next(losses)})
    runs = lp_ft_and_frozen(lung_cohort, pretrained_encoder, tmp_path, n_train=8, fixed_schedule_below=0)
    assert runs["frozen"]["selection"] == runs["lp-ft"]["selection"] == "best val epoch"
    assert runs["frozen"]["best_epoch"] == [2] and runs["lp-ft"]["best_epoch"] == [3]
    assert runs["lp-ft"]["metrics"] != runs["frozen"]["metrics"]
    before = load_file(str(pretrained_encoder / "encoder.safetensors"))
    after = encoder_tensors(load_file(str(tmp_path / "lp-ft" / "model.safetensors")))
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    frozen = encoder_tensors(load_file(str(tmp_path / "frozen" / "model.safetensors")))
    assert all(torch.equal(before[k], frozen[k]) for k in before if before[k].is_floating_point())


def test_lp_ft_differs_from_frozen_under_the_fixed_schedule(lung_cohort, pretrained_encoder, tmp_path):
    runs = lp_ft_and_frozen(lung_cohort, pretrained_encoder, tmp_path, n_train=6)
    assert runs["lp-ft"]["selection"] == "fixed schedule (n < 30)" and runs["lp-ft"]["best_epoch"] == [4]
    assert runs["lp-ft"]["metrics"] != runs["frozen"]["metrics"]


def test_test_outputs_are_kept_per_case(lung_cohort, body_part_cohort, pretrained_encoder, tmp_path):
    from radpretrain.finetune.uncertainty import weighted_metric

    seg = run_finetune(tiny(lung_cohort, pretrained_encoder, tmp_path / "seg", epochs=1))
    per_case = seg["per_case"]
    assert len(per_case["patients"]) == len(per_case["dice"]) == len(per_case["hd95"]) == seg["n_test"]
    # The run's score is the mean over its cases; the per-case record rebuilds it.
    for name in ("dice", "iou", "hd95"):
        assert weighted_metric(per_case, name, np.ones(seg["n_test"]))[0] == pytest.approx(
            seg["metrics"][name], rel=1e-5, nan_ok=True
        )
    assert len(seg["test_set"]) == 16
    cfg = tiny(body_part_cohort, pretrained_encoder, tmp_path / "cls", structure=None, epochs=1, test_fraction=0.4)
    cls = run_finetune(replace(cfg, seed=1))
    per_case = cls["per_case"]
    assert set(per_case["labels"]) == {0, 1} and math.isfinite(cls["metrics"]["auroc"])  # seed 1: both classes
    assert len(per_case["labels"]) == len(per_case["logits"]) == cls["n_test"] and len(per_case["logits"][0]) == 2
    for name in ("auroc", "accuracy", "balanced_accuracy"):
        assert weighted_metric(per_case, name, np.ones(cls["n_test"]))[0] == pytest.approx(
            cls["metrics"][name], abs=1e-5
        )
