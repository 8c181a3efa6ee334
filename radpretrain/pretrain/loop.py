"""The pretraining loop: shards -> views -> objective -> AdamW/LARS with Accelerate, resumable to the batch."""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn

from radpretrain import files
from radpretrain.config import save_config, to_dict
from radpretrain.errors import ConfigError, NonFiniteLossError, ShardError
from radpretrain.pretrain import checkpoint as ckpt
from radpretrain.pretrain import distributed, monitor, stream
from radpretrain.pretrain.config import RESUME_FIXED, PretrainConfig
from radpretrain.shards.format import MANIFEST, ShardSet

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """How a run ended: the step reached, the last probe scores and the signal that stopped it (if any)."""

    step: int
    run_dir: Path
    probe: dict[str, float]
    main: bool
    stopped_by: signal.Signals | None = None


class PretrainModel(nn.Module):
    """The shared encoder and the objective's heads as one module, so DDP and checkpoints see both."""

    def __init__(self, encoder: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.objective: Any = objective  # tasks.Objective: forward(encoder, batch), views, after_step

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.objective(self.encoder, batch)


def pretrain(cfg: PretrainConfig, batches: Iterable[dict[str, Any]] | None = None) -> RunResult:
    """Train `cfg.encoder` on `cfg.data.shards` with `cfg.tasks` until `cfg.steps`; writes everything to `cfg.out`.

    `batches` replaces the train shards as the data source (benchmarks, data already in memory): dicts of
    (B, ...) tensors with the objective's views and labels, cycled if it ends. The shards still provide
    the manifest and the probes' data; a resumed run then restarts `batches` from its beginning.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from radpretrain.data import positives
    from radpretrain.data.transforms import build_sample_fn
    from radpretrain.models.encoders import build_encoder
    from radpretrain.pretrain.tasks import build_objective

    if cfg.data.shards is None:
        raise ConfigError(
            "data.shards is not set; give the folder written by `radpretrain shard`, e.g. data.shards=OUT"
        )
    run_dir = Path(cfg.out)
    accelerator = Accelerator(
        cpu=cfg.cpu or not torch.cuda.is_available(),  # --multi_gpu on a CPU machine then gives gloo processes
        mixed_precision=cfg.precision,
        log_with="tensorboard",
        project_dir=str(run_dir),
    )
    main = accelerator.is_main_process
    if logging.getLogger("accelerate").level == logging.NOTSET:
        logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file save messages drown the bar
    shards = ShardSet.open(cfg.data.shards)  # the one read of the manifest: data, probes and summary share it
    check_data(cfg, shards.manifest)
    vocab = shards.vocab
    urls = stream.train_urls(shards, accelerator.num_processes)
    existing = ckpt.find_checkpoint(run_dir)
    if existing is not None and not cfg.resume:
        raise ConfigError(
            f"{run_dir} already holds a run; pass --resume (resume=true) to continue it or choose another out"
        )
    if existing is not None:
        check_resume(cfg, run_dir)

    # Same seed everywhere for identical initial weights; per-process seeds for the training RNG afterwards.
    set_seed(cfg.seed)
    encoder = build_encoder(cfg.encoder.name, img_size=cfg.data.image_size, **cfg.encoder.options)
    if cfg.encoder.init is not None and existing is None:  # a resumed run's weights come from its checkpoint
        init_encoder(encoder, cfg.encoder.init, main)
    check_encoder(encoder, cfg)
    # Before the objective: momentum encoders copy the encoder's (initial) weights when they are built.
    objective = build_objective(encoder, cfg.tasks, cfg.task_options, vocab)
    positives.check_views(cfg.data.positives, objective.views, cfg.tasks)
    model = PretrainModel(encoder, objective)
    model = distributed.sync_batchnorm(model, cfg.sync_bn, accelerator)  # before DDP wraps it
    cohort = build_cohort_probe(cfg, accelerator.process_index, accelerator.num_processes)  # bad cohorts fail now
    trained = trained_labels(objective)
    optimizer = build_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    set_seed(cfg.seed, device_specific=True)

    state = ckpt.TrainState(world_size=accelerator.num_processes)
    if existing is not None:
        state = ckpt.load_checkpoint(accelerator, existing)
        if main:
            log.info("resuming %s from step %d", run_dir, state.step)
    run_dir.mkdir(parents=True, exist_ok=True)  # every process: each may write its own sample log
    if main:
        save_config(cfg, run_dir / ckpt.CONFIG_FILE)
        truncate_log(run_dir / ckpt.LOG_FILE, state.step)
    accelerator.init_trackers("tensorboard")
    position = stream.start_position(
        state.positions, state.world_size, accelerator.num_processes, accelerator.process_index
    )

    partners = None
    if cfg.data.positives != "augment" and batches is None:
        with accelerator.main_process_first():  # the main process scans the shards and caches; the others read it
            partners = positives.open_partners(cfg.data.positives, urls, run_dir / positives.INDEX_FILE)
        if main:
            log.info("positives: %s", partners.describe())

    def sample_fn(seed: int) -> Callable[[dict], Any]:
        views, size = objective.views, cfg.data.image_size
        return stream.with_key(build_sample_fn(views, cfg.augment, vocab, size, seed=seed, partners=partners))

    train = None
    if batches is None:
        train = stream.BatchStream(urls, sample_fn, cfg, accelerator.process_index, accelerator.device, position)
    source = train if train is not None else stream.cycle_on(batches or [], accelerator.device)
    samples_log = run_dir / f"samples-rank{accelerator.process_index}.jsonl" if cfg.data.log_samples else None
    if samples_log is not None:
        truncate_log(samples_log, state.step)
    unwrapped: PretrainModel = accelerator.unwrap_model(model)
    per_step = cfg.data.batch_size * cfg.optim.accumulation * accelerator.num_processes
    probe: dict[str, float] = {}
    summary = read_summary(run_dir) if main else {}

    bar = tqdm(total=cfg.steps, initial=state.step, desc="pretrain", unit="step", disable=not main, dynamic_ncols=True)
    tick, tick_step = time.perf_counter(), state.step
    first_step, stopping, signalled = state.step, False, False
    model.train()
    with StopSignal() as stop, bar:
        while state.step < cfg.steps:
            # --- schedule: lr is a function of the step, so resuming restores it exactly.
            lr = learning_rate(state.step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # --- forward/backward over the micro-batches; DDP syncs gradients only on the last one.
            sums: dict[str, torch.Tensor] = {}
            for micro in range(cfg.optim.accumulation):
                batch = next(source)
                if samples_log is not None:
                    read = {"step": state.step + 1, "keys": list(batch.get("key", []))}
                    if "partner" in batch:  # data.positives: the image each sample's second view came from
                        read["partners"] = list(batch["partner"])
                    append_log(samples_log, read)
                last = micro == cfg.optim.accumulation - 1
                with nullcontext() if last else accelerator.no_sync(model):
                    out = model(batch)
                    accelerator.backward(out["loss"] / cfg.optim.accumulation)
                for name, value in out.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float() / cfg.optim.accumulation
            if cfg.optim.grad_clip > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            else:  # the norm alone (for the guard and the log): clip_grad_norm_ would also rescale every gradient
                accelerator.unscale_gradients()
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                grad_norm = torch.nn.utils.get_total_norm(grads)

            # --- one all-reduce carries the loss terms, the gradient norm and any stop request.
            names = sorted(sums)
            packed = torch.stack(
                [*(sums[n] for n in names), grad_norm.float(), torch.tensor(stop.flag, device=grad_norm.device)]
            )
            values = accelerator.reduce(packed.to(accelerator.device), "mean").tolist()
            terms = dict(zip(names, values[: len(names)], strict=True))
            terms["grad_norm"] = values[-2]
            signalled = values[-1] > 0
            # fp16 overflows are normal (the scaler skips the step); any other non-finite value is a failure.
            guarded = {k: v for k, v in terms.items() if k != "grad_norm" or cfg.precision != "fp16"}
            if not all(math.isfinite(v) for v in guarded.values()):
                raise NonFiniteLossError(state.step + 1, terms)

            # --- update: a step the fp16 scaler skipped is no step (schedule and momentum encoders stay put).
            state.images += per_step
            stepped = apply_update(accelerator, optimizer, unwrapped, state, cfg.steps)
            session_done = cfg.stop_after > 0 and state.step - first_step >= cfg.stop_after
            stopping = state.step < cfg.steps and (signalled or session_done)
            if not stepped and not stopping:
                continue  # the same step again on the next batch: logs, checkpoints and probes follow steps

            # --- log.
            if state.step % cfg.log_every == 0 or state.step == cfg.steps or stopping:
                now = time.perf_counter()
                rate = per_step * (state.step - tick_step) / max(now - tick, 1e-9)
                tick, tick_step = now, state.step
                record = {"step": state.step, **terms, "lr": lr, "images_per_s": rate}
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.step)
                if main:
                    append_log(run_dir / ckpt.LOG_FILE, record)
                    bar.set_postfix(loss=f"{terms['loss']:.4f}", img_s=f"{rate:.0f}", refresh=False)
            bar.update(1)

            # --- checkpoint: every N steps, at the end, and when asked to stop.
            paused = False
            if (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) or state.step == cfg.steps or stopping:
                paused = True
                state.positions = train.gather_positions(accelerator) if train is not None else None
                ckpt.save_checkpoint(accelerator, run_dir, state)
            if stopping:
                break

            # --- probe: frozen-feature kNN / linear scores on the val split.
            if (cfg.probe_every and state.step % cfg.probe_every == 0) or state.step == cfg.steps:
                paused = True
                probe = run_probe(accelerator, unwrapped.encoder, cfg, shards, state.step, cohort)
                if main:
                    summary.setdefault("probes", []).append(probe)
                    write_summary(run_dir, cfg, shards.manifest, state, summary, probe, trained)
                accelerator.log({f"probe/{k}": v for k, v in probe.items() if "/" in k}, step=state.step)
            if paused and tick_step == state.step:
                tick = time.perf_counter()  # images/s measures training, not checkpoints and probes
    if main:
        write_summary(run_dir, cfg, shards.manifest, state, summary, probe, trained)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes the trackers and the process group: last
    # Any process may have received the signal; the all-reduced flag stopped them all.
    stopped_by = signal.Signals(stop.received or signal.SIGTERM) if signalled and stopping else None
    return RunResult(step=state.step, run_dir=run_dir, probe=probe, main=main, stopped_by=stopped_by)


# ------------------------------------------------------------------------------------------------------------------
# Checks that turn a mismatch into one clear message before any work is done.
# ------------------------------------------------------------------------------------------------------------------


def check_data(cfg: PretrainConfig, manifest: dict[str, Any]) -> None:
    """Refuse shards whose size or channel count does not fit the run (ShardSet.open checked the convention)."""
    size = int(manifest.get("size", 0))
    if cfg.data.image_size > size:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} is larger than the shards' stored size ({size} px); "
            f"lower data.image_size to <= {size} or re-shard with --size {cfg.data.image_size}"
        )
    if int(cfg.encoder.options.get("in_chans", 1)) != 1:
        raise ConfigError("the shards hold one-channel radiographs; remove encoder.options.in_chans")
    if "vocab" not in manifest:
        raise ShardError(f"{cfg.data.shards}/{MANIFEST} has no vocab; re-shard with this version of radpretrain")


def check_encoder(encoder: nn.Module, cfg: PretrainConfig) -> None:
    """One tiny forward pass, so an encoder that cannot take the input size fails now with a clear message."""
    encoder.eval()
    try:
        with torch.no_grad():
            encoder(torch.zeros(1, 1, cfg.data.image_size, cfg.data.image_size))
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise ConfigError(
            f"encoder '{cfg.encoder.name}' cannot take {cfg.data.image_size} px inputs ({str(exc).splitlines()[0]}); "
            "choose a data.image_size the encoder accepts (ViTs: a multiple of the patch size)"
        ) from None
    finally:
        encoder.train()


def check_resume(cfg: PretrainConfig, run_dir: Path) -> None:
    """A checkpoint continues only the run it came from: the model-defining keys must not change."""
    from radpretrain.config import load_config

    saved = to_dict(load_config(PretrainConfig, run_dir / ckpt.CONFIG_FILE))
    now = to_dict(cfg)
    # `keep`: encoder, tasks and task_options are compared whole, as the settings they are.
    changed = files.changed_settings(saved, now, keys=RESUME_FIXED, keep=RESUME_FIXED)
    if changed:
        key = changed[0].split(": ", 1)[0]
        old, new = (files.flatten(settings, keep=RESUME_FIXED)[key] for settings in (saved, now))
        raise ConfigError(
            f"cannot resume {run_dir}: {key} was {old!r} and is now {new!r}; use the run's own config "
            f"({run_dir / ckpt.CONFIG_FILE}) or start a new run in another out folder"
        )


# ------------------------------------------------------------------------------------------------------------------
# Optimiser and schedule.
# ------------------------------------------------------------------------------------------------------------------


#: Parameters never decayed, whichever module holds them: position embeddings and learned tokens (ViT class,
#: register and distillation tokens, MAE mask tokens), as in the ViT, MAE and DINO recipes.
NO_DECAY_PATTERNS = ("*pos_embed", "*cls_token", "*reg_token", "*dist_token", "*mask_token")


def build_optimizer(model: nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """AdamW or LARS; norms, biases, position embeddings and tokens are not decayed (timm's grouping)."""
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(model, cfg.optim.weight_decay, no_weight_decay_list=no_weight_decay(model))
    if cfg.optim.name == "lars":
        from lightly.utils.lars import LARS

        return LARS(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    beta1, beta2 = cfg.optim.betas
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(beta1, beta2), weight_decay=cfg.optim.weight_decay)


def no_weight_decay(model: nn.Module) -> set[str]:
    """Names (fnmatch patterns) of parameters kept out of weight decay, as they appear in `model`.

    Every submodule's own `no_weight_decay()` (timm's ViT: pos_embed, cls_token, dist_token) is prefixed with
    its place in `model` (e.g. `encoder.pos_embed`); NO_DECAY_PATTERNS catch the same kinds of parameter in
    modules that do not declare them (lightly's MAE decoder and its mask token).
    """
    names = set(NO_DECAY_PATTERNS)
    for prefix, module in model.named_modules():
        declared = getattr(module, "no_weight_decay", None)
        if callable(declared):
            names |= {f"{prefix}.{name}" if prefix else str(name) for name in declared()}
    return names


def apply_update(accelerator: Any, optimizer: Any, model: PretrainModel, state: ckpt.TrainState, steps: int) -> bool:
    """Step the optimiser; count the step and update the momentum encoders only if the optimiser really stepped.

    Under fp16 the gradient scaler skips a step whose gradients overflowed (and lowers its scale); that step
    must not move the schedule (a function of `state.step`) or the momentum encoders, so it is counted in
    `state.skipped` and the step is done again on the next batch.
    """
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if accelerator.optimizer_step_was_skipped:
        state.skipped += 1
        return False
    state.step += 1
    model.objective.after_step(model.encoder, state.step, steps)
    return True


def learning_rate(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup from 0 over `warmup` steps, then cosine decay to `min_lr` at `steps` (or constant)."""
    o = cfg.optim
    if step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    if o.schedule == "constant":
        return o.lr
    progress = (step - o.warmup) / max(1, cfg.steps - o.warmup)
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# ------------------------------------------------------------------------------------------------------------------
# Probes, logs and summary.
# ------------------------------------------------------------------------------------------------------------------


def init_encoder(encoder: nn.Module, path: Path, main: bool) -> None:
    """Load `encoder.init` weights into the new encoder (the one loader finetuning uses too)."""
    from radpretrain.models.weights import init_encoder_from

    info = init_encoder_from(encoder, path)
    if main:
        log.info("encoder starts from %s (%s, %d tensors)", Path(path).name, info["format"], info["tensors"])


def build_cohort_probe(cfg: PretrainConfig, rank: int, world: int) -> Any:
    """The downstream cohort probe of `probe.cohort` (loaded and checked now, before training), or None."""
    p = cfg.probe
    if p.cohort is None:
        return None
    from radpretrain.pretrain.probe import CohortProbe

    return CohortProbe(
        p.cohort, cfg.data.image_size, folds=p.folds, k=p.k, batch_size=p.batch_size, rank=rank, world=world
    )


def trained_labels(objective: nn.Module) -> list[str]:
    """The header labels some task of the run learns to predict (their probes are marked trained_on)."""
    tasks: Any = getattr(objective, "tasks", {})
    return sorted({label for task in tasks.values() for label in task.trained_labels()})


def run_probe(
    accelerator: Any, encoder: nn.Module, cfg: PretrainConfig, shards: ShardSet, step: int, cohort: Any = None
) -> dict[str, float]:
    """kNN and linear probe scores of `encoder` (whole images at the stored window, and the cohort probe's
    cross-validated AUROC and balanced accuracy when there is one); every process calls it."""
    vocab = shards.vocab
    with stream.RngScope(stream.derive_seed(cfg.seed, step, 3)):
        scores = monitor.run_probes(
            accelerator,
            encoder,
            lambda split: stream.probe_batches(shards, split, cfg, vocab),
            vocab,
            labels=cfg.probe.labels,
            train_samples=cfg.probe.train_samples,
            val_samples=cfg.probe.val_samples,
            k=cfg.probe.k,
            image_key=stream.PROBE_VIEW,
        )
        if cohort is not None:
            scores.update(cohort.score(accelerator, encoder))
    scores["step"] = step
    if accelerator.is_main_process:
        shown = ", ".join(f"{k}={v:.3f}" for k, v in scores.items() if k.startswith(("knn", "linear")))
        log.info("probe at step %d: %s", step, shown)
    return scores


def append_log(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines after the checkpoint a run resumes from, so each step appears once."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    files.write_text(path, "".join(line + "\n" for line in kept))


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / ckpt.SUMMARY_FILE
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        data = {}
    return data if isinstance(data, dict) else {}


def write_summary(
    run_dir: Path,
    cfg: PretrainConfig,
    manifest: dict[str, Any],
    state: ckpt.TrainState,
    summary: dict[str, Any],
    probe: dict[str, float],
    trained: Iterable[str] = (),
) -> None:
    """RUN/summary.json: what was trained on (counts only), how far, and the probe scores over time.

    `probe_labels` marks each probe label a task of the run trained on (`trained_on`: its scores measure
    that training, not transfer); `probe_note` says when a probe label could not be scored.
    """
    summary.update(
        {
            "encoder": cfg.encoder.name,
            "init": Path(cfg.encoder.init).name if cfg.encoder.init is not None else None,
            "tasks": cfg.tasks,
            "step": state.step,
            "images_seen": state.images,
            "skipped_steps": state.skipped,
            "data": data_summary(manifest),
            "probe_labels": monitor.probe_labels(cfg.probe.labels, trained, cfg.probe.cohort),
        }
    )
    if probe:
        summary["probe"] = probe
        note = monitor.probe_note(cfg.probe.labels, probe)
        if note:
            summary["probe_note"] = note
        else:
            summary.pop("probe_note", None)  # an earlier probe's note (resumed run)
    files.write_text(run_dir / ckpt.SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")


def data_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """Counts and composition from a shard manifest (no shard names, no paths)."""
    splits = {name: {"samples": info.get("samples")} for name, info in (manifest.get("splits") or {}).items()}
    keep = ("schema_version", "intensity_convention", "storage", "size", "counts", "composition", "vocab")
    return {**{k: manifest[k] for k in keep if k in manifest}, "splits": splits}


class StopSignal:
    """SIGTERM/SIGINT ask the loop to checkpoint and stop; a second signal acts as usual."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def flag(self) -> float:
        return 1.0 if self.received is not None else 0.0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
