"""Finetune one model on one labeled subset of a cohort with Accelerate, then measure it on the test cases."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from radpretrain.config import save_config
from radpretrain.errors import CohortError, ConfigError, NonFiniteLossError
from radpretrain.files import atomic_path, write_text
from radpretrain.finetune.build import Built, build_model, outputs_of, task_of
from radpretrain.finetune.config import FinetuneConfig
from radpretrain.finetune.metrics import evaluate, make_loss, per_case_outputs, predict, task_metrics
from radpretrain.finetune.strategies import Phase, under

if TYPE_CHECKING:
    from accelerate import Accelerator

    from radpretrain.data.cohorts import Case, Cohort


# --------------------------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------------------------

#: The model-selection rules a run reports (`selection` in metrics.json and results.jsonl).
BEST_VAL = "best val epoch"
#: No validation case (val_fraction 0, or fewer than three labeled cases): the training loss picks the epoch.
BEST_TRAIN = "best train-loss epoch"


def fixed_schedule(threshold: int) -> str:
    """The rule of a run below `fixed_schedule_below` labeled cases: all train, the last epoch is kept."""
    return f"fixed schedule (n < {threshold})"


def split_epochs(phases: list[Phase], epochs: int) -> list[int]:
    """Whole epochs per phase in proportion to their shares, at least one each, summing to `epochs`."""
    counts = [max(1, round(p.share * epochs)) for p in phases]
    counts[-1] = max(1, epochs - sum(counts[:-1]))
    return counts


def set_trainable(model: nn.Module, frozen: tuple[str, ...]) -> list[nn.Parameter]:
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(not under(name, frozen))
        if param.requires_grad:
            params.append(param)
    if not params:
        raise ConfigError("the strategy froze every parameter; nothing would train")
    return params


def hold_frozen_norms(model: nn.Module, frozen: tuple[str, ...]) -> None:
    """Frozen parts keep their normalisation statistics too: their batch norms run in eval mode."""
    for name, module in model.named_modules():
        if under(name, frozen) and isinstance(module, nn.modules.batchnorm._NormBase):
            module.eval()


@dataclass
class FitResult:
    epochs: int
    steps: int
    #: The epoch whose weights were kept (the last one under a fixed schedule).
    best_epoch: int
    best_val_loss: float
    log: list[dict[str, Any]]
    selection: str = BEST_VAL


def fit(
    built: Built,
    train_set: Any,
    val_set: Any | None,
    *,
    task: str,
    cfg: FinetuneConfig,
    epochs: int,
    accelerator: Accelerator,
    loss_values: int,
    phases: list[Phase],
    stage: str,
    selection: str = BEST_VAL,
) -> FitResult:
    """Adam per phase; ReduceLROnPlateau + early stopping on the validation loss, or cosine; keep the best epoch
    of the last phase.

    `loss_values`: how many values the task loss averages over in one pass over `train_set` (cases, times
    pixels or voxels for masks); the strategy's regulariser divides by it to sit on the task loss's scale.
    `selection`: BEST_VAL or BEST_TRAIN pick the epoch with the lowest monitored loss and stop early; any other
    rule (a fixed schedule) runs every epoch and keeps the last. Only the last phase's epochs are candidates:
    earlier phases prepare it (lp-ft's linear probe), and a probe epoch that wins on a noisy validation loss
    would throw the finetune away.
    """
    from torch.utils.data import DataLoader, RandomSampler
    from tqdm.auto import tqdm

    from radpretrain.shards.reader import prepare_worker_sockets

    model, strategy = built.model, built.strategy
    loss_fn = make_loss(task, cfg)
    # Batch norm needs two samples per batch; a one-case training set is drawn twice (augmented apart).
    sampler = RandomSampler(train_set, replacement=len(train_set) < 2, num_samples=max(2, len(train_set)))
    batch_size = min(cfg.batch_size, max(2, len(train_set)))
    drop_last = len(train_set) > batch_size and len(train_set) % batch_size == 1
    select = selection in (BEST_VAL, BEST_TRAIN)
    best_loss, best_state, best_epoch = math.inf, None, 0
    rows: list[dict[str, Any]] = []
    step = epoch_index = 0
    bar = tqdm(total=epochs, desc=f"{stage}: {built.spec}", unit="epoch", leave=False, disable=not cfg.progress)
    for index, (phase, n_epochs) in enumerate(zip(phases, split_epochs(phases, epochs), strict=True)):
        last_phase = index == len(phases) - 1
        params = set_trainable(model, phase.frozen)
        optimiser = torch.optim.Adam(params, lr=cfg.optim.lr * phase.lr_scale, weight_decay=cfg.optim.weight_decay)
        if cfg.workers > 0:
            prepare_worker_sockets()
        loader = DataLoader(
            train_set, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=cfg.workers
        )
        # Prepared per phase so that a distributed wrapper sees this phase's trainable parameters.
        wrapped, optimiser, loader = accelerator.prepare(model, optimiser, loader)
        steps_per_epoch = max(1, len(loader))
        scheduler: Any
        if cfg.optim.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=n_epochs * steps_per_epoch)
        else:
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimiser, factor=cfg.optim.plateau_factor, patience=cfg.optim.plateau_patience
            )
        stale = 0
        for _ in range(n_epochs):
            # --- train one epoch
            wrapped.train()
            hold_frozen_norms(model, phase.frozen)
            totals = {"task": 0.0, "kl": 0.0}
            seen = 0
            for batch in loader:
                logits = wrapped(batch["image"])
                task_loss = loss_fn(logits.float(), batch["target"])
                # The strategy's term (if any) is logged as "kl", the name the log format has always used.
                reg = strategy.regulariser(model, loss_values)
                kl = reg if reg is not None else torch.zeros((), device=task_loss.device)
                loss = task_loss + kl
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(step, {"task": task_loss.item(), "kl": kl.item()})
                optimiser.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                if cfg.optim.grad_clip > 0:
                    accelerator.clip_grad_norm_(params, cfg.optim.grad_clip)
                optimiser.step()
                if cfg.optim.scheduler == "cosine":
                    scheduler.step()
                step += 1
                n = batch["image"].shape[0]
                totals["task"] += task_loss.item() * n
                totals["kl"] += kl.item() * n
                seen += n
            train_loss = totals["task"] / max(seen, 1)
            # --- validate: pick the best epoch, lower the rate, stop early
            if val_set is not None and len(val_set):
                monitored = evaluate(model, val_set, task, loss_fn, accelerator.device, batch_size)["loss"]
            else:
                monitored = train_loss
            if cfg.optim.scheduler == "plateau":
                scheduler.step(monitored)
            epoch_index += 1
            row = {
                "stage": stage,
                "phase": phase.name,
                "epoch": epoch_index,
                "step": step,
                "train_loss": train_loss,
                "kl": totals["kl"] / max(seen, 1),
                "val_loss" if val_set is not None and len(val_set) else "train_loss_monitored": monitored,
                "lr": optimiser.param_groups[0]["lr"],
            }
            rows.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{monitored:.3f}")
            if not select:
                best_loss, best_epoch = monitored, epoch_index  # the last epoch is kept as it stands
                continue
            if monitored < best_loss:
                best_loss, stale = monitored, 0
                if last_phase:
                    best_epoch = epoch_index
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
            if cfg.optim.early_stop and cfg.optim.scheduler == "plateau" and stale >= cfg.optim.early_stop:
                break
        # The last phase's epochs compete among themselves, not with a (lower) loss of an earlier phase.
        best_loss, stale = math.inf, 0
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    for param in model.parameters():
        param.requires_grad_(True)
    return FitResult(epoch_index, step, best_epoch, best_loss if select else math.nan, rows, selection)


def split_for_selection(labeled: list[Case], cfg: FinetuneConfig, seed: int) -> tuple[list[Case], list[Case], str]:
    """(train, val, rule): below `cfg.fixed_schedule_below` cases all train under a fixed schedule; from it on,
    a validation split (`split_val`) picks the epoch."""
    if len(labeled) < cfg.fixed_schedule_below:
        return list(labeled), [], fixed_schedule(cfg.fixed_schedule_below)
    train, val = split_val(labeled, cfg.val_fraction, seed)
    return train, val, BEST_VAL if val else BEST_TRAIN


def split_val(labeled: list[Case], fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Hold out about `fraction` of the labeled cases, whole patients where there are several, for model
    selection; fewer than three labeled cases keep all for training (the training loss then decides)."""
    if fraction <= 0 or len(labeled) < 3:
        return list(labeled), []
    rng = np.random.default_rng(seed)
    patients = sorted({c.patient for c in labeled})
    target = max(1, round(fraction * len(labeled)))
    val_ids: set[str] = set()
    if len(patients) >= 2:
        chosen: set[str] = set()
        for index in rng.permutation(len(patients)):
            if len(val_ids) >= target or len(chosen) == len(patients) - 1:
                break
            chosen.add(patients[index])
            val_ids.update(c.id for c in labeled if c.patient == patients[index])
    else:
        val_ids = {labeled[i].id for i in rng.permutation(len(labeled))[:target]}
    train = [c for c in labeled if c.id not in val_ids]
    val = [c for c in labeled if c.id in val_ids]
    return train, val


def train_and_evaluate(
    cfg: FinetuneConfig,
    cohort: Cohort,
    labeled: list[Case],
    test: list[Case],
    *,
    out_dir: str | Path | None = None,
    accelerator: Accelerator | None = None,
) -> dict[str, Any]:
    """Build the model (strategy), optionally train on the weak-label cohort, finetune on `labeled`
    (minus a validation split), and measure it on `test`. Returns metrics, counts and timings."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from radpretrain.data.cohorts import load_cohort
    from radpretrain.data.dataset import CohortDataset

    started = time.perf_counter()
    accelerator = accelerator or Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision)
    set_seed(cfg.seed)
    task = task_of(cohort)
    built = build_model(cfg, cohort, accelerator.device)
    built.model.to(accelerator.device)
    phases = built.strategy.phases(built.ctx)
    voxels = cfg.size ** int(cohort.spatial_dims) if task == "seg" else 1
    fits: list[FitResult] = []

    # --- weak-label stage: everything trains on the weak cohort first
    n_weak = 0
    if built.spec.weak != "none":
        if cfg.weak.cohort is None:
            raise ConfigError(f"strategy '{built.spec}' trains on a weak-label cohort first; set weak.cohort")
        weak = load_cohort(
            cfg.weak.cohort, kind=cfg.weak.kind, label_column=cfg.label_column, structure=cfg.weak.structure
        )
        if weak.kind != cohort.kind or outputs_of(weak) != outputs_of(cohort):
            raise CohortError(
                f"weak-label cohort is '{weak.kind}' with {outputs_of(weak)} output(s) but the cohort is "
                f"'{cohort.kind}' with {outputs_of(cohort)}; they must be the same task"
            )
        weak_cases = [c for c in weak.cases if c.target is not None]
        weak_train, weak_val, weak_rule = split_for_selection(weak_cases, cfg, cfg.seed)
        n_weak = len(weak_cases)
        fits.append(
            fit(
                built,
                CohortDataset(weak, weak_train, cfg.size, augment=cfg.augment),
                CohortDataset(weak, weak_val, cfg.size, augment=False) if weak_val else None,
                task=task,
                cfg=cfg,
                epochs=cfg.weak.epochs,
                accelerator=accelerator,
                loss_values=len(weak_train) * voxels,
                phases=[Phase("weak", 1.0)],
                stage="weak",
                selection=weak_rule,
            )
        )

    # --- the labeled subset
    train_cases, val_cases, rule = split_for_selection(labeled, cfg, cfg.seed)
    if built.spec.weak != "only":
        if not train_cases:
            raise CohortError("no labeled cases to train on; raise n_train")
        fits.append(
            fit(
                built,
                CohortDataset(cohort, train_cases, cfg.size, augment=cfg.augment),
                CohortDataset(cohort, val_cases, cfg.size, augment=False) if val_cases else None,
                task=task,
                cfg=cfg,
                epochs=cfg.epochs,
                accelerator=accelerator,
                loss_values=len(train_cases) * voxels,
                phases=phases,
                stage="finetune",
                selection=rule,
            )
        )
    trained = time.perf_counter()

    # --- test: the scores, and per case what a patient-level bootstrap or DeLong's test needs
    metrics: dict[str, float] = {}
    per_case: dict[str, Any] = {}
    if test:
        test_set = CohortDataset(cohort, test, cfg.size, augment=False)
        logits, target, valid, loss = predict(
            built.model, test_set, make_loss(task, cfg), accelerator.device, cfg.batch_size
        )
        # Non-finite scores (HD95 of an empty prediction) pass through as they are: the report counts them.
        metrics = {"loss": loss, **task_metrics(task, logits, target, valid)}
        per_case = {"patients": patient_indices(test), **per_case_outputs(task, logits, target, valid)}
    finished = time.perf_counter()
    result = {
        "strategy": str(built.spec),
        "encoder": cfg.encoder if cfg.model is None else f"model:{cfg.model}",
        "kind": cohort.kind,
        "spatial_dims": int(cohort.spatial_dims),
        "metrics": metrics,
        "selection": fits[-1].selection,
        "n_train": len(train_cases) if built.spec.weak != "only" else 0,
        "n_val": len(val_cases) if built.spec.weak != "only" else 0,
        "n_test": len(test),
        "n_weak": n_weak,
        "epochs": [f.epochs for f in fits],
        "best_epoch": [f.best_epoch for f in fits],
        "steps": sum(f.steps for f in fits),
        "seconds": {"train": round(trained - started, 3), "test": round(finished - trained, 3)},
        "seed": cfg.seed,
        "test_set": cases_digest(test),
        "per_case": per_case,
    }
    if out_dir is not None and accelerator.is_main_process:
        write_run(Path(out_dir), cfg, built, result, [row for f in fits for row in f.log])
    # A sweep reuses one Accelerator: drop its references to this run's model, optimisers and loaders.
    accelerator.free_memory()
    return result


def patient_indices(cases: list[Case]) -> list[int]:
    """Each case's patient as a small integer (patients numbered in order of first appearance): the groups a
    patient-level bootstrap resamples, without repeating pseudonyms in every results line."""
    numbers: dict[str, int] = {}
    return [numbers.setdefault(c.patient, len(numbers)) for c in cases]


def cases_digest(cases: list[Case]) -> str:
    """A short digest of the test cases' ids in order: runs compared case by case must share it."""
    import hashlib

    return hashlib.sha256("\n".join(c.id for c in cases).encode()).hexdigest()[:16]


def write_run(out: Path, cfg: FinetuneConfig, built: Built, result: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """config.yaml, log.jsonl, metrics.json and, with save_model, model.safetensors and the 2D encoder/."""
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    write_text(out / "log.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    if not cfg.save_model:
        return
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in built.model.state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"strategy": str(built.spec)})
    encoder = getattr(built.model, "encoder", None)
    if encoder is not None and hasattr(encoder, "radpretrain_build") and result["spatial_dims"] == 2:
        from radpretrain.models.encoders import save_encoder

        card = {
            "finetuned": {
                "strategy": str(built.spec),
                "kind": result["kind"],
                "n_train": result["n_train"],
                "steps": result["steps"],
            },
            "source_encoder": (built.card or {}).get("timm_name"),
            "input_size": cfg.size,
        }
        save_encoder(built.strategy.exportable(encoder), out / "encoder", card)
