"""Two gloo processes on CPU (`accelerate launch --multi_gpu`): disjoint shards, gathered NT-Xent, resume, sync_bn."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from radpretrain.files import is_temp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(overrides: list[str]) -> subprocess.CompletedProcess[str]:
    # `accelerate launch --cpu --num_processes 2` starts a single process; --multi_gpu with
    # Accelerator(cpu=True) (what the loop does without CUDA) starts two gloo processes.
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={free_port()}",  # other test runs on this machine may hold the default port
        "-m",
        "radpretrain",
        "pretrain",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)


def shard_of_keys(shards: Path) -> dict[str, str]:
    owner = {}
    for tar in shards.glob("train-*.tar"):
        with tarfile.open(tar) as handle:
            for name in handle.getnames():
                owner[name.split(".", 1)[0]] = tar.name
    return owner


@pytest.mark.slow
def test_two_processes_split_shards_gather_the_loss_and_resume(
    tiny_overrides: list[str], tiny_shards: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    batch = 8
    overrides = [
        *tiny_overrides,
        f"out={run}",
        "steps=6",
        f"data.batch_size={batch}",
        "data.log_samples=true",
        "tasks={simclr: 1.0}",
        # temperature 1: at initialisation every similarity is alike, so the loss is close to log(#candidates)
        "task_options={simclr: {temperature: 1.0}}",
    ]
    first = launch([*overrides, "stop_after=3"])
    assert first.returncode == 0, first.stderr[-3000:]
    # sync_bn is on by default (2 processes, a ResNet), but gloo on CPU cannot: one line says so, once
    said = [line for line in first.stderr.splitlines() if line.startswith("sync_bn:")]
    assert said == [
        "sync_bn: SyncBatchNorm cannot synchronise cpu tensors; BatchNorm statistics stay per process (2 processes)"
    ], first.stderr[-3000:]

    # one checkpoint: one model file, the RNG state of each process, both data positions
    checkpoint = run / "checkpoint"
    assert sorted(p.name for p in checkpoint.glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert len(list(checkpoint.glob("model*.safetensors"))) == 1
    assert not [p.name for p in run.iterdir() if is_temp(p)]  # the temp folder both processes wrote was renamed
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert state["step"] == 3 and state["world_size"] == 2 and state["images"] == 3 * batch * 2
    assert [p["batches"] for p in state["positions"]] == [3, 3]

    # NT-Xent gathered both processes' embeddings: 2 x 8 x 2 - 1 candidates per anchor, not 2 x 8 - 1
    step1 = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert abs(step1["simclr/loss"] - math.log(2 * batch * 2 - 1)) < 0.25, step1
    assert step1["simclr/loss"] > math.log(2 * batch - 1) + 0.4

    second = launch([*overrides, "resume=true"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming" in second.stderr and "step 6" in second.stdout
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]

    # each process read its own shards, and the resumed session went on where the first stopped (no batch again)
    owner = shard_of_keys(tiny_shards)
    seen: dict[int, list[str]] = {}
    for rank in (0, 1):
        lines = [json.loads(line) for line in (run / f"samples-rank{rank}.jsonl").read_text().splitlines()]
        assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
        seen[rank] = [key for line in lines for key in line["keys"]]
        assert len(seen[rank]) == 6 * batch and len(set(seen[rank])) == len(seen[rank])
    shards0, shards1 = {owner[k] for k in seen[0]}, {owner[k] for k in seen[1]}
    assert shards0 and shards1 and not shards0 & shards1


@pytest.mark.slow
def test_two_processes_train_dino_multicrop_on_same_patient_pairs(
    tiny_overrides: list[str], tiny_shards: Path, tmp_path: Path
) -> None:
    """A new task with its extra machinery on two gloo processes: DINO's momentum teacher, centre (all-reduced
    across processes) and local crops, fed same-patient pairs whose member index the main process builds."""
    from radpretrain.data.positives import INDEX_FILE

    from .test_positives import check_pairs, groups_of, read_train

    run, batch, steps = tmp_path / "run", 8, 4
    small = "{hidden_dim: 32, bottleneck_dim: 8, output_dim: 24, local_views: 2, teacher_temp_warmup: 0.0}"
    done = launch(
        [
            *tiny_overrides,
            f"out={run}",
            f"steps={steps}",
            f"data.batch_size={batch}",
            "data.log_samples=true",
            "data.positives=same_patient",
            "tasks={dino: 1.0}",
            f"task_options={{dino: {small}}}",
        ]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if line.startswith("positives:")]
    assert len(said) == 1 and said[0].startswith("positives: same_patient: "), done.stderr[-3000:]  # main only
    assert (run / INDEX_FILE).is_file()

    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for record in records:  # the all-reduced terms of both processes
        assert all(math.isfinite(v) for k, v in record.items() if k != "images_per_s"), record
        assert record["dino/loss"] > 0 and record["dino/teacher_temp"] == pytest.approx(0.07)
        assert 0 < record["dino/teacher_entropy"] <= math.log(24) + 1e-4
    state = json.loads((run / "checkpoint" / "train_state.json").read_text())
    assert state["step"] == steps and state["world_size"] == 2 and state["images"] == steps * batch * 2
    assert [p["batches"] for p in state["positions"]] == [steps, steps]  # both ranks stopped at the same step
    weights = load_file(str(run / "checkpoint" / "model.safetensors"))
    center = weights["objective.tasks.dino.criterion.center"]  # moved from zero by the centre's updates
    assert torch.isfinite(center).all() and center.abs().sum() > 0

    # each rank read its own shards, every step, and paired each image with another of its patient's
    truth = read_train(tiny_shards)
    groups = groups_of(truth, "same_patient")
    owner = shard_of_keys(tiny_shards)
    shards: dict[int, set[str]] = {}
    for rank in (0, 1):
        lines = [json.loads(line) for line in (run / f"samples-rank{rank}.jsonl").read_text().splitlines()]
        assert [line["step"] for line in lines] == list(range(1, steps + 1))
        pairs = [pair for line in lines for pair in zip(line["keys"], line["partners"], strict=True)]
        assert len(pairs) == steps * batch
        assert check_pairs(pairs, groups) > 0.5
        shards[rank] = {owner[key] for key, _ in pairs}
    assert shards[0] and shards[1] and not shards[0] & shards[1]
