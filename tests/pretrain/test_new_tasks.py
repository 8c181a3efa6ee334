"""VICReg, Barlow Twins and DINO: losses against slow references, DINO's wiring, local views and CLI runs."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightly.models.modules import DINOProjectionHead
from safetensors.torch import load_file

from radpretrain.cli import main
from radpretrain.data.transforms import ViewMaker, ViewsConfig, local_view_size
from radpretrain.errors import ConfigError
from radpretrain.models.encoders import build_encoder
from radpretrain.pretrain.loop import pretrain
from radpretrain.pretrain.tasks import build_objective
from radpretrain.pretrain.tasks.dino import weight_normed_layer
from radpretrain.shards.format import LOCAL_VIEWS, VIEW_NAMES

VOCAB = {"body_part": ["chest", "hand"], "age_bucket": ["0-1", "18-39"], "sex": ["F", "M"], "view": ["PA", "AP"]}
SMALL = {"hidden_dim": 32, "output_dim": 16}
SMALL_DINO = {"hidden_dim": 32, "bottleneck_dim": 8, "output_dim": 24, "local_views": 3}


def views_batch(views: tuple[str, ...], b: int = 5, size: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    local = local_view_size(size)
    return {v: torch.randn(b, 1, *(2 * [local if v in LOCAL_VIEWS else size]), generator=g) for v in views}


def projections(task: torch.nn.Module, encoder: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[list[float]]:
    with torch.no_grad():
        z = task.projection_head(encoder(torch.cat([batch["view0"], batch["view1"]])))
    return z.tolist()


# ---------------------------------------------------------------------------------------------------------------
# VICReg
# ---------------------------------------------------------------------------------------------------------------


def slow_vicreg(z: list[list[float]], lam: float, mu: float, nu: float, eps: float = 1e-4) -> float:
    """VICReg written out (Bardes et al. 2022, Algorithm 1) on the 2N rows of both views' projections."""
    n = len(z) // 2
    a, b = z[:n], z[n:]
    d = len(a[0])
    invariance = sum((a[i][k] - b[i][k]) ** 2 for i in range(n) for k in range(d)) / (n * d)

    def variance(x: list[list[float]]) -> float:
        total = 0.0
        for k in range(d):
            mean = sum(row[k] for row in x) / n
            var = sum((row[k] - mean) ** 2 for row in x) / (n - 1)
            total += max(0.0, 1.0 - math.sqrt(var + eps))
        return total / d

    def covariance(x: list[list[float]]) -> float:
        means = [sum(row[k] for row in x) / n for k in range(d)]
        total = 0.0
        for k in range(d):
            for m in range(d):
                if k != m:
                    cov = sum((row[k] - means[k]) * (row[m] - means[m]) for row in x) / (n - 1)
                    total += cov**2
        return total / d

    return lam * invariance + mu * 0.5 * (variance(a) + variance(b)) + nu * (covariance(a) + covariance(b))


def test_vicreg_task_loss_matches_the_slow_reference() -> None:
    torch.manual_seed(0)
    encoder = build_encoder("test_resnet")
    options = {"vicreg": {**SMALL, "lambda_param": 20.0, "mu_param": 15.0, "nu_param": 2.0}}
    objective = build_objective(encoder, {"vicreg": 1.0}, options, VOCAB)
    batch = views_batch(("view0", "view1"))
    out = objective(encoder, batch)
    z = projections(objective.tasks["vicreg"], encoder, batch)
    assert out["loss"].item() == pytest.approx(slow_vicreg(z, 20.0, 15.0, 2.0), rel=1e-4)
    terms = 20.0 * out["vicreg/invariance"] + 15.0 * out["vicreg/variance"] + 2.0 * out["vicreg/covariance"]
    assert terms.item() == pytest.approx(out["loss"].item(), rel=1e-5)
    # the paper's weights by default
    task = build_objective(encoder, {"vicreg": 1.0}, {"vicreg": SMALL}, VOCAB).tasks["vicreg"]
    assert (task.criterion.lambda_param, task.criterion.mu_param, task.criterion.nu_param) == (25.0, 25.0, 1.0)
    with pytest.raises(ConfigError, match="num_layers must be >= 2"):
        build_objective(encoder, {"vicreg": 1.0}, {"vicreg": {"num_layers": 1}}, VOCAB)


