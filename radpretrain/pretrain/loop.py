"""The pretraining loop: shards -> views -> objective -> AdamW/LARS with Accelerate, resumable to the batch."""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import nn

from radpretrain import intensity
from radpretrain.config import save_config, to_dict
from radpretrain.errors import ConfigError, NonFiniteLossError, ShardError
from radpretrain.pretrain import checkpoint as ckpt
from radpretrain.pretrain.config import RESUME_FIXED, PretrainConfig

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

    from radpretrain.data.transforms import build_sample_fn
    from radpretrain.models.encoders import build_encoder
    from radpretrain.pretrain.tasks import build_objective
    from radpretrain.shards.format import ShardSet

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
    manifest = ShardSet.open(cfg.data.shards).manifest
    check_data(cfg, manifest)
    vocab: dict[str, list[str]] = manifest["vocab"]
    urls = ShardSet.open(cfg.data.shards).urls("train")
    if len(urls) < accelerator.num_processes:
        raise ShardError(
            f"the train split has {len(urls)} shard(s) for {accelerator.num_processes} processes; each process "
            "reads its own shards, so re-shard with a smaller --shard-size or use fewer processes"
        )
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
    check_encoder(encoder, cfg)
    objective = build_objective(encoder, cfg.tasks, cfg.task_options, vocab)
    model = PretrainModel(encoder, objective)
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
    position = None
    if state.positions is not None and state.world_size == accelerator.num_processes:
        position = state.positions[accelerator.process_index]
    elif state.positions is not None:
        log.warning(
            "the run had %d processes and now has %d: data restarts at a new epoch",
            state.world_size,
            accelerator.num_processes,
        )
        position = {"epoch": max(p["epoch"] for p in state.positions) + 1, "batches": 0}

    def sample_fn(seed: int) -> Callable[[dict], Any]:
        return with_key(build_sample_fn(objective.views, cfg.augment, vocab, cfg.data.image_size, seed=seed))

    stream = None
    if batches is None:
        stream = BatchStream(urls, sample_fn, cfg, accelerator.process_index, accelerator.device, position)
    source = stream if stream is not None else cycle_on(batches or [], accelerator.device)
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
                    append_log(samples_log, {"step": state.step + 1, "keys": list(batch.get("key", []))})
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

            # --- update.
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.images += per_step
            unwrapped.objective.after_step(unwrapped.encoder, state.step, cfg.steps)
            session_done = cfg.stop_after > 0 and state.step - first_step >= cfg.stop_after
            stopping = state.step < cfg.steps and (signalled or session_done)

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
                state.positions = stream.gather_positions(accelerator) if stream is not None else None
                ckpt.save_checkpoint(accelerator, run_dir, state)
            if stopping:
                break

            # --- probe: frozen-feature kNN / linear scores on the val split.
            if (cfg.probe_every and state.step % cfg.probe_every == 0) or state.step == cfg.steps:
                paused = True
                probe = run_probe(accelerator, unwrapped.encoder, cfg, vocab, state.step)
                if main:
                    summary.setdefault("probes", []).append(probe)
                    write_summary(run_dir, cfg, manifest, state, summary, probe)
                accelerator.log({f"probe/{k}": v for k, v in probe.items() if "/" in k}, step=state.step)
            if paused and tick_step == state.step:
                tick = time.perf_counter()  # images/s measures training, not checkpoints and probes
    if main:
        write_summary(run_dir, cfg, manifest, state, summary, probe)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes the trackers and the process group: last
    # Any process may have received the signal; the all-reduced flag stopped them all.
    stopped_by = signal.Signals(stop.received or signal.SIGTERM) if signalled and stopping else None
    return RunResult(step=state.step, run_dir=run_dir, probe=probe, main=main, stopped_by=stopped_by)


# ------------------------------------------------------------------------------------------------------------------
# Checks that turn a mismatch into one clear message before any work is done.
# ------------------------------------------------------------------------------------------------------------------


