"""Run by torchrun in the reader tests: each gloo process reads shard sets through a DataLoader with workers and
rank 0 writes which reader (process, worker) saw which key in each pass: `read_keys.py OUT.json CASES.json`."""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from radpretrain.shards.reader import build_pipeline, prepare_worker_sockets

WORKERS = 2
PASSES = 2


def key_and_reader(sample: dict[str, Any]) -> tuple[str, int]:
    info = torch.utils.data.get_worker_info()
    return str(sample["key"]), info.id if info is not None else 0


def main(out: str, cases: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    prepare_worker_sockets()
    results = []
    with open(cases) as handle:
        todo = json.load(handle)
    for case in todo:
        pipeline = build_pipeline(case["urls"], shuffle=case["shuffle"], seed=3, map_fn=key_and_reader)
        loader = DataLoader(pipeline, batch_size=None, num_workers=WORKERS)
        passes = []
        for _ in range(PASSES):
            mine = [(key, f"{rank}:{worker}") for key, worker in loader]
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
            passes.append([pair for part in gathered for pair in part])
        results.append(passes)
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(results, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