# ---------------------------------------------------------------------------------------------------------------
# Barlow Twins
# ---------------------------------------------------------------------------------------------------------------


def slow_barlow_twins(z: list[list[float]], lam: float) -> float:
    """Barlow Twins written out (Zbontar et al. 2021, eq. 1): batch-standardised cross-correlation vs identity."""
    n = len(z) // 2
    d = len(z[0])

    def standardise(x: list[list[float]]) -> list[list[float]]:
        cols = []
        for k in range(d):
            mean = sum(row[k] for row in x) / n
            std = math.sqrt(sum((row[k] - mean) ** 2 for row in x) / n + 1e-5)  # batch norm: biased, eps 1e-5
            cols.append([(row[k] - mean) / std for row in x])
        return cols

    a, b = standardise(z[:n]), standardise(z[n:])
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[i][s] * b[j][s] for s in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lam * c**2
    return loss


def test_barlow_twins_task_loss_matches_the_slow_reference() -> None:
    torch.manual_seed(1)
    encoder = build_encoder("test_resnet")
    options = {"barlow_twins": {**SMALL, "lambda_param": 0.02}}
    objective = build_objective(encoder, {"barlow_twins": 1.0}, options, VOCAB)
    batch = views_batch(("view0", "view1"), b=6)
    out = objective(encoder, batch)
    z = projections(objective.tasks["barlow_twins"], encoder, batch)
    assert out["loss"].item() == pytest.approx(slow_barlow_twins(z, 0.02), rel=1e-4)
    assert -1.0 <= out["barlow_twins/on_diagonal"].item() <= 1.0
    with pytest.raises(ConfigError, match="lambda_param must be > 0"):
        build_objective(encoder, {"barlow_twins": 1.0}, {"barlow_twins": {"lambda_param": 0.0}}, VOCAB)


# ---------------------------------------------------------------------------------------------------------------
# DINO
# ---------------------------------------------------------------------------------------------------------------


def slow_dino(
    teacher: list[torch.Tensor], student: list[torch.Tensor], center: torch.Tensor, tt: float, st: float
) -> float:
    """DINO's loss written out: each teacher view against every other student view, cross-entropy per image."""
    total, terms = 0.0, 0
    for t, t_out in enumerate(teacher):
        for s, s_out in enumerate(student):
            if s == t:
                continue
            for i in range(t_out.shape[0]):
                p = [math.exp((float(x) - float(c)) / tt) for x, c in zip(t_out[i], center, strict=True)]
                q = [math.exp(float(x) / st) for x in s_out[i]]
                total += -sum(pk / sum(p) * math.log(qk / sum(q)) for pk, qk in zip(p, q, strict=True))
                terms += 1
    return total / terms


@pytest.mark.parametrize("kind", ["test_resnet", "test_vit"])
def test_dino_loss_centre_and_views(kind: str) -> None:
    torch.manual_seed(2)
    encoder = build_encoder(kind, img_size=64)
    options = {"dino": {**SMALL_DINO, "center_momentum": 0.8, "student_temp": 0.2}}
    objective = build_objective(encoder, {"dino": 1.0}, options, VOCAB)
    task = objective.tasks["dino"]
    assert objective.views == ("view0", "view1", "local0", "local1", "local2")
    batch = views_batch(objective.views, b=3)
    center = torch.randn(24) * 0.1
    task.criterion.center.copy_(center.view(1, 1, -1))
    out = objective(encoder, batch)
    with torch.no_grad():
        heads = task.projection_head
        student = list(heads(encoder(torch.cat([batch["view0"], batch["view1"]]))).chunk(2))
        student += list(heads(encoder(torch.cat([batch[f"local{i}"] for i in range(3)]))).chunk(3))
        global_views = torch.cat([batch["view0"], batch["view1"]])
        teacher = list(task.projection_head_momentum(task.encoder_momentum(global_views)).chunk(2))
    expected = slow_dino(teacher, student, center, tt=0.04, st=0.2)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-4)
    # the centre moved towards the mean teacher output of the batch, by 1 - center_momentum
    mean = torch.cat(teacher).mean(0)
    torch.testing.assert_close(task.criterion.center.view(-1), 0.8 * center + 0.2 * mean, rtol=1e-5, atol=1e-6)
    # the teacher starts as the student's copy and is never trained
    assert all(not p.requires_grad for p in task.projection_head_momentum.parameters())
    torch.testing.assert_close(task.projection_head_momentum.last_layer.weight, task.projection_head.last_layer.weight)


