"""One real gloo rank running CFG-parallel steps of the synthetic denoiser.

Started once per rank by tests/distributed/test_cfg_branches.py with RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT set:  python cfg_rank_main.py RESULT_DIR CFG SCENARIO TIMEOUT_S
Writes RESULT_DIR/rank-N.json with what it saw.

Scenarios:
  steps  every branch count 1..4, batched and not; a branch that raises on one rank
  hang   cfg rank 1 of group 0 stops answering (sleeps past the timeout) before a step
  die    cfg rank 1 of group 0 exits mid-run
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from parallel.cfg_group import CollectiveError, GroupAborted
from parallel.dims import ParallelDims
from parallel.executors import CfgParallelExecutor
from parallel.group import cfg_group, init_ranks
from parallel.platform import detect_platform
from tests.synthetic import Predictor, make_branches, serial_predictions


def _steps(executor: CfgParallelExecutor, report: dict) -> None:
    for n in (1, 2, 3, 4):
        expected = serial_predictions(n)
        for batched in (False, True):
            executor.batched = batched
            predictor = Predictor()
            preds = executor.run(make_branches(n), predictor)
            one_per_forward = not batched or len(predictor.calls) <= 1
            report[f"n{n}-{'batched' if batched else 'separate'}"] = {
                "exact": all(torch.equal(p, e) for p, e in zip(preds, expected)),
                "close": all(torch.allclose(p, e, atol=1e-6) for p, e in zip(preds, expected)),
                "one_per_forward": one_per_forward,
                "forward_batches": predictor.calls,
            }
    # A branch forward raising on cfg rank 1 (step 2 of 3): every rank aborts there, then goes on.
    executor.batched = True
    predictor = Predictor(fail_on=2 if executor.group.rank == 1 else None)
    outcomes = []
    for _ in range(3):
        try:
            executor.run(make_branches(2), predictor)
            outcomes.append("ok")
        except GroupAborted as exc:
            outcomes.append(str(exc))
    report["failure"] = outcomes


def main() -> None:
    result_dir, cfg, scenario, timeout_s = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    init_ranks(rank=rank, world_size=world, platform=detect_platform(), timeout_s=timeout_s)
    dims = ParallelDims(dp=-1, cfg=cfg, world_size=world)
    group = cfg_group(dims, rank, device=torch.device("cpu"), timeout_s=timeout_s)
    executor = CfgParallelExecutor(group, batched=True)
    report: dict = {"rank": rank, "cfg_rank": group.rank, "group_size": group.size}
    out = Path(result_dir) / f"rank-{rank}.json"
    culprit = dims.coords(rank) == (0, 1)
    if scenario == "steps":
        _steps(executor, report)
    else:
        executor.run(make_branches(2), Predictor())  # one good step first
        if culprit and scenario == "die":
            out.write_text(json.dumps({**report, "died": True}))
            os._exit(1)
        if culprit and scenario == "hang":
            out.write_text(json.dumps({**report, "hung": True}))
            time.sleep(3 * timeout_s)
            os._exit(0)
        start = time.monotonic()
        try:
            for _ in range(1000):
                executor.run(make_branches(2), Predictor())
            report["error"] = None
        except CollectiveError as exc:
            report["error"] = str(exc)
        report["failed_after_s"] = time.monotonic() - start
    out.write_text(json.dumps(report))
    if scenario != "steps":
        os._exit(0)  # the group is broken: no orderly shutdown
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
