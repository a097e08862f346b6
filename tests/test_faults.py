"""Fault paths with more than one rank (2 gloo ranks under torchrun): a save that rank 0 cannot write stops every rank
after that step with the one line, none left training on towards a collective that never comes."""
import os
import subprocess
import sys

import pytest

from test_checkpoints import alive, fast, latest_step, pid
from test_train import REPO, TINY_DIT


@pytest.mark.slow  # ~15 s: torchrun's start and two processes' imports
def test_torchrun_a_failed_save_on_rank_0_stops_both_ranks(tmp_path, free_port):
    """Rank 0's write of step 2 fails (ENOSPC): rank 0 says so in one line, and rank 1, told by the broadcast, stops
    after the same step with status 1, at once: not on to step 3, where it would wait --ddp-timeout for rank 0 and
    then report lost contact."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        f"import errno, os, sys\nsys.path.insert(0, {REPO!r})\nimport checkpoints, quickstart\n"
        f"quickstart.DIT.update({TINY_DIT!r})\nrank = int(os.environ['RANK'])\n"
        f"open({str(tmp_path)!r} + f'/rank{{rank}}', 'w').write(str(os.getpid()))\n"
        "def save_state(out, step, *args, real=checkpoints.save_state):\n"
        "    if step == 2:\n        raise OSError(errno.ENOSPC, 'No space left on device', out)\n"
        "    return real(out, step, *args)\n"
        "checkpoints.save_state = save_state\nquickstart.train(sys.argv[1:])\n")
    run = tmp_path / "run"
    try:
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                              free_port, str(worker), *fast(run, "--batch-size", 2, "--steps", 6, "--save-every", 1,
                                                            "--ddp-timeout", 30)],
                             env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    finally:
        for rank in (0, 1):
            if (tmp_path / f"rank{rank}").exists() and alive(pid(tmp_path, rank)):
                os.kill(pid(tmp_path, rank), 9)
    out = res.stdout + res.stderr
    lines = [line for line in out.splitlines() if "train.py: " in line and "train.py: run folder" not in line]
    assert lines == [f"train.py: cannot save step 2 in {run}: No space left on device (ENOSPC, {run}); nothing of the "
                     f"step was kept and 'latest' still names {run / 'step_0000001'}: make room (or fix the folder), "
                     "then continue with --resume"], out[-3000:]
    assert res.returncode == 1 and out.count("exitcode  : 1") == 2, out[-3000:]  # both ranks, neither by a timeout
    assert latest_step(run) == 1 and len(open(run / "log.jsonl").readlines()) == 2
