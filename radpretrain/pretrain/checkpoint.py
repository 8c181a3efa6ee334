"""Save and resume a run's whole state atomically, and export its encoder (safetensors + json card + README)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from radpretrain import __version__, files, intensity
from radpretrain.errors import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator

CHECKPOINT = "checkpoint"
STATE_FILE = "train_state.json"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
LOG_FILE = "log.jsonl"
MODEL_FILE = "model.safetensors"  # what accelerate's save_state writes for the first prepared model
ENCODER_PREFIX = "encoder."


@dataclass
class TrainState:
    """What a checkpoint adds to accelerate's state: the step counter and the data position of each process.

    `positions[rank]` is {"epoch": e, "batches": b, "readers": n}: process `rank` had consumed `b`
    micro-batches of its data epoch `e`, read by `n` readers (processes x loader workers); with the epoch's
    order fixed by (seed, epoch, rank) and the readers' shares by `n`, that pins every later batch.
    `skipped` counts the optimiser steps the fp16 gradient scaler skipped (not counted in `step`).
    """

    step: int = 0
    images: int = 0
    skipped: int = 0
    world_size: int = 1
    positions: list[dict[str, int]] | None = None


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    run_dir = Path(run_dir)
    # A crash between the two renames of `save_checkpoint` leaves only the previous one, under .old.
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        path = run_dir / name
        if (path / STATE_FILE).is_file():
            return path
    return None


def read_state(checkpoint: str | Path) -> TrainState:
    path = Path(checkpoint) / STATE_FILE
    try:
        data = json.loads(path.read_text())
        return TrainState(**data)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); the checkpoint is damaged, start a new run") from None


def save_checkpoint(accelerator: Accelerator, run_dir: str | Path, state: TrainState) -> Path:
    """Write model, optimiser, scaler and RNG states (accelerate) plus `state` as RUN/checkpoint, atomically.

    Every process must call this (each saves its own RNG state). The new checkpoint is written beside the
    old one as a temp folder (`files.atomic_path`) and swapped in by renames, so a kill at any moment
    leaves one complete checkpoint.
    """
    run_dir = Path(run_dir)
    final, old = run_dir / CHECKPOINT, run_dir / (CHECKPOINT + ".old")
    main = accelerator.is_main_process
    with files.atomic_path(final) if main else contextlib.nullcontext(None) as mine:
        partial = _from_main(accelerator, mine)  # every process writes into the main process's temp folder
        if main:
            remove_partial(run_dir)  # what a killed save left: never used
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if main:
            (partial / STATE_FILE).write_text(json.dumps(asdict(state), indent=1) + "\n")
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.replace(final, old)
        # leaving the block renames the temp folder to `final`
    if main:
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def remove_partial(run_dir: Path) -> None:
    """Remove the temp folders of checkpoint saves that were killed (any host or process)."""
    for path in run_dir.glob(f".{CHECKPOINT}{files.TMP_MARK}*"):
        if files.is_temp(path) and files.target_of_temp(path) == CHECKPOINT:
            shutil.rmtree(path, ignore_errors=True)


def _from_main(accelerator: Accelerator, path: Path | None) -> Path:
    """The main process's `path` on every process (temp names differ by host and process id)."""
    if accelerator.num_processes == 1:
        assert path is not None
        return path
    from accelerate.utils import broadcast_object_list

    shared = broadcast_object_list([str(path) if path is not None else None], from_process=0)
    return Path(shared[0])


def load_checkpoint(accelerator: Accelerator, checkpoint: str | Path) -> TrainState:
    """Restore what `save_checkpoint` wrote into the prepared objects; returns the step counter and positions.

    accelerate reads the optimiser and RNG files with torch.load(weights_only=True) and the model from
    safetensors, so nothing in a checkpoint can run code.
    """
    state = read_state(checkpoint)
    accelerator.load_state(str(checkpoint))
    return state


def read_encoder_weights(checkpoint: str | Path) -> dict[str, Any]:
    """The encoder's tensors (timm keys) from a checkpoint's safetensors file."""
    from safetensors.torch import load_file

    path = Path(checkpoint) / MODEL_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing; the checkpoint is incomplete, resume the run to write a new one")
    tensors = load_file(str(path))
    encoder = {key[len(ENCODER_PREFIX) :]: value for key, value in tensors.items() if key.startswith(ENCODER_PREFIX)}
    if not encoder:
        raise ConfigError(f"{path} holds no encoder weights; it was not written by radpretrain pretrain")
    return encoder


