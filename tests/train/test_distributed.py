"""torchrun with 2 CPU processes (gloo) equals one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trustmoe
from trustmoe.train import train

pytestmark = pytest.mark.slow

ARGS = {"batch_size": 2, "seq_len": 32, "eval_every": 2, "eval_batches": 1, "warmup_steps": 2}


def test_two_process_data_parallel_equals_single_process(tiny_data_dir: Path,
                                                         tmp_path: Path) -> None:
    ddp_out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trustmoe.train", "--data", str(tiny_data_dir), "--out", str(ddp_out),
           "--preset", "tiny", "--max-steps", "4", "--batch-size", "2", "--seq-len", "32",
           "--eval-every", "2", "--warmup-steps", "2", "--quiet", "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((ddp_out / "trustmoe.json").read_text())
    assert meta["world_size"] == 2

    # one process, same global batch: 2 micro-batches of 2 sequences (= 2 ranks x 2)
    single = train(tiny_data_dir, tmp_path / "single", "tiny", max_steps=4,
                   overrides=dict(ARGS, eval_batches=1, grad_accum=2), progress=False)
    ddp_losses = [json.loads(x)["loss"]
                  for x in (ddp_out / "metrics.jsonl").read_text().splitlines()]
    assert ddp_losses == pytest.approx(single.losses, abs=1e-5)
    a = trustmoe.load(ddp_out).state_dict()
    b = trustmoe.load(tmp_path / "single").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