def check_data(cfg: PretrainConfig, manifest: dict[str, Any]) -> None:
    """Refuse shards whose intensity convention, size or channel count does not fit the run."""
    intensity.check_convention(str(manifest.get("intensity_convention")), f"shards {cfg.data.shards}")
    size = int(manifest.get("size", 0))
    if cfg.data.image_size > size:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} is larger than the shards' stored size ({size} px); "
            f"lower data.image_size to <= {size} or re-shard with --size {cfg.data.image_size}"
        )
    if int(cfg.encoder.options.get("in_chans", 1)) != 1:
        raise ConfigError("the shards hold one-channel radiographs; remove encoder.options.in_chans")
    if "vocab" not in manifest:
        raise ShardError(f"{cfg.data.shards}/manifest.json has no vocab; re-shard with this version of radpretrain")


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
    for key in RESUME_FIXED:
        old, new = saved, now
        for part in key.split("."):
            old, new = old[part], new[part]
        if old != new:
            raise ConfigError(
                f"cannot resume {run_dir}: {key} was {old!r} and is now {new!r}; use the run's own config "
                f"({run_dir / ckpt.CONFIG_FILE}) or start a new run in another out folder"
            )


# ------------------------------------------------------------------------------------------------------------------
# Optimiser and schedule.
# ------------------------------------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """AdamW or LARS; norms and biases are not decayed (timm's grouping)."""
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(model, cfg.optim.weight_decay)
    if cfg.optim.name == "lars":
        from lightly.utils.lars import LARS

        return LARS(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    beta1, beta2 = cfg.optim.betas
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(beta1, beta2), weight_decay=cfg.optim.weight_decay)


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
# Data: a seeded, resumable stream of batches for this process.
# ------------------------------------------------------------------------------------------------------------------


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (numpy SeedSequence mixes them well)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class RngScope:
    """Private python/numpy/torch RNG states for data work in this process (when workers=0).

    Augmentation draws then neither shift the training RNG nor depend on it, so a resumed run, which
    replays the data of the current epoch without training on it, sees the same batches.
    """

    def __init__(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.state = (random.Random(seed).getstate(), np.random.RandomState(seed % 2**32).get_state(), gen.get_state())
        self.outer: tuple[Any, Any, torch.Tensor] | None = None

    def __enter__(self) -> RngScope:
        self.outer = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        self._set(self.state)
        return self

    def __exit__(self, *exc: object) -> None:
        self.state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        assert self.outer is not None
        self._set(self.outer)

    @staticmethod
    def _set(state: tuple[Any, Any, torch.Tensor]) -> None:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])


class BatchStream(Iterator[dict[str, torch.Tensor]]):
    """Endless batches of this process's train shards, one seeded epoch after another.

    Epoch `e` shuffles with seeds derived from (seed, e, rank), so the position {"epoch", "batches"}
    fixes everything that follows; resuming reopens the epoch and skips the consumed batches.
    """

    def __init__(
        self,
        urls: list[str],
        make_sample_fn: Callable[[int], Callable[[dict], Any]],
        cfg: PretrainConfig,
        rank: int,
        device: torch.device,
        position: dict[str, int] | None = None,
    ) -> None:
        self.urls, self.make_sample_fn, self.cfg, self.rank, self.device = urls, make_sample_fn, cfg, rank, device
        self.epoch = position["epoch"] if position else 0
        self.batches = position["batches"] if position else 0
        self._it: Iterator[Any] | None = None
        self._rng = RngScope(0)

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches}

    def gather_positions(self, accelerator: Any) -> list[dict[str, int]]:
        from accelerate.utils import gather_object

        return gather_object([self.position()]) if accelerator.num_processes > 1 else [self.position()]

    def _open(self) -> None:
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        from radpretrain.shards.reader import build_pipeline

        self._rng = RngScope(derive_seed(self.cfg.seed, self.epoch, self.rank, 1))
        with self._rng:
            pipeline = build_pipeline(
                self.urls,
                shuffle=self.cfg.data.shuffle,
                seed=derive_seed(self.cfg.seed, self.epoch),
                map_fn=self.make_sample_fn(derive_seed(self.cfg.seed, self.epoch, 4)),
            )
            loader = DataLoader(
                pipeline,
                batch_size=self.cfg.data.batch_size,
                num_workers=self.cfg.data.workers,
                drop_last=True,  # equal batches on every process; NT-Xent negatives stay comparable
                pin_memory=self.device.type == "cuda",
                generator=torch.Generator().manual_seed(derive_seed(self.cfg.seed, self.epoch, self.rank, 2)),
                persistent_workers=False,
            )
            self._it = iter(loader)
            if self.batches:
                log.info("data: replaying %d batches of epoch %d to reach the saved position", self.batches, self.epoch)
            for _ in tqdm(range(self.batches), desc="data: replaying", disable=self.rank != 0, leave=False):
                next(self._it)

    def __next__(self) -> dict[str, torch.Tensor]:
        while True:
            if self._it is None:
                self._open()
            assert self._it is not None
            try:
                with self._rng:
                    batch = next(self._it)
                break
            except StopIteration:
                if self.batches == 0:
                    raise ShardError(
                        f"process {self.rank} read no complete batch of {self.cfg.data.batch_size} from its train "
                        "shards; lower data.batch_size or add data"
                    ) from None
                self.epoch, self.batches, self._it = self.epoch + 1, 0, None
        self.batches += 1
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def with_key(sample_fn: Callable[[dict], Any]) -> Callable[[dict], Any]:
    """Carry each sample's key (an HMAC pseudonym) into the batch, for `data.log_samples`."""

    def add_key(sample: dict) -> Any:
        return {**sample_fn(sample), "key": sample["key"]}

    return add_key


