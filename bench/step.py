"""Training-step overhead of `radpretrain pretrain` against a bare PyTorch + lightly loop, measured side by side.

    python bench/step.py                 # resnet18, 64 px, batch 32: simclr, vicreg, barlow_twins, dino
    python bench/step.py --tasks dino    # one task: 5 rounds of 8 timed steps
    python bench/step.py --quick         # 2 rounds of 3 timed steps

For each task both contenders train the same model (radpretrain's `build_encoder` + the task, i.e.
lightly's projection head and loss) from the same initial weights on the same batches, already in
memory, with AdamW. The tool runs its whole loop (`radpretrain.pretrain.loop.pretrain` with the batches
given in memory): Accelerate, lr schedule, gradient clipping, the NaN guard's per-step reduction, logging,
progress bar. The bare loop is forward, backward, step, and the task's momentum update where it has one
(BYOL, MoCo, DINO), as lightly's examples do. DINO's batches carry its local crops at their own size.

Time is CPU time of this process (one thread), so other work on the machine barely moves it. The bare
loop times its last `steps` of 2 x `steps`; the tool's step time is the difference between whole runs of
2 x `steps` and of `steps` steps (set-up, final checkpoint and probe cancel out). Rounds alternate the
contenders; the overhead is the median over rounds of tool / bare within the round.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_OVERHEAD = 0.05  # the tool's step time / the bare step time - 1
TASKS = ("simclr", "vicreg", "barlow_twins", "dino")
#: Heads sized for a 64 px CPU benchmark (the defaults' 2048-65536-wide heads would dominate both contenders);
#: DINO keeps its 8 local crops.
BENCH_OPTIONS: dict[str, dict[str, Any]] = {
    "vicreg": {"hidden_dim": 512, "output_dim": 512},
    "barlow_twins": {"hidden_dim": 512, "output_dim": 512},
    "dino": {"hidden_dim": 512, "bottleneck_dim": 128, "output_dim": 4096},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (64)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (32)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round (8)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (5)")
    parser.add_argument("--quick", action="store_true", help="3 steps, 2 rounds")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated tasks ({','.join(TASKS)})")
    parser.add_argument("--workdir", help="where to put the small shard folder (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 3, 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(1)  # per core: both contenders on one thread
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="radpretrain-bench-step-"))
    try:
        shards = small_shards(workdir)
        rows = []
        for task in [name.strip() for name in args.tasks.split(",") if name.strip()]:
            batches = make_batches(task, shards, args.batch, args.size, count=4)
            run_tool(args, task, shards, batches, workdir / f"{task}-warm-up", 1)  # imports and first allocations
            tool, bare = [], []
            for round_ in range(args.rounds):
                whole = run_tool(args, task, shards, batches, workdir / f"{task}-run{round_}-long", 2 * args.steps)
                part = run_tool(args, task, shards, batches, workdir / f"{task}-run{round_}-short", args.steps)
                tool.append((whole - part) / args.steps)
                bare.append(time_bare(args, task, shards, batches))
                print(
                    f"{task} round {round_ + 1}: tool {tool[-1] * 1000:.0f}, bare {bare[-1] * 1000:.0f} CPU ms/step",
                    flush=True,
                )
            ratio = statistics.median(t / b for t, b in zip(tool, bare, strict=True))  # paired within a round
            rows.append((task, statistics.median(tool), statistics.median(bare), ratio))
        report(args, rows)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def small_shards(workdir: Path) -> Path:
    """A few synthetic radiographs, sharded: the tool reads its manifest and probes its val split."""
    from radpretrain.shards.plan import ShardConfig
    from radpretrain.shards.run import shard
    from radpretrain.synth.archive import generate

    generate(workdir / "src", 40, seed=1, min_size=64, max_size=96, syntaxes=["ExplicitVRLittleEndian"], progress=False)
    config = ShardConfig(size=64, shard_size=20, val_fraction=0.3, test_fraction=0.0)
    shard(workdir / "src", workdir / "shards", config, key=workdir / "deid.key", progress=False)
    return workdir / "shards"


def build_task(task: str, encoder: Any, shards: Path) -> Any:
    """The objective of `task` alone with the benchmark's options on `encoder`."""
    from radpretrain.pretrain.tasks import build_objective
    from radpretrain.shards.format import ShardSet

    options = {task: BENCH_OPTIONS[task]} if task in BENCH_OPTIONS else {}
    return build_objective(encoder, {task: 1.0}, options, ShardSet.open(shards).manifest["vocab"])


