"""Training-step overhead of `radpretrain pretrain` against a bare PyTorch + lightly loop, measured side by side.

    python bench/step.py            # resnet18, 64 px, batch 32, SimCLR: 5 rounds of 8 timed steps
    python bench/step.py --quick    # 2 rounds of 3 timed steps

Both contenders train the same model (radpretrain's `build_encoder` + its `simclr` task, i.e. lightly's
SimCLR projection head and NT-Xent loss) from the same initial weights on the same batches, already in
memory, with AdamW. The tool runs its whole loop (`radpretrain.pretrain.loop.pretrain` with the batches
given in memory): Accelerate, lr schedule, gradient clipping, the NaN guard's per-step reduction, logging,
progress bar. The bare loop is forward, backward, step.

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (64)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (32)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round (8)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (5)")
    parser.add_argument("--quick", action="store_true", help="4 steps, 2 rounds")
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
        batches = make_batches(args.batch, args.size, count=4)
        run_tool(args, shards, batches, workdir / "warm-up", 1)  # imports and first allocations
        tool, bare = [], []
        for round_ in range(args.rounds):
            whole = run_tool(args, shards, batches, workdir / f"run{round_}-long", 2 * args.steps)
            part = run_tool(args, shards, batches, workdir / f"run{round_}-short", args.steps)
            tool.append((whole - part) / args.steps)
            bare.append(time_bare(args, shards, batches))
            print(f"round {round_ + 1}: tool {tool[-1] * 1000:.0f}, bare {bare[-1] * 1000:.0f} CPU ms/step", flush=True)
        ratio = statistics.median(t / b for t, b in zip(tool, bare, strict=True))  # paired within a round
        report(args, statistics.median(tool), statistics.median(bare), ratio)
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


def make_batches(batch: int, size: int, count: int) -> list[dict[str, Any]]:
    import torch

    gen = torch.Generator().manual_seed(0)
    labels = {name: torch.zeros(batch, dtype=torch.long) for name in ("body_part", "age_bucket", "sex", "view")}
    return [
        {
            "view0": torch.randn(batch, 1, size, size, generator=gen),
            "view1": torch.randn(batch, 1, size, size, generator=gen),
            **labels,
        }
        for _ in range(count)
    ]


def run_tool(args: argparse.Namespace, shards: Path, batches: list[dict[str, Any]], run: Path, steps: int) -> float:
    """CPU seconds of a whole `pretrain` run of `steps` steps on the in-memory batches."""
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
            "tasks={simclr: 1.0}",
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


def time_bare(args: argparse.Namespace, shards: Path, batches: list[dict[str, Any]]) -> float:
    """CPU seconds per step of forward/backward/AdamW step on the same model, over the second half of 2 x steps."""
    import torch
    from accelerate.utils import set_seed

    from radpretrain.models.encoders import build_encoder
    from radpretrain.pretrain.tasks import build_objective
    from radpretrain.shards.format import ShardSet

    set_seed(0)  # the tool's initial weights too
    encoder = build_encoder(args.encoder, img_size=args.size)
    objective = build_objective(encoder, {"simclr": 1.0}, {}, ShardSet.open(shards).manifest["vocab"])
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
        loss.item()  # a bare loop looks at its loss too (and CUDA would sync here)
    return (time.process_time() - start) / args.steps


def report(args: argparse.Namespace, tool: float, bare: float, ratio: float) -> None:
    import torch

    overhead = ratio - 1.0
    ok = "yes" if overhead <= TARGET_OVERHEAD else "no"
    print()
    print(
        f"Training step, {args.encoder} at {args.size} px, batch {args.batch}, SimCLR, AdamW, "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU, 1 thread'}; median of {args.rounds} rounds of "
        f"{args.steps} timed steps (load average {os.getloadavg()[0]:.1f}):"
    )
    print()
    print("| contender | CPU ms / step | overhead vs bare | target | met |")
    print("|---|---|---|---|---|")
    print(f"| bare PyTorch + lightly loop | {bare * 1000:.1f} | - | - | - |")
    print(f"| radpretrain pretrain loop | {tool * 1000:.1f} | {overhead:+.1%} | <= {TARGET_OVERHEAD:.0%} | {ok} |")


if __name__ == "__main__":
    raise SystemExit(main())
