"""Few-label sweeps: one fixed patient-level test set, k labeled subsets per label count, a results.jsonl line per cell.

A sweep is label counts x repeats x strategies x encoders. Repeat r of label count n draws one
patient-level subset from the pool (the cohort minus the test set) and every strategy and encoder trains
on that same subset with the same seed, so differences between strategies are paired. A single
`finetune` run is the one-cell case of the same machinery.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from radpretrain.config import save_config, to_dict
from radpretrain.errors import CohortError, ConfigError
from radpretrain.files import changed_settings, flatten, write_text
from radpretrain.finetune.config import FinetuneConfig, SweepConfig

if TYPE_CHECKING:
    from radpretrain.data.cohorts import Case, Cohort
    from radpretrain.finetune.report import ReportFiles

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
#: An `encoders` entry `model:NAME` runs the from-scratch baseline NAME (`models.baselines3d.MODELS`).
MODEL_PREFIX = "model:"


# --------------------------------------------------------------------------------------------------------------
# Patient-level splits.
# --------------------------------------------------------------------------------------------------------------


def _patients(cases: Sequence[Case]) -> list[str]:
    return sorted({c.patient for c in cases})


def split_test(
    cases: Sequence[Case], *, count: int | None = None, fraction: float = 0.3, seed: int = 0
) -> tuple[list[Case], list[Case]]:
    """(pool, test): whole patients drawn (seeded) into the test set until it holds `count` cases (or
    `fraction` of them, at least one); no patient is in both."""
    if not cases:
        raise CohortError("the cohort has no cases")
    target = count if count is not None else max(1, round(fraction * len(cases)))
    patients = _patients(cases)
    if len(patients) < 2 or target >= len(cases):
        raise CohortError(
            f"a test set of {target} case(s) leaves nothing to train on: the cohort has {len(cases)} case(s) "
            f"from {len(patients)} patient(s); lower test_count/test_fraction or add cases"
        )
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    held = 0
    for index in rng.permutation(len(patients)):
        if held >= target or len(chosen) == len(patients) - 1:
            break
        chosen.add(patients[index])
        held += sum(1 for c in cases if c.patient == patients[index])
    pool = [c for c in cases if c.patient not in chosen]
    test = [c for c in cases if c.patient in chosen]
    return pool, test


def draw_labeled(pool: Sequence[Case], n: int, *, seed: int) -> list[Case]:
    """n cases from the pool, patient by patient in a seeded order (the last patient may be cut short)."""
    if n > len(pool):
        raise CohortError(
            f"label count {n} is larger than the pool of {len(pool)} case(s) outside the test set; "
            "lower the label count, the test set, or use a bigger cohort"
        )
    rng = np.random.default_rng(seed)
    patients = _patients(pool)
    drawn: list[Case] = []
    for index in rng.permutation(len(patients)):
        mine = [c for c in pool if c.patient == patients[index]]
        drawn.extend(mine[i] for i in rng.permutation(len(mine)))
        if len(drawn) >= n:
            break
    return drawn[:n]


def subset_seed(seed: int, n: int, repeat: int) -> int:
    """One seed per (label count, repeat): the subset and the training seed every arm of a pair shares."""
    return int(np.random.SeedSequence([seed, n, repeat]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------------------------
# One run.
# --------------------------------------------------------------------------------------------------------------


def load_cohort_of(cfg: FinetuneConfig) -> Cohort:
    from radpretrain.data.cohorts import load_cohort

    if cfg.cohort is None:
        raise ConfigError("no cohort given; set cohort=<folder or CSV of labeled cases>")
    return load_cohort(cfg.cohort, kind=cfg.kind, label_column=cfg.label_column, structure=cfg.structure)


def labeled_cases(cohort: Cohort) -> list[Case]:
    """The cases with a label (a cohort table may list unlabeled rows)."""
    cases = [c for c in cohort.cases if c.target is not None]
    if not cases:
        raise CohortError("the cohort has no labeled cases")
    return cases


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """A single finetune: patient-level test split (cfg.test_fraction), n_train labeled cases, train, test."""
    from radpretrain.finetune.loop import train_and_evaluate

    cohort = load_cohort_of(cfg)
    if cfg.test_fraction > 0:
        pool, test = split_test(labeled_cases(cohort), fraction=cfg.test_fraction, seed=cfg.seed)
    else:
        pool, test = labeled_cases(cohort), []
    labeled = draw_labeled(pool, cfg.n_train or len(pool), seed=cfg.seed)
    return train_and_evaluate(cfg, cohort, labeled, test, out_dir=cfg.out)


# --------------------------------------------------------------------------------------------------------------
# The grid.
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    encoder: str
    strategy: str
    n_labels: int
    repeat: int

    @property
    def id(self) -> str:
        return f"{self.encoder}|{self.strategy}|n{self.n_labels}|r{self.repeat}"

    @property
    def label(self) -> str:
        """The encoder as results and reports name it: NAME of `NAME=PATH`, else the setting as given."""
        from radpretrain.finetune.build import parse_encoder

        return parse_encoder(self.encoder).label

    @property
    def folder(self) -> str:
        label = re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{Path(self.label).name}_{self.strategy}")
        return f"{label}_n{self.n_labels}_r{self.repeat}"


def cells_of(cfg: SweepConfig) -> list[Cell]:
    """Label count outermost so that partial results already give whole learning-curve points."""
    encoders = cfg.encoders or [cfg.finetune.encoder]
    return [
        Cell(encoder, strategy, n, repeat)
        for n in cfg.label_counts
        for repeat in range(cfg.repeats)
        for encoder in encoders
        for strategy in cfg.strategies
    ]


def finished_cells(results: Path) -> set[str]:
    """Ids of the cells with a result line. A torn line (a sweep killed mid-write) is dropped from the file,
    atomically, so that its cell runs again and the next line starts clean."""
    done: set[str] = set()
    if not results.is_file():
        return done
    text = results.read_text()
    kept = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        kept.append(line)
        if row.get("status") == "ok":
            done.add(row["cell"])
    repaired = "".join(line + "\n" for line in kept)
    if repaired != text:
        log.warning("sweep: dropped %d torn line(s) from %s", len(text.splitlines()) - len(kept), results.name)
        write_text(results, repaired)
    return done


def check_cells(cfg: SweepConfig, cohort: Cohort, pool: list[Case]) -> None:
    """Refuse a grid that cannot run before any cell runs: label counts, strategy specs, encoders."""
    from radpretrain.finetune.build import is_encoder_folder, parse_encoder
    from radpretrain.finetune.strategies import STRATEGIES, parse_spec

    too_many = [n for n in cfg.label_counts if n > len(pool)]
    if too_many:
        raise CohortError(
            f"label count(s) {too_many} exceed the pool of {len(pool)} case(s) outside the fixed test set "
            f"({len(cohort.cases)} cases in the cohort); lower label_counts or test_count/test_fraction"
        )
    for spec in cfg.strategies:
        parsed = parse_spec(spec)
        strategy_type = STRATEGIES.get(parsed.name)
        strategy_type(parsed.arg)  # argument errors now, not in cell 37
        if parsed.weak != "none" and cfg.finetune.weak.cohort is None:
            raise ConfigError(f"strategy '{spec}' trains on a weak-label cohort first; set finetune.weak.cohort")
        for encoder in cfg.encoders or [cfg.finetune.encoder]:
            weights = parse_encoder(encoder).source
            baseline = encoder.startswith(MODEL_PREFIX) or cfg.finetune.model is not None
            if baseline and strategy_type.needs_pretrained:
                raise ConfigError(
                    f"strategy '{spec}' transfers pretrained weights but '{encoder}' is a from-scratch model; "
                    "pair from-scratch models with random (or weak+random / weak-only) only, in a separate sweep"
                )
            if strategy_type.needs_pretrained and not is_encoder_folder(weights):
                raise ConfigError(
                    f"strategy '{spec}' transfers pretrained weights but encoder '{encoder}' is not an exported "
                    "encoder folder; give a folder written by `radpretrain export` or drop the strategy"
                )
            if is_encoder_folder(weights) and not Path(weights).exists():
                raise ConfigError(f"encoder folder {weights} does not exist")
    _check_names(cfg)


def _check_names(cfg: SweepConfig) -> None:
    """Unknown encoder and model names fail now, not when their first cell runs."""
    from radpretrain.finetune.build import is_encoder_folder, parse_encoder
    from radpretrain.models.baselines3d import MODELS
    from radpretrain.models.encoders import check_encoder_name

    if cfg.finetune.model is not None:
        MODELS.get(cfg.finetune.model)
    shown: dict[str, str] = {}
    for encoder in cfg.encoders or [cfg.finetune.encoder]:
        arm = parse_encoder(encoder)
        if encoder.startswith(MODEL_PREFIX):
            MODELS.get(encoder[len(MODEL_PREFIX) :])
        elif cfg.finetune.model is None and not is_encoder_folder(arm.source):
            check_encoder_name(arm.source)
        # Reports label an arm by the last part of its encoder's name; two arms must not share one.
        name = Path(arm.label).name
        if name in shown and shown[name] != encoder:
            raise ConfigError(
                f"encoders '{shown[name]}' and '{encoder}' would both be reported as '{name}'; name the arms, "
                f"e.g. a={shown[name]} b={arm.source}"
            )
        shown[name] = encoder


#: Settings that may change between runs of one sweep folder (how it runs, not what it measures); the
#: grid axes (label_counts, repeats, strategies, encoders) may grow too.
FREE_SETTINGS = ("progress", "workers", "cpu", "save_model", "mixed_precision")


def check_same_settings(saved: Path, cfg: SweepConfig) -> None:
    """Refuse to resume a sweep folder whose finished cells were made with other settings."""
    from radpretrain.config import read_yaml

    if not saved.is_file():
        return
    before = read_yaml(saved)
    now = to_dict(cfg)
    fixed_before: dict[str, Any] = {k: before[k] for k in ("seed", "test_count", "test_fraction") if k in before}
    fixed_before["finetune"] = {k: v for k, v in (before.get("finetune") or {}).items() if k not in FREE_SETTINGS}
    # Keys the saved file lacks (settings added to radpretrain since) are not changes.
    changed = changed_settings(fixed_before, now, keys=flatten(fixed_before))
    if changed:
        raise ConfigError(
            f"{saved.parent} holds results made with other settings ({'; '.join(changed)}); give a new out "
            "folder, or restore the settings to resume"
        )


def sweep_and_report(cfg: SweepConfig) -> tuple[Path, ReportFiles]:
    """`radpretrain sweep`: run every unfinished cell, then write the report of all results beside them."""
    from radpretrain.finetune.report import write_report

    results = run_sweep(cfg)
    return results, write_report(results)


def run_sweep(cfg: SweepConfig) -> Path:
    """Run every unfinished cell; returns the path of results.jsonl. Resumable: finished cells are skipped."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from radpretrain.finetune.loop import train_and_evaluate

    out = Path(cfg.out)
    cohort = load_cohort_of(cfg.finetune)
    pool, test = split_test(labeled_cases(cohort), count=cfg.test_count, fraction=cfg.test_fraction, seed=cfg.seed)
    check_cells(cfg, cohort, pool)
    results = out / RESULTS
    if results.is_file():
        check_same_settings(out / "sweep.yaml", cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "sweep.yaml")
    done = finished_cells(results)
    cells = cells_of(cfg)
    todo = [cell for cell in cells if cell.id not in done]
    log.info(
        "sweep: %d cells, %d finished, %d to run; test set %d cases",
        len(cells),
        len(cells) - len(todo),
        len(todo),
        len(test),
    )
    dwp = (
        cfg.finetune.dwp if cfg.finetune.dwp.cache is not None else replace(cfg.finetune.dwp, cache=out / "dwp-priors")
    )
    accelerator = Accelerator(cpu=cfg.finetune.cpu, mixed_precision=cfg.finetune.mixed_precision)
    bar = tqdm(todo, desc="sweep", unit="cell", disable=not cfg.finetune.progress)
    for cell in bar:
        bar.set_postfix_str(cell.id)
        seed = subset_seed(cfg.seed, cell.n_labels, cell.repeat)
        labeled = draw_labeled(pool, cell.n_labels, seed=seed)
        model = cell.encoder[len(MODEL_PREFIX) :] if cell.encoder.startswith(MODEL_PREFIX) else cfg.finetune.model
        cell_cfg = replace(
            cfg.finetune,
            encoder=cell.encoder,
            model=model,
            strategy=cell.strategy,
            n_train=cell.n_labels,
            seed=seed,
            dwp=dwp,
            out=out / "cells" / cell.folder,
            save_model=cfg.finetune.save_model and cfg.keep_cells,
        )
        started = time.perf_counter()
        result = train_and_evaluate(
            cell_cfg, cohort, labeled, test, out_dir=cell_cfg.out if cfg.keep_cells else None, accelerator=accelerator
        )
        row = {
            "cell": cell.id,
            "status": "ok",
            "encoder": cell.label,
            "strategy": cell.strategy,
            "n_labels": cell.n_labels,
            "repeat": cell.repeat,
            **{k: v for k, v in result.items() if k not in ("strategy", "encoder")},
            "wall_seconds": round(time.perf_counter() - started, 3),
            "config": _cell_config(cell_cfg),
        }
        if accelerator.is_main_process:
            with results.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
                handle.flush()
    bar.close()
    return results


def _cell_config(cfg: FinetuneConfig) -> dict[str, Any]:
    """The cell's resolved config, minus paths that say where, not what (the output folder)."""
    values = to_dict(cfg)
    values.pop("out", None)
    return values