def make_batches(task: str, shards: Path, batch: int, size: int, count: int) -> list[dict[str, Any]]:
    """`count` random batches with the views `task` asks for (local crops at their own size) and labels."""
    import torch

    from radpretrain.data.transforms import local_view_size
    from radpretrain.models.encoders import build_encoder
    from radpretrain.shards.format import LABEL_NAMES, LOCAL_VIEWS

    views = build_task(task, build_encoder("test_resnet"), shards).views
    gen = torch.Generator().manual_seed(0)
    labels = {name: torch.zeros(batch, dtype=torch.long) for name in LABEL_NAMES}
    sides = {view: local_view_size(size) if view in LOCAL_VIEWS else size for view in views}
    return [
        {**{view: torch.randn(batch, 1, side, side, generator=gen) for view, side in sides.items()}, **labels}
        for _ in range(count)
    ]


def run_tool(
    args: argparse.Namespace, task: str, shards: Path, batches: list[dict[str, Any]], run: Path, steps: int
) -> float:
    """CPU seconds of a whole `pretrain` run of `steps` steps on the in-memory batches."""
    import json

    from radpretrain.config import load_config
    from radpretrain.pretrain.config import PretrainConfig
    from radpretrain.pretrain.loop import pretrain

    cfg = load_config(
        PretrainConfig,
        None,
        [
            f"data.shards={shards}",
            f"out={run}",
            f"encoder.name={args.encoder}",
            f"data.image_size={args.size}",
            f"data.batch_size={args.batch}",
            "data.workers=0",
            f"tasks={{{task}: 1.0}}",
            f"task_options={json.dumps({task: BENCH_OPTIONS.get(task, {})})}",
            f"steps={steps}",
            "log_every=1",
            "checkpoint_every=0",
            "optim.warmup=0",
            "optim.grad_clip=0",  # the bare loop does not clip either
            "probe.train_samples=8",
            "probe.val_samples=8",
            "probe.k=3",
        ],
    )
    start = time.process_time()
    pretrain(cfg, batches=batches)
    return time.process_time() - start


def time_bare(args: argparse.Namespace, task: str, shards: Path, batches: list[dict[str, Any]]) -> float:
    """CPU seconds per step of forward/backward/AdamW step on the same model, over the second half of 2 x steps."""
    import torch
    from accelerate.utils import set_seed

    from radpretrain.models.encoders import build_encoder

    set_seed(0)  # the tool's initial weights too
    encoder = build_encoder(args.encoder, img_size=args.size)
    objective = build_task(task, encoder, shards)
    params = [*encoder.parameters(), *objective.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    encoder.train()
    objective.train()
    start = 0.0
    for step in range(2 * args.steps):
        if step == args.steps:
            start = time.process_time()
        loss = objective(encoder, batches[step % len(batches)])["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        objective.after_step(encoder, step + 1, 2 * args.steps)  # momentum updates: part of BYOL/MoCo/DINO
        loss.item()  # a bare loop looks at its loss too (and CUDA would sync here)
    return (time.process_time() - start) / args.steps


def report(args: argparse.Namespace, rows: list[tuple[str, float, float, float]]) -> None:
    """One markdown row per task: (task, tool s/step, bare s/step, median paired ratio)."""
    import torch

    print()
    print(
        f"Training step, {args.encoder} at {args.size} px, batch {args.batch}, AdamW, "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU, 1 thread'}; median of {args.rounds} rounds of "
        f"{args.steps} timed steps (load average {os.getloadavg()[0]:.1f}):"
    )
    print()
    print("| task | bare PyTorch + lightly, CPU ms / step | radpretrain, CPU ms / step | overhead | target | met |")
    print("|---|---|---|---|---|---|")
    for task, tool, bare, ratio in rows:
        overhead = ratio - 1.0
        ok = "yes" if overhead <= TARGET_OVERHEAD else "no"
        print(f"| {task} | {bare * 1000:.1f} | {tool * 1000:.1f} | {overhead:+.1%} | <= {TARGET_OVERHEAD:.0%} | {ok} |")


if __name__ == "__main__":
    raise SystemExit(main())
