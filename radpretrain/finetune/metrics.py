"""The finetune loss and the scores of a finished model: Dice, IoU, HD95 for masks; AUROC, accuracies for classes."""

from __future__ import annotations

import math
import warnings
from typing import Any, cast

import torch
from torch import nn

from radpretrain.finetune.config import FinetuneConfig


def make_loss(task: str, cfg: FinetuneConfig) -> nn.Module:
    """Dice + BCE (MONAI DiceCELoss: BCE for one sigmoid channel) for segmentation, cross-entropy otherwise."""
    if task == "seg":
        from monai.losses import DiceCELoss

        return DiceCELoss(sigmoid=True, lambda_dice=cfg.loss.dice_weight, lambda_ce=cfg.loss.bce_weight)
    return nn.CrossEntropyLoss()


@torch.no_grad()
def predict(
    model: nn.Module, dataset: Any, loss_fn: nn.Module, device: torch.device, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """(logits, targets, valid regions or None, mean loss) over a dataset, in its order, on the CPU. `valid` is
    the items' unpadded region (a letterboxed case) when they carry one."""
    from torch.utils.data import DataLoader

    model.eval()
    losses: list[float] = []
    preds: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    valids: list[torch.Tensor] = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        image, target = batch["image"].to(device), batch["target"].to(device)
        logits = model(image).float()
        losses.append(float(loss_fn(logits, target)) * image.shape[0])
        preds.append(logits.cpu())
        targets.append(target.cpu())
        if "valid" in batch:
            valids.append(batch["valid"])
    valid = torch.cat(valids) if valids else None
    return torch.cat(preds), torch.cat(targets), valid, sum(losses) / len(dataset)


def task_metrics(
    task: str, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> dict[str, float]:
    return segmentation_metrics(logits, target, valid) if task == "seg" else classification_metrics(logits, target)


def evaluate(
    model: nn.Module, dataset: Any, task: str, loss_fn: nn.Module, device: torch.device, batch_size: int
) -> dict[str, float]:
    """Metrics over a dataset: Dice, IoU, HD95 (MONAI; pixels/voxels) or AUROC (MONAI), accuracy and
    balanced accuracy (scikit-learn); plus the mean loss. Masks are scored on the items' "valid" region
    (the unpadded image of a letterboxed case) when they carry one."""
    logits, target, valid, loss = predict(model, dataset, loss_fn, device, batch_size)
    return {"loss": loss, **task_metrics(task, logits, target, valid)}


def _compact(values: Any) -> Any:
    """Floats to 6 significant digits (a results line per cell stays small); NaN and inf stay as they are."""
    if isinstance(values, list):
        return [_compact(v) for v in values]
    value = float(values)
    return float(f"{value:.6g}") if math.isfinite(value) else value


def per_case_outputs(
    task: str, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> dict[str, list[Any]]:
    """What a test-set bootstrap or DeLong's test recomputes the scores from, case by case in test order.

    Segmentation: each case's Dice, IoU and HD95 (`segmentation_metrics` of that case alone; the mean over
    cases is the run's score). Classification: each case's label and logits (one list per case).
    """
    if task == "seg":
        cases = [
            segmentation_metrics(logits[i : i + 1], target[i : i + 1], None if valid is None else valid[i : i + 1])
            for i in range(logits.shape[0])
        ]
        return {name: _compact([case[name] for case in cases]) for name in (cases[0] if cases else {})}
    return {"labels": [int(v) for v in target.long().flatten()], "logits": _compact(logits.tolist())}


def segmentation_metrics(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> dict[str, float]:
    """Mean Dice, IoU and HD95 (pixels/voxels) over the cases, on each case's `valid` region (default: all).

    Padding outside `valid` is scored as background in neither prediction nor truth, so it changes no
    metric. Dice and IoU of an empty mask predicted empty are 1; HD95 of such a case is 0 (perfect
    agreement). HD95 is undefined when exactly one of the two is empty (no surface to measure from), most
    often an empty prediction: such a case fails. `hd95_failed` counts the failed cases and `hd95` is NaN
    when any case failed, so a run that predicts nothing for some cases never gets a better HD95 than one
    that tries: the report counts the run as failed ("failed 2 of 6") instead of averaging over the rest.

    Args:
        logits: (N, 1, ...) mask logits.
        target: (N, 1, ...) truth in {0, 1}.
        valid: (N, 1, ...) bool, True where the image is (not letterbox padding); None scores everything.

    Returns:
        {"dice", "iou", "hd95", "hd95_failed"} (the last a count of cases, as a float).
    """
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU

    pred = (logits.sigmoid() > 0.5).float()
    truth = (target > 0.5).float()
    if valid is not None:
        if valid.shape != pred.shape:
            raise ValueError(f"valid has shape {tuple(valid.shape)} but the masks have {tuple(pred.shape)}")
        inside = valid.to(pred.device).bool()
        pred, truth = pred * inside, truth * inside
    dice = cast(torch.Tensor, DiceMetric(include_background=True, reduction="none", ignore_empty=False)(pred, truth))
    iou = cast(torch.Tensor, MeanIoU(include_background=True, reduction="none", ignore_empty=False)(pred, truth))
    with warnings.catch_warnings():
        # An empty prediction or mask has no surface: MONAI warns and gives NaN/inf for that case.
        warnings.simplefilter("ignore")
        hd = cast(
            torch.Tensor, HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(pred, truth)
        )
    hd = hd.flatten().clone()
    spatial = tuple(range(1, pred.ndim))
    both_empty = (pred.sum(dim=spatial) == 0) & (truth.sum(dim=spatial) == 0)
    hd[both_empty.flatten().to(hd.device)] = 0.0
    failed = int((~torch.isfinite(hd)).sum())
    return {
        "dice": float(dice.mean()),
        "iou": float(iou.mean()),
        "hd95": math.nan if failed else float(hd.mean()),
        "hd95_failed": float(failed),
    }


def classification_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """AUROC (macro over classes; NaN when the cases hold one class only), accuracy, balanced accuracy."""
    from monai.metrics import ROCAUCMetric
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    probs = logits.softmax(dim=1)
    labels = target.long().flatten()
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).float()
    metric = ROCAUCMetric(average="macro")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if probs.shape[1] == 2:
            metric(probs[:, 1:], onehot[:, 1:])
        else:
            metric(probs, onehot)
        auroc = float(cast(float, metric.aggregate()))
    predicted = probs.argmax(dim=1).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns when a class is absent from the cases
        balanced = float(balanced_accuracy_score(labels.numpy(), predicted))
    return {"auroc": auroc, "accuracy": float(accuracy_score(labels.numpy(), predicted)), "balanced_accuracy": balanced}