def export_encoder(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write RUN's encoder as OUT/encoder.safetensors + OUT/encoder.json + a model card OUT/README.md."""
    from radpretrain.config import load_config
    from radpretrain.models.encoders import build_encoder, save_encoder
    from radpretrain.pretrain.config import PretrainConfig

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    checkpoint = find_checkpoint(run_dir)
    if checkpoint is None:
        raise ConfigError(f"{run_dir} holds no checkpoint; give the `out` folder of a `radpretrain pretrain` run")
    if out_dir.resolve() == run_dir.resolve() or run_dir.resolve() in out_dir.resolve().parents:
        raise ConfigError("export OUT must be a folder outside the run folder (e.g. encoders/<name>)")
    config = load_config(PretrainConfig, run_dir / CONFIG_FILE)
    state = read_state(checkpoint)
    summary = _read_json(run_dir / SUMMARY_FILE)
    encoder = build_encoder(config.encoder.name, img_size=config.data.image_size, **config.encoder.options)
    try:
        encoder.load_state_dict(read_encoder_weights(checkpoint), strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"the checkpoint does not fit encoder '{config.encoder.name}' ({exc})") from None
    probes = summary.get("probe") or {}
    card = {
        "input_size": [1, config.data.image_size, config.data.image_size],
        "pretext_tasks": dict(config.tasks),
        "task_options": dict(config.task_options),
        # the file or folder name only: a full path names the user's machine
        "init": Path(config.encoder.init).name if config.encoder.init is not None else None,
        "steps": state.step,
        "images_seen": state.images,
        "seed": config.seed,
        "data": summary.get("data", {}),
        "probes": probes,
        "probe_labels": summary.get("probe_labels") or {},
        "probe_note": summary.get("probe_note"),
        "radpretrain_version": __version__,
    }
    save_encoder(encoder, out_dir, card)
    (out_dir / "README.md").write_text(model_card(card, config.encoder.name))
    return out_dir


def model_card(card: dict[str, Any], encoder_name: str) -> str:
    """A README for an exported encoder: data, objectives, probe scores, use, limits and how to load it."""
    import timm

    pretrained_cfg = timm.models.get_pretrained_cfg(encoder_name)
    fixed_size = pretrained_cfg is not None and pretrained_cfg.fixed_input_size
    size_arg = f", img_size={card['input_size'][1]}" if fixed_size else ""
    data = card.get("data") or {}
    splits = data.get("splits") or {}
    split_text = ", ".join(f"{name} {info.get('samples', '?')}" for name, info in splits.items()) or "unknown"
    total = sum(int(info.get("samples") or 0) for info in splits.values())
    tasks = ", ".join(f"{name} (weight {weight:g})" for name, weight in card["pretext_tasks"].items())
    init = card.get("init")
    init_text = f"`{init}` (encoder.init)" if init else "random (timm's initialisation)"
    lines = [
        f"# Radiograph encoder: {encoder_name}",
        "",
        f"A `{encoder_name}` image encoder (timm, one input channel, {card['input_size'][1]} px) pretrained with "
        f"radpretrain {card['radpretrain_version']} on de-identified radiograph shards, with the pretext "
        "objectives below (no human labels; `metadata` learns from DICOM header fields).",
        "",
        "## Training",
        "",
        f"- Objectives: {tasks}.",
        f"- Initial weights: {init_text}.",
        f"- Steps: {card['steps']} ({card['images_seen']} images seen), seed {card['seed']}.",
        f"- Data: {total} images ({split_text}); trained on the train split; stored longest side "
        f"{data.get('size', '?')} px.",
        "- Composition of the archive (all splits):",
    ]
    composition = data.get("composition") or {}
    for field_name in ("body_part", "modality", "age_bucket", "sex", "view"):
        counts = composition.get(field_name)
        if isinstance(counts, dict) and counts:
            shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -_as_int(kv[1])))
            lines.append(f"  - {field_name.replace('_', ' ')}: {shown}.")
    lines += probe_section(card)
    lines += [
        "",
        "## Intended use",
        "",
        "A starting point for finetuning segmentation and classification models on small labeled radiograph "
        "cohorts (`radpretrain finetune`), and for comparing pretext tasks. Not a medical device; "
        "not for diagnosis.",
        "",
        "## Limitations",
        "",
        "- Learned from one archive: scanners, protocols, populations and body-part mix of that archive "
        "shape what it represents; check transfer on your own held-out data.",
        "- Probe labels come from DICOM headers (body part, age), which are sometimes wrong or missing.",
        f"- Inputs must follow the intensity convention `{intensity.CONVENTION}` (one channel, higher = more "
        f"attenuation, windowed to [0, 1], then (x - {intensity.MEAN}) / {intensity.STD}); other preprocessing "
        "gives worse features.",
        "",
        "## How to load",
        "",
        "```python",
        "import radpretrain",
        'encoder = radpretrain.load_encoder("path/to/this/folder")  # a timm module, forward(x) -> (B, features)',
        "```",
        "",
        "or into plain timm (after `import radpretrain.models` for the CBR models):",
        "",
        "```python",
        "import timm, safetensors.torch",
        f'model = timm.create_model("{encoder_name}", in_chans=1, num_classes=0, pretrained=False{size_arg})',
        'model.load_state_dict(safetensors.torch.load_file("encoder.safetensors"))',
        "```",
        "",
    ]
    return "\n".join(lines)


