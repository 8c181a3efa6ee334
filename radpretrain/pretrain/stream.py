"""The data of a pretraining run: a seeded, resumable stream of this process's train batches, and probe batches."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from radpretrain.errors import ConfigError, ShardError
from radpretrain.pretrain.config import PretrainConfig
from radpretrain.shards.format import LIGHT_VIEWS

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from radpretrain.shards.format import ShardSet

log = logging.getLogger(__name__)


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


def train_urls(shards: ShardSet, processes: int) -> list[str]:
    """The train split's shard urls, for any number of processes: when the shards are fewer than the readers
    (processes x loader workers), the readers split their samples (`shards.reader.reader_share`).

    ShardError when the split holds fewer samples than processes, so some process could never read one.
    """
    urls = shards.urls("train")
    if shards.samples("train") < processes:
        raise ShardError(
            f"the train split has {shards.samples('train')} sample(s) for {processes} processes; "
            "use fewer processes or add data"
        )
    return urls


#: The one view the probes encode: the light one (crop + window), here the whole image at the stored window.
PROBE_VIEW = LIGHT_VIEWS[0]


def start_position(
    positions: list[dict[str, int]] | None, saved_world: int, world: int, rank: int
) -> dict[str, int] | None:
    """Where this process's stream starts: its saved position, or a new epoch if the process count changed."""
    if positions is None:
        return None
    if saved_world == world:
        return positions[rank]
    log.warning("the run had %d processes and now has %d: data restarts at a new epoch", saved_world, world)
    return {"epoch": max(p["epoch"] for p in positions) + 1, "batches": 0}


def describe_readers(shards: int, processes: int, workers: int) -> str:
    """The start-up line on the data: how many readers the train shards feed whole, and how this run reads them."""
    from radpretrain.shards.reader import parts_per_shard

    readers = processes * workers
    layout = f"{processes} process(es) x {workers} loader worker(s)"
    parts = parts_per_shard(shards, readers)
    if parts == 1:
        return f"{shards} train shard(s) feed up to {shards} readers whole; {readers} read them ({layout})"
    return (
        f"{shards} train shard(s) feed up to {shards} readers whole; {readers} read them ({layout}), so they "
        f"split samples: each reader takes one in {parts} samples of its shard(s)"
    )


class BatchStream(Iterator[dict[str, torch.Tensor]]):
    """Endless batches of this process's train shards, one seeded epoch after another.

    Epoch `e` shuffles with seeds derived from (seed, e, rank), and the reader count (processes x loader
    workers) fixes which reader takes which shard or sample, so the position {"epoch", "batches", "readers"}
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
        from radpretrain.shards.reader import reader_layout

        self.urls, self.make_sample_fn, self.cfg, self.rank, self.device = urls, make_sample_fn, cfg, rank, device
        _, world, self.readers = reader_layout(cfg.data.workers)
        self.epoch = position["epoch"] if position else 0
        self.batches = position["batches"] if position else 0
        if position and position.get("readers", self.readers) != self.readers:
            # Which reader takes which shard (or sample) follows from the reader count: the saved batches
            # cannot be replayed with another one, so the data starts a new epoch.
            log.warning(
                "the run read its shards with %d readers and now has %d (processes x loader workers): data "
                "restarts at a new epoch",
                position["readers"],
                self.readers,
            )
            self.epoch, self.batches = self.epoch + 1, 0
        if rank == 0:
            log.info("data: %s", describe_readers(len(urls), world, max(1, cfg.data.workers)))
        self._it: Iterator[Any] | None = None
        self._rng = RngScope(0)

    def position(self) -> dict[str, int]:
        """{"epoch", "batches", "readers"}: with the seed, what fixes every later batch of this process."""
        return {"epoch": self.epoch, "batches": self.batches, "readers": self.readers}

    def gather_positions(self, accelerator: Any) -> list[dict[str, int]]:
        from accelerate.utils import gather_object

        return gather_object([self.position()]) if accelerator.num_processes > 1 else [self.position()]

    def _open(self) -> None:
        from torch.utils.data import DataLoader

        from radpretrain.shards.reader import build_pipeline, prepare_worker_sockets

        if self.cfg.data.workers:
            prepare_worker_sockets()
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
            if self.batches:  # only a resumed run replays; a fresh epoch shows no bar
                self._replay(self._it, self.batches)

    def _replay(self, batches: Iterator[Any], count: int) -> None:
        from tqdm.auto import tqdm

        log.info("data: replaying %d batches of epoch %d to reach the saved position", count, self.epoch)
        for _ in tqdm(range(count), desc="data: replaying", disable=self.rank != 0, leave=False):
            next(batches)

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


def probe_batches(shards: ShardSet, split: str, cfg: PretrainConfig, vocab: dict[str, list[str]]) -> DataLoader:
    """This process's batches of `split` for the probes: whole images at the stored window, in a fixed order."""
    from torch.utils.data import DataLoader

    from radpretrain.data.transforms import AugmentConfig, ViewsConfig, build_sample_fn
    from radpretrain.shards.reader import build_pipeline, prepare_worker_sockets

    evaluation = ViewsConfig(plain=AugmentConfig.evaluation())  # deterministic: whole image, stored window
    # Unshuffled: the sharder already shuffled globally, and a fixed sample makes probes comparable.
    pipeline = build_pipeline(
        shards.urls(split),
        shuffle=0,
        seed=0,
        map_fn=build_sample_fn((PROBE_VIEW,), evaluation, vocab, cfg.data.image_size),
    )
    workers = min(cfg.data.workers, 2)
    if workers:
        prepare_worker_sockets()
    return DataLoader(pipeline, batch_size=cfg.probe.batch_size, num_workers=workers, generator=torch.Generator())