def test_dino_teacher_temperature_warms_up_linearly_and_resumes() -> None:
    encoder = build_encoder("test_resnet")
    options = {"dino": {**SMALL_DINO, "warmup_teacher_temp": 0.04, "teacher_temp": 0.07, "teacher_temp_warmup": 0.3}}
    task = build_objective(encoder, {"dino": 1.0}, options, VOCAB).tasks["dino"]
    assert task.teacher_temp.item() == pytest.approx(0.04)  # the first step
    seen = {}
    for step in (1, 15, 29, 30, 31, 100):
        task.after_step(encoder, step, 100)
        seen[step] = task.teacher_temp.item()
    assert seen[1] == pytest.approx(0.04 + 0.03 / 30)
    assert seen[15] == pytest.approx(0.055)
    assert seen[29] == pytest.approx(0.04 + 0.03 * 29 / 30)
    assert seen[30] == seen[31] == seen[100] == pytest.approx(0.07)
    # the schedule's position is in the checkpointed state: a restored task goes on from it
    state = task.state_dict()
    assert {"teacher_temp", "steps_done", "criterion.center"} <= set(state)
    fresh = build_objective(encoder, {"dino": 1.0}, options, VOCAB).tasks["dino"]
    fresh.load_state_dict(state)
    assert fresh.teacher_temp.item() == pytest.approx(0.07) and int(fresh.steps_done) == 100
    no_warmup = build_objective(encoder, {"dino": 1.0}, {"dino": {**SMALL_DINO, "teacher_temp_warmup": 0.0}}, VOCAB)
    assert no_warmup.tasks["dino"].teacher_temp.item() == pytest.approx(0.07)


def test_dino_freezes_the_last_layer_for_its_first_steps() -> None:
    torch.manual_seed(3)
    encoder = build_encoder("test_resnet")
    objective = build_objective(encoder, {"dino": 1.0}, {"dino": {**SMALL_DINO, "freeze_last_layer_steps": 2}}, VOCAB)
    task = objective.tasks["dino"]
    direction = task.projection_head.last_layer.parametrizations.weight.original1
    gain = task.projection_head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad  # norm_last_layer: the gain stays 1

    def grad_after(step: int) -> float:
        task.after_step(encoder, step, 10)
        direction.grad = None
        objective(encoder, views_batch(objective.views, seed=step))["loss"].backward()
        assert direction.grad is not None
        return float(direction.grad.abs().sum())

    assert grad_after(0) == 0.0 and grad_after(1) == 0.0
    assert grad_after(2) > 0.0
    assert float(next(task.projection_head.layers.parameters()).grad.abs().sum()) > 0  # the MLP learns throughout


def test_dino_last_layer_is_lightlys_map_and_can_be_copied() -> None:
    torch.manual_seed(4)
    with pytest.warns(FutureWarning):  # lightly's old-style weight_norm, which copy.deepcopy refuses
        head = DINOProjectionHead(8, 16, 4, 12)
    x = torch.randn(3, 4)
    expected = head.last_layer(x)
    converted = weight_normed_layer(head.last_layer, norm_last_layer=True)
    torch.testing.assert_close(converted(x), expected)
    torch.testing.assert_close(copy.deepcopy(converted)(x), expected)


def test_dino_refuses_a_fixed_size_vit_and_misfit_local_crops_with_a_fix() -> None:
    fixed = build_encoder("test_vit", img_size=64, dynamic_img_size=False)
    with pytest.raises(ConfigError, match=r"encoder.options=\{dynamic_img_size: true\}"):
        build_objective(fixed, {"dino": 1.0}, {"dino": SMALL_DINO}, VOCAB)
    # without local crops a fixed-size ViT is fine
    build_objective(fixed, {"dino": 1.0}, {"dino": {**SMALL_DINO, "local_views": 0}}, VOCAB)
    dynamic = build_encoder("test_vit", img_size=64)
    objective = build_objective(dynamic, {"dino": 1.0}, {"dino": SMALL_DINO}, VOCAB)
    batch = views_batch(objective.views)
    for name in LOCAL_VIEWS[:3]:
        batch[name] = torch.randn(5, 1, 24, 24)
    with pytest.raises(ConfigError, match=r"augment\.local_size to a multiple of 16"):
        objective(dynamic, batch)
    with pytest.raises(ConfigError, match=r"local_views must be within 0\.\.8"):
        build_objective(dynamic, {"dino": 1.0}, {"dino": {"local_views": 9}}, VOCAB)