def cycle_on(batches: Iterable[dict[str, Any]], device: torch.device) -> Iterator[dict[str, Any]]:
    """Given batches, endlessly, moved to the device once each (they are usually few and in memory)."""
    on_device = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    if not on_device:
        raise ConfigError("the batches given to pretrain() are empty")
    while True:
        yield from on_device


# ------------------------------------------------------------------------------------------------------------------
# Probes, logs and summary.
# ------------------------------------------------------------------------------------------------------------------


def run_probe(
    accelerator: Any, encoder: nn.Module, cfg: PretrainConfig, vocab: dict[str, list[str]], step: int
) -> dict[str, float]:
    """kNN and linear probe scores of `encoder` (whole images at the stored window); every process calls it."""
    from torch.utils.data import DataLoader

    from radpretrain.data.transforms import AugmentConfig, ViewsConfig, build_sample_fn
    from radpretrain.pretrain.monitor import run_probes
    from radpretrain.shards.format import ShardSet
    from radpretrain.shards.reader import build_pipeline

    assert cfg.data.shards is not None
    evaluation = ViewsConfig(plain=AugmentConfig.evaluation())  # deterministic: whole image, stored window

    def make_batches(split: str) -> Any:
        # Unshuffled: the sharder already shuffled globally, and a fixed sample makes probes comparable.
        pipeline = build_pipeline(
            ShardSet.open(cfg.data.shards).urls(split),  # type: ignore[arg-type]
            shuffle=0,
            seed=0,
            map_fn=build_sample_fn(("plain",), evaluation, vocab, cfg.data.image_size),
        )
        workers = min(cfg.data.workers, 2)
        return DataLoader(pipeline, batch_size=cfg.probe.batch_size, num_workers=workers, generator=torch.Generator())

    with RngScope(derive_seed(cfg.seed, step, 3)):
        scores = run_probes(
            accelerator,
            encoder,
            make_batches,
            vocab,
            labels=cfg.probe.labels,
            train_samples=cfg.probe.train_samples,
            val_samples=cfg.probe.val_samples,
            k=cfg.probe.k,
            image_key="plain",
        )
    scores["step"] = step
    if accelerator.is_main_process:
        shown = ", ".join(f"{k}={v:.3f}" for k, v in scores.items() if k.startswith(("knn/", "linear/")))
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
    path.write_text("".join(line + "\n" for line in kept))


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
) -> None:
    """RUN/summary.json: what was trained on (counts only), how far, and the probe scores over time."""
    summary.update(
        {
            "encoder": cfg.encoder.name,
            "tasks": cfg.tasks,
            "step": state.step,
            "images_seen": state.images,
            "data": data_summary(manifest),
        }
    )
    if probe:
        summary["probe"] = probe
    path = run_dir / ckpt.SUMMARY_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(path)


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