def probe_section(card: dict[str, Any]) -> list[str]:
    """The card's probe scores: header labels (marked when a task trained on them) and the downstream cohort."""
    from radpretrain.pretrain.probe import COHORT, is_cohort_score

    lines = ["", "## Probe scores (frozen features)", ""]
    probes = card.get("probes") or {}
    marks = card.get("probe_labels") or {}
    if "step" not in probes:
        return [*lines, "No probe was run (the run stopped before its end-of-training probe)."]
    scores = {k: v for k, v in probes.items() if isinstance(v, (int, float)) and "/" in k}
    header = {k: v for k, v in scores.items() if not is_cohort_score(k)}
    if header:
        lines += [
            f"Header labels of the val split, measured at step {probes['step']} on {probes.get('val_samples', '?')} "
            f"val images with {probes.get('train_samples', '?')} train images as the kNN bank / linear-probe fit set.",
            "",
            "| label | kNN accuracy | linear probe accuracy | chance (majority class) | trained on by this run |",
            "|---|---|---|---|---|",
        ]
        for label in sorted({k.split("/", 1)[1] for k in header}):
            cells = [probes.get(f"{kind}/{label}") for kind in ("knn", "linear", "majority")]
            trained = "yes" if (marks.get(label) or {}).get("trained_on") else "no"
            lines.append(
                f"| {label} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + f" | {trained} |"
            )
        if any((marks.get(label) or {}).get("trained_on") for label in marks):
            lines += [
                "",
                "A pretext task of this run learned to predict the labels marked trained on: their scores measure "
                "that training, not transfer. Compare pretext tasks on labels none of them saw (`probe.cohort`).",
            ]
    if any(is_cohort_score(k) for k in scores):
        name = (marks.get(COHORT) or {}).get("name") or "cohort"
        classes = probes.get("cohort_classes")
        chance = f"{1 / classes:.3f}" if isinstance(classes, (int, float)) and classes else "1/classes"
        lines += [
            "",
            f"Downstream cohort `{name}` (no pretext task saw it): {probes.get('cohort_cases', '?')} images of "
            f"{probes.get('cohort_patients', '?')} patients, {classes} classes, scored by patient-level "
            f"{probes.get('cohort_folds', '?')}-fold cross-validation at step {probes['step']}.",
            "",
            f"| probe | AUROC | balanced accuracy (chance {chance}) |",
            "|---|---|---|",
        ]
        for kind, title in (("knn", "kNN"), ("linear", "logistic regression")):
            cells = [probes.get(f"{kind}_{metric}/{COHORT}") for metric in ("auroc", "balanced_accuracy")]
            lines.append(f"| {title} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    note = card.get("probe_note")
    if not scores:
        lines.append(note or "No probe label had two classes among the probed images: nothing was scored.")
    elif note:
        lines += ["", f"Note: {note}."]
    return lines


def _as_int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