# ---------------------------------------------------------------------------------------------------------------
# Local views
# ---------------------------------------------------------------------------------------------------------------


def test_local_views_are_small_crops_and_leave_the_other_views_alone() -> None:
    assert set(LOCAL_VIEWS) <= set(VIEW_NAMES) and len(LOCAL_VIEWS) == 8
    assert local_view_size(224) == 96 and local_view_size(64) == 32 and local_view_size(32) == 16
    assert local_view_size(224, 112) == 112
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4000, (96, 80)).astype(np.uint16)
    meta = {"window_center": 2000.0, "window_width": 4000.0}
    cfg = ViewsConfig()
    assert cfg.local.crop_scale == (0.05, 0.4)
    both = ViewMaker(("view0", "view1", "local0", "local1"), cfg, 64, seed=3)(pixels, meta)
    assert both["view0"].shape == (1, 64, 64) and both["local0"].shape == (1, 32, 32)
    assert not np.array_equal(both["local0"], both["local1"])
    alone = ViewMaker(("view0", "view1"), cfg, 64, seed=3)(pixels, meta)
    np.testing.assert_array_equal(alone["view0"], both["view0"])  # asking for local views changes no other view
    np.testing.assert_array_equal(alone["view1"], both["view1"])
    sized = ViewMaker(("local0",), ViewsConfig(local_size=48), 64)(pixels, meta)
    assert sized["local0"].shape == (1, 48, 48)
    with pytest.raises(ConfigError, match="local_size"):
        ViewsConfig(local_size=-1).validate()


# ---------------------------------------------------------------------------------------------------------------
# The command line on the tiny shards
# ---------------------------------------------------------------------------------------------------------------

CLI_OPTIONS = {
    "vicreg": "{vicreg: {hidden_dim: 32, output_dim: 32}}",
    "barlow_twins": "{barlow_twins: {hidden_dim: 32, output_dim: 32}}",
    "dino": "{dino: {hidden_dim: 32, bottleneck_dim: 16, output_dim: 64, local_views: 2}}",
}


@pytest.mark.parametrize("task", sorted(CLI_OPTIONS))
def test_cli_pretrains_with_the_new_task(task: str, tiny_overrides: list[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*tiny_overrides, f"out={run}", f"tasks={{{task}: 1.0}}", f"task_options={CLI_OPTIONS[task]}", "steps=2"]
    assert main(["pretrain", *args]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2]
    assert all(math.isfinite(row[f"{task}/loss"]) for row in log)
    assert (run / "summary.json").is_file()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resumed_dino_run_repeats_the_uninterrupted_run(make_config: Callable[..., Any], tmp_path: Path) -> None:
    # DINO's state beyond the weights: the teacher, the centre, the temperature schedule and the freeze.
    options = (
        "{dino: {hidden_dim: 32, bottleneck_dim: 16, output_dim: 64, local_views: 2, teacher_temp_warmup: 0.5, "
        "freeze_last_layer_steps: 2}}"
    )
    common = ["steps=6", "probe.k=3", "tasks={dino: 1.0}", f"task_options={options}"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    pretrain(make_config(*common, out=whole))
    pretrain(make_config(*common, "stop_after=3", out=parts))
    pretrain(make_config(*common, "resume=true", out=parts))
    a, b = (read_jsonl(run / "log.jsonl") for run in (whole, parts))
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["dino/teacher_temp"] for r in a] == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.07, 0.07], abs=1e-6)
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "dino/teacher_temp", "dino/momentum", "dino/teacher_entropy"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-6), (ra["step"], key)
    wa, wb = (load_file(str(run / "checkpoint/model.safetensors")) for run in (whole, parts))
    assert wa.keys() == wb.keys() and any("center" in name for name in wa)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6, msg=name)
