"""The downstream probe: a labeled cohort's frozen features scored by kNN and logistic regression, by patient folds."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from radpretrain.errors import CohortError, ConfigError
from radpretrain.pretrain.monitor import collect_features, knn_classifier, linear_classifier

if TYPE_CHECKING:
    from accelerate import Accelerator

#: The label name of the cohort probe in score keys ("<classifier>_<metric>/cohort") and in summary.json.
COHORT = "cohort"
CLASSIFIERS = ("knn", "linear")
METRICS = ("auroc", "balanced_accuracy")


class CohortProbe:
    """A labeled classification cohort, loaded once before training, that scores the frozen encoder at each probe.

    The cohort is any classification cohort `radpretrain finetune` accepts (`data.cohorts.load_cohort`: a CSV
    with image and label columns, or one folder of images per class). Its images become encoder inputs as in
    finetuning (`data.dataset.CohortDataset`, no augmentation) at the run's input size. Each process encodes its
    share of the cases; the features are gathered and every process computes the same scores.

    Args:
        path: The cohort folder or CSV file.
        image_size: The encoder's input side (data.image_size).
        folds: Patient-level cross-validation folds (fewer when the cohort has fewer patients).
        k: kNN neighbours.
        batch_size: Images per encoder pass.
        rank, world: This process's index and the number of processes.
    """

    def __init__(
        self,
        path: str | Path,
        image_size: int,
        *,
        folds: int = 5,
        k: int = 20,
        batch_size: int = 64,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        from radpretrain.data.cohorts import load_cohort
        from radpretrain.data.dataset import CohortDataset

        self.name = Path(path).name
        try:
            cohort = load_cohort(path)
        except CohortError as exc:
            raise ConfigError(f"probe.cohort={path}: {exc}") from None
        if cohort.kind != "cls2d":
            raise ConfigError(
                f"probe.cohort={path} holds a '{cohort.kind}' cohort; the probe needs 2D classification labels "
                "(a CSV with image and label columns, or one folder of images per class)"
            )
        labeled = [case for case in cohort.cases if isinstance(case.target, int)]
        if any(isinstance(case.target, float) for case in cohort.cases):
            raise ConfigError(f"probe.cohort={path} holds numeric (regression) labels; the probe needs class labels")
        self.cases = labeled
        self.classes = len({case.target for case in labeled})
        self.patients = len({case.patient for case in labeled})
        if self.classes < 2:
            raise ConfigError(f"probe.cohort={path} has {self.classes} class; the probe needs two or more")
        if self.patients < 2:
            raise ConfigError(
                f"probe.cohort={path} has one patient; patient-level cross-validation needs two or more "
                "(give a patient column in the CSV)"
            )
        self.folds = min(folds, self.patients)
        self.k = k
        self.batch_size = batch_size
        self.world = world
        self.indices = list(range(rank, len(labeled), world))  # this process's share of the cases
        mine = [labeled[i] for i in self.indices]
        self.dataset = CohortDataset(cohort, mine, size=image_size, augment=False) if mine else None

    def score(self, accelerator: Accelerator, encoder: nn.Module) -> dict[str, float]:
        """{"knn_auroc/cohort", "knn_balanced_accuracy/cohort", "linear_...": score, "cohort_cases": n, ...}.

        Every process must call this.
        """
        from torch.utils.data import DataLoader

        width = int(getattr(encoder, "num_features", 0))
        features, labels = np.zeros((0, width), np.float32), np.zeros(0, np.int64)
        if self.dataset is not None:
            loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=0)
            features, by_name = collect_features(
                encoder,
                loader,
                image_key="image",
                labels=["target"],
                limit=len(self.dataset),
                device=accelerator.device,
            )
            labels = by_name["target"]
        local = (np.asarray(self.indices, np.int64), features, labels)
        if self.world > 1:
            from accelerate.utils import gather_object

            parts = gather_object([local])
        else:
            parts = [local]
        order = np.concatenate([p[0] for p in parts])
        position = np.argsort(order)
        x = np.concatenate([p[1] for p in parts if len(p[1])])[position]
        y = np.concatenate([p[2] for p in parts])[position]
        groups = np.asarray([self.cases[i].patient for i in order[position]])
        scores = cross_validate(x, y, groups, k=self.k, folds=self.folds)
        scores.update(
            {
                "cohort_cases": len(y),
                "cohort_patients": self.patients,
                "cohort_classes": self.classes,
                "cohort_folds": self.folds,
            }
        )
        return scores


def cross_validate(x: np.ndarray, y: np.ndarray, groups: np.ndarray, *, k: int, folds: int) -> dict[str, float]:
    """AUROC and balanced accuracy of the probes' kNN and logistic regression, by patient-level folds.

    Every case is predicted once, by the models fitted on the folds that do not hold its patient (sklearn
    GroupKFold); the metrics are computed on these out-of-fold predictions of the whole cohort (AUROC macro
    one-vs-rest for more than two classes). Chance is 0.5 AUROC and 1/classes balanced accuracy.
    """
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.model_selection import GroupKFold

    classes = np.unique(y)
    splits = min(folds, len(np.unique(groups)))
    if len(classes) < 2 or splits < 2:
        raise ValueError(f"cross-validation needs two classes and two patients, got {len(classes)} and {splits}")
    predicted = {name: np.zeros((len(y), len(classes))) for name in CLASSIFIERS}
    for train, test in GroupKFold(n_splits=splits).split(x, y, groups):
        for name in CLASSIFIERS:
            predicted[name][test] = fold_probabilities(name, x[train], y[train], x[test], classes, k=k)
    scores: dict[str, float] = {}
    for name, proba in predicted.items():
        scores[f"{name}_auroc/{COHORT}"] = float(
            roc_auc_score(y == classes[1], proba[:, 1])
            if len(classes) == 2
            else roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=classes)
        )
        scores[f"{name}_balanced_accuracy/{COHORT}"] = float(balanced_accuracy_score(y, classes[proba.argmax(1)]))
    return scores


def fold_probabilities(
    name: str, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, classes: np.ndarray, *, k: int
) -> np.ndarray:
    """(N_test, len(classes)) class probabilities from the probe `name` fitted on one fold's training part."""
    proba = np.zeros((len(test_x), len(classes)))
    seen = np.unique(train_y)
    if len(seen) < 2:  # a fold whose patients all share one class: nothing to fit, that class is the answer
        proba[:, np.searchsorted(classes, seen[0])] = 1.0
        return proba
    model: Any = knn_classifier(k, len(train_x)) if name == "knn" else linear_classifier()
    model.fit(train_x, train_y)
    proba[:, np.searchsorted(classes, model.classes_)] = model.predict_proba(test_x)
    return proba


def is_cohort_score(key: str) -> bool:
    """Whether a probe score key belongs to the cohort probe."""
    return key.endswith(f"/{COHORT}")
