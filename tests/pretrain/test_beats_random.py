"""Pretraining is worth it: `metadata` and `simclr` encoders beat the same encoder at random init on kNN body part.

Prints the table that README.md shows under "Pretraining results". Larger runs of the same measurement:
RADPRETRAIN_BEATS_RANDOM_FILES=3000 RADPRETRAIN_BEATS_RANDOM_STEPS=300 pytest tests/pretrain/test_beats_random.py -s
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FILES = int(os.environ.get("RADPRETRAIN_BEATS_RANDOM_FILES", "600"))
STEPS = int(os.environ.get("RADPRETRAIN_BEATS_RANDOM_STEPS", "100"))


@pytest.mark.slow
def test_pretrained_encoders_beat_random_init(tmp_path: Path) -> None:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from radpretrain.config import load_config
    from radpretrain.models.encoders import build_encoder
    from radpretrain.pretrain.config import PretrainConfig
    from radpretrain.pretrain.loop import pretrain, run_probe
    from radpretrain.shards.format import ShardSet
    from radpretrain.shards.plan import ShardConfig
    from radpretrain.shards.run import shard
    from radpretrain.synth.archive import generate

    generate(
        tmp_path / "src",
        FILES,
        seed=3,
        min_size=64,
        max_size=96,
        syntaxes=["ExplicitVRLittleEndian"],
        workers=2,
        progress=False,
    )
    config = ShardConfig(size=64, shard_size=100, val_fraction=0.3, test_fraction=0.0)
    shard(tmp_path / "src", tmp_path / "shards", config, key=tmp_path / "deid.key", workers=2, progress=False)
    common = [
        f"data.shards={tmp_path / 'shards'}",
        "encoder.name=test_resnet",
        "data.image_size=64",
        "data.batch_size=32",
        "data.workers=1",
        "data.shuffle=200",
        f"steps={STEPS}",
        "checkpoint_every=0",
        "log_every=25",
        "optim.lr=2e-3",
        "optim.weight_decay=1e-4",
        "optim.warmup=10",
        "probe.train_samples=2000",
        "probe.val_samples=1000",
        "probe.k=20",
    ]
    scores = {}
    for tasks in ("metadata", "simclr"):
        cfg = load_config(PretrainConfig, None, [*common, f"out={tmp_path / tasks}", f"tasks={{{tasks}: 1.0}}"])
        scores[tasks] = pretrain(cfg).probe
    # The starting point of both runs: the same seed gives the same initial weights.
    set_seed(cfg.seed)
    encoder = build_encoder("test_resnet", img_size=64)
    scores["random init"] = run_probe(Accelerator(cpu=True), encoder, cfg, ShardSet.open(cfg.data.shards), 0)

    probed = scores["random init"]
    print(
        f"\n{FILES} synthetic radiographs at 64 px, test_resnet, {STEPS} steps of 32; probes on "
        f"{probed['val_samples']} val images with {probed['train_samples']} train images as bank / fit set:\n"
    )
    print("| encoder | kNN body part | linear body part | kNN age bucket | linear age bucket |")
    print("|---|---|---|---|---|")
    for name, probe in scores.items():
        cells = [probe[f"{kind}/{label}"] for label in ("body_part", "age_bucket") for kind in ("knn", "linear")]
        print(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    random = scores["random init"]["knn/body_part"]
    assert scores["random init"]["val_samples"] >= 100
    assert scores["metadata"]["knn/body_part"] > random + 0.05
    assert scores["simclr"]["knn/body_part"] > random + 0.05
