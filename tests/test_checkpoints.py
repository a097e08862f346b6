"""checkpoints.py: a training run's folder, and how a run stops early without losing anything. Each fault is injected on
purpose through the real code paths: kill -9 during a save and at every filesystem step of one, NaN in the loss or a
gradient, weights that turn infinite, a full disk (and a real one: a small tmpfs), SIGTERM and SIGINT (to `python
quickstart.py train` and to one rank of a torchrun job), a second signal, a rank killed or hung. Each test checks the
message, the exit status, that `latest` loads and that no checkpoint holds non-finite weights, and that --resume
continues the loss curve of the run that was not interrupted."""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import checkpoints
import diffusion
import quickstart
import sigma
import weights
from test_train import REPO, TINY_DIT, max_diff, run_args, snapshot, tiny  # noqa: F401 (tiny: a fixture)


def losses(run):
    """A run's log.jsonl -> {step: loss}."""
    return {r["step"]: r["loss"] for r in map(json.loads, open(run / "log.jsonl"))}


def latest_step(run):
    """Asserts that every checkpoint of the run holds finite weights (model and EMA) and that `latest` loads, with
    its trainer state -> the step of `latest`."""
    for file in run.glob("step_*/*.safetensors"):
        assert all(t.isfinite().all() for t in load_file(str(file)).values()), file
    latest = weights.latest_checkpoint(str(run))
    weights.load_checkpoint(os.path.join(latest, "model.safetensors"))
    step = torch.load(os.path.join(latest, "trainer.pt"), weights_only=True)["step"]
    assert os.path.basename(latest) == f"step_{step:07d}"
    return step


def said(err, prog="train.py"):
    """The lines of the run's messages on stderr (the progress bar's are not lines of their own); they name the command
    that was run: train.py when train.main is called from here, quickstart.py in a subprocess of it."""
    return [line for line in re.sub(r"\r|\x1b\[A", "\n", err).splitlines() if line.startswith(f"{prog}: ")]


def fast(out, *extra):
    """run_args, and no preview at the end (seconds of sampling that these tests do not look at)."""
    return run_args(out, "--preview-every", 0, *extra)


def wait_for(condition, seconds=120):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def logged(run, steps):
    """Whether the run's log.jsonl holds `steps` lines."""
    return (run / "log.jsonl").exists() and len((run / "log.jsonl").read_text().splitlines()) >= steps


# ---------------------------------------------------------------------------------------------- kill -9 and torn saves
def test_resume_after_a_kill_logs_each_step_once(tmp_path, tiny, capsys):
    """Killed after logging step 3 (and half of step 4's line) but before saving it: --resume trains 3 again from the
    step-2 checkpoint, and log.jsonl is cut back to step 2 first, so it reads as one run, equal to a straight one."""
    quickstart.train(run_args(tmp_path / "a", "--steps", 4))
    run = tmp_path / "b"
    quickstart.train(run_args(run, "--steps", 3, "--save-every", 2))
    shutil.rmtree(run / "step_0000003")
    (run / "latest").write_text("step_0000002")
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    capsys.readouterr()
    quickstart.train(run_args(run, "--steps", 4, "--resume"))
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    ref = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and [r["loss"] for r in log] == [r["loss"] for r in ref]
    out = capsys.readouterr().out  # where the run goes at the start; how to use it at the end
    assert f"train.py: run folder {run}: a checkpoint every 1000 steps and at step 4" in out
    assert f'python sample.py --model {run} "a red circle on a blue background"' in out
    assert f"python quickstart.py score {run}" in out


def test_interrupted_save_keeps_last_checkpoint(tmp_path, tiny, monkeypatch):
    quickstart.train(run_args(tmp_path, "--steps", 2, "--save-every", 2))
    good = snapshot(weights.load_checkpoint(str(tmp_path / "step_0000002" / "model.safetensors")))

    def broken_save(obj, file):  # dies half-way through writing the trainer state
        file.write(b"half a file")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(checkpoints.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        quickstart.train(run_args(tmp_path, "--steps", 4, "--save-every", 2, "--resume"))
    monkeypatch.undo()
    assert open(tmp_path / "latest").read() == "step_0000002"
    latest = weights.latest_checkpoint(str(tmp_path))
    assert max_diff(good, snapshot(weights.load_checkpoint(os.path.join(latest, "model.safetensors")))) == 0
    assert torch.load(os.path.join(latest, "trainer.pt"), weights_only=True)["step"] == 2
    quickstart.train(run_args(tmp_path, "--steps", 3, "--resume"))  # the leftover temp folder is no obstacle
    assert open(tmp_path / "latest").read() == "step_0000003"
    # killed between renaming step_0000004 into place and moving `latest` to it: the resumed run redoes the step
    # and its save replaces that folder, and `latest` moves on
    os.makedirs(tmp_path / "step_0000004")
    quickstart.train(run_args(tmp_path, "--steps", 4, "--resume"))
    assert open(tmp_path / "latest").read() == "step_0000004"
    assert torch.load(tmp_path / "step_0000004" / "trainer.pt", weights_only=True)["step"] == 4


class CrashAt:
    """Makes the n-th filesystem operation of checkpoints.save_state fail (n = None: count them): os.replace, os.makedirs
    and shutil.rmtree raise before acting (rmtree after removing one file), file writes (open for writing,
    torch.save, safetensors' save_file) leave a torn file behind, as a kill -9 at that moment would."""

    def __init__(self, monkeypatch, n=None):
        import builtins
        self.n, self.calls = n, []
        wrap = lambda name, fn, torn: lambda *a, **k: self.step(name, fn, torn, *a, **k)
        for module, name, torn in [(os, "replace", None), (os, "makedirs", None), (shutil, "rmtree", "rmtree"),
                                   (torch, "save", 1), (weights, "save_file", 1)]:  # weights.py writes the safetensors
            monkeypatch.setattr(module, name, wrap(name, getattr(module, name), torn))
        monkeypatch.setattr(checkpoints, "open", wrap("open", builtins.open, 0), raising=False)  # its own writes

    def step(self, name, fn, torn, *args, **kwargs):
        if name == "open" and "w" not in (args[1] if len(args) > 1 else kwargs.get("mode", "r")):
            return fn(*args, **kwargs)  # reading `latest` is no filesystem change
        self.calls.append(name)
        if self.n is not None and len(self.calls) - 1 == self.n:
            if torn == "rmtree":  # half-deleted: one file gone
                for d, _, files in os.walk(args[0]):
                    if files:
                        os.remove(os.path.join(d, files[0]))
                        break
            elif torn is not None and hasattr(args[torn], "write"):  # torch.save into an open file
                args[torn].write(b"torn")
            elif torn is not None:  # a torn file at the path argument of open / save_file
                with open(args[torn], "wb") as f:
                    f.write(b"torn")
            raise KeyboardInterrupt(f"killed at {name} (filesystem step {self.n})")
        return fn(*args, **kwargs)


def test_save_state_crash_at_every_filesystem_step_keeps_latest_loadable(tmp_path, monkeypatch):
    """A checkpoint of step 1 exists; saving step 2 (keep=1: step 1 is deleted after) dies at filesystem step n,
    for every n: `latest` must name a complete checkpoint (model, EMA, trainer state of one step), and the
    save redone afterwards must complete."""
    cfg = sigma.SigmaConfig(depth=1, hidden_size=32, num_heads=2, caption_channels=8, caption_tokens=4, sample_size=8)
    models = {s: sigma.PixArtSigma(cfg) for s in (1, 2)}  # different random weights per step
    opt = torch.optim.AdamW(models[1].parameters())

    def save(out, step):
        return checkpoints.save_state(str(out), step, models[step], models[step], opt, dict(global_batch=1), keep=1)

    def check_latest(out):
        latest = weights.latest_checkpoint(str(out))
        step = int(os.path.basename(latest).split("_")[1])
        for name in ("model", "ema"):
            loaded = weights.load_checkpoint(os.path.join(latest, f"{name}.safetensors")).state_dict()
            assert max_diff(loaded, snapshot(models[step])) == 0, (latest, name)
        assert torch.load(os.path.join(latest, "trainer.pt"), weights_only=True)["step"] == step
        return step

    save(tmp_path / "count", 1)
    counter = CrashAt(monkeypatch)
    save(tmp_path / "count", 2)
    monkeypatch.undo()
    assert len(counter.calls) >= 8 and {"replace", "open", "save", "save_file", "rmtree"} <= set(counter.calls)
    survivors = []
    for n in range(len(counter.calls)):
        out = tmp_path / f"crash{n}"
        save(out, 1)
        CrashAt(monkeypatch, n)
        with pytest.raises(KeyboardInterrupt):
            save(out, 2)
        monkeypatch.undo()
        survivors.append(check_latest(out))
        save(out, 2)  # the resumed run redoes the step and saves it again
        assert check_latest(out) == 2 and sorted(d for d in os.listdir(out) if d.startswith("step_")) == ["step_0000002"]
    assert survivors[0] == 1 and survivors[-1] == 2  # crashes before and after `latest` moved were both tried


def test_kill_9_never_corrupts_latest(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(REPO, "quickstart.py"), "train", *run_args(tmp_path, "--steps", 10_000, "--save-every", 1,
                                                                       "--keep", 2)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "step_0000003").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.37)  # somewhere in the middle of later steps and saves
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    latest = weights.latest_checkpoint(str(tmp_path))
    assert latest is not None
    model = weights.load_checkpoint(os.path.join(latest, "model.safetensors"))
    state = torch.load(os.path.join(latest, "trainer.pt"), weights_only=True)
    assert state["step"] == int(os.path.basename(latest).split("_")[1]) >= 3 and model.config.depth == quickstart.DIT["depth"]


# ---------------------------------------------------------------------------------------------- divergence
@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_steps_are_skipped_and_too_many_stop_the_run(tmp_path, tiny, monkeypatch, capsys, where):
    """NaN in the loss (or an inf in one gradient) at chosen steps: such a step changes nothing (its checkpoint equals
    the one before: weights, EMA and optimizer state), and is said and counted; the third in a row stops the run with
    one line naming its last good checkpoint and what to change, exit status 1; --resume from there continues as the
    run that skipped the same steps."""
    bad, calls = set(), []
    if where == "loss":
        def training_losses(*args, real=diffusion.training_losses):
            out = real(*args)
            calls.append(1)
            out["loss"] = out["loss"] * (float("nan") if len(calls) in bad else 1)
            return out
        monkeypatch.setattr(diffusion, "training_losses", training_losses)
    else:
        def clip_grad_norm_(params, max_norm, real=torch.nn.utils.clip_grad_norm_):
            params = [p for p in params if p.grad is not None]
            calls.append(1)
            if len(calls) in bad:
                params[0].grad.view(-1)[0] = float("inf")
            return real(params, max_norm)
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_grad_norm_)
    ref, run = tmp_path / "ref", tmp_path / "run"
    bad |= {3, 4}
    quickstart.train(fast(ref, "--steps", 5, "--save-every", 1, "--keep", 0, "--max-nonfinite", 3))
    for step in (3, 4):  # skipped: nothing changed
        for name in ("model", "ema"):
            assert max_diff(*(load_file(str(ref / f"step_000000{s}" / f"{name}.safetensors")) for s in (2, step))) == 0
        before, after = (torch.load(ref / f"step_000000{s}" / "trainer.pt", weights_only=True)["optimizer"] for s in (2, step))
        assert all(torch.equal(before["state"][i][k], after["state"][i][k]) for i in before["state"] for k in before["state"][i])
    log = [json.loads(line) for line in open(ref / "log.jsonl")]
    assert [r["skipped_steps"] for r in log] == [0, 0, 1, 2, 2]
    lines = said(capsys.readouterr().err)
    assert lines[0].startswith("train.py: step 3: loss ") and lines[0].endswith(
        ": skipped, nothing updated (1 in a row; --max-nonfinite 3 stops the run)")
    assert ("loss nan, gradient norm nan" if where == "loss" else "gradient norm inf") in lines[0]
    calls.clear()
    bad |= {5}
    with pytest.raises(SystemExit) as stopped:
        quickstart.train(fast(run, "--steps", 8, "--save-every", 2, "--max-nonfinite", 3))
    assert stopped.value.code == 1
    line = said(capsys.readouterr().err)[-1]
    assert line.startswith("train.py: step 5: 3 steps in a row with a non-finite loss or gradient (loss ") and \
        line.endswith(f"), each skipped: training stops; the last good checkpoint is {run / 'step_0000004'}: --resume "
                      "it with a lower --lr (now 0.001) or --clip (now 1)")
    assert latest_step(run) == 4
    calls.clear()
    bad.clear()
    quickstart.train(fast(run, "--steps", 5, "--resume"))
    assert losses(run)[5] == losses(ref)[5]


def test_weights_that_are_not_finite_are_never_saved(tmp_path, tiny, monkeypatch, capsys):
    """An optimizer step that leaves an inf in the weights (at step 4; its loss and gradient finite): the save of step
    4 is refused with one line, exit status 1, so --keep 2 deletes no finite checkpoint to make room for it; --resume
    continues from step 3 as the run did."""
    real, steps = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 4:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        quickstart.train(fast(run, "--steps", 6, "--save-every", 1, "--keep", 2))
    assert stopped.value.code == 1
    line = said(capsys.readouterr().err)[-1]
    assert line.startswith("train.py: step 4: the weights are not finite (") and line.endswith(
        f"), so they are not saved; the last good checkpoint is {run / 'step_0000003'}: --resume it with "
        "a lower --lr (now 0.001) or --clip (now 1)")
    assert sorted(os.listdir(run)) == ["latest", "log.jsonl", "sample.json", "step_0000002", "step_0000003",
                                       "text_encoder", "tokenizer", "vae"]
    assert latest_step(run) == 3
    monkeypatch.setattr(torch.optim.AdamW, "step", real)
    quickstart.train(fast(run, "--steps", 4, "--resume"))
    quickstart.train(fast(tmp_path / "straight", "--steps", 4))
    assert losses(run)[4] == losses(tmp_path / "straight")[4]


# ---------------------------------------------------------------------------------------------- a full disk
class FullDisk:
    """A file open for writing whose writes fail as on a full disk once 100 bytes are written."""

    def __init__(self, file):
        self.file, self.room = file, 100

    def write(self, data):
        if len(data) > self.room:
            self.file.write(bytes(data[:self.room]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def flush(self):
        self.file.flush()

    def __enter__(self):
        return self

    def __exit__(self, *error):
        self.file.close()


@pytest.mark.parametrize("file", ["model.safetensors", "trainer.pt"])
def test_a_full_disk_stops_the_run_and_keeps_latest(tmp_path, tiny, monkeypatch, capsys, file):
    """ENOSPC while step 4 is saved, in safetensors' writer (its own error, 'os error 28' in the message) or under
    torch.save (a RuntimeError raised over the OSError of a write): one line naming the run folder and the errno's
    meaning, exit status 1, the temporary folder gone, `latest` still at step 2; --resume then continues from it."""
    run, full = tmp_path / "run", []
    if file == "model.safetensors":
        def save_file(tensors, path, metadata=None, real=weights.save_file):
            if not full:
                return real(tensors, path, metadata=metadata)
            open(path, "wb").write(b"half a file")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(weights, "save_file", save_file)
    else:
        def open_(path, mode="r", *args, real=open, **kwargs):
            f = real(path, mode, *args, **kwargs)
            return FullDisk(f) if full and str(path).endswith("trainer.pt") else f
        monkeypatch.setattr(checkpoints, "open", open_, raising=False)
    quickstart.train(fast(run, "--steps", 2))
    full.append(True)
    with pytest.raises(SystemExit) as stopped:
        quickstart.train(fast(run, "--steps", 6, "--save-every", 2, "--resume"))
    where = run / ".step_0000004.tmp" / file if file.endswith("safetensors") else run / "step_0000004"
    assert stopped.value.code == 1 and said(capsys.readouterr().err) == [
        f"train.py: cannot save step 4 in {run}: No space left on device (ENOSPC, {where}); nothing of the step was "
        f"kept and 'latest' still names {run / 'step_0000002'}: make room (or fix the folder), then continue with --resume"]
    assert not [name for name in os.listdir(run) if name.startswith(".") or name == "step_0000004"]
    assert latest_step(run) == 2
    full.clear()
    quickstart.train(fast(run, "--steps", 3, "--resume"))
    quickstart.train(fast(tmp_path / "straight", "--steps", 3))
    assert losses(run)[3] == losses(tmp_path / "straight")[3]


def test_a_real_full_disk(tmp_path, one_thread):
    """The same on a real full disk, where the machine lets a user mount one (a small tmpfs in a user and mount
    namespace): `python quickstart.py train --resume` runs out of space while it saves step 4, through the real
    safetensors and torch.save writers; one line, exit status 1, nothing of step 4 left, `latest` at step 2."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no user namespaces here: unshare -rm fails")
    run = tmp_path / "run"
    quickstart.train(fast(run, "--steps", 2))
    size = lambda path: sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    room = (size(run) + size(run / "step_0000002") // 2) // 1024  # KiB: the run, and half a checkpoint more
    disk = tmp_path / "disk"
    disk.mkdir()
    command = " ".join(map(str, [sys.executable, os.path.join(REPO, "quickstart.py"), "train",
                                 *fast(disk / "run", "--steps", 6, "--save-every", 2, "--resume")]))
    done = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={room}k tmpfs {disk} && "
                           f"cp -r {run} {disk} && {command}; echo status $?; ls -a {disk / 'run'}; cat {disk / 'run/latest'}"],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    lines, latest = said(done.stderr, "quickstart.py"), disk / "run" / "step_0000002"
    assert len(lines) == 1 and lines[0].startswith(f"quickstart.py: cannot save step 4 in {disk / 'run'}: No space left on "
                                                   "device (ENOSPC, "), done.stderr[-3000:]
    assert lines[0].endswith(f"nothing of the step was kept and 'latest' still names {latest}: make room (or fix the "
                             "folder), then continue with --resume")
    assert "Traceback" not in done.stderr and "status 1\n" in done.stdout
    listing = done.stdout.split("status 1\n")[1].split()
    assert listing[-1] == "step_0000002" and "step_0000004" not in listing and not [n for n in listing if n.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------- signals
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_the_step_under_way(tmp_path, one_thread, sig):
    """SIGTERM (a scheduler, Kubernetes, torchrun) or SIGINT (Ctrl-C) to `python quickstart.py train`: the step under
    way finishes and is saved, one line says where, no traceback, exit status 128 + the signal's number; --resume
    continues the loss curve at the next step as the run would have."""
    run = tmp_path / "run"
    with open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, "quickstart.py"), "train",
                                 *fast(run, "--steps", 10_000)], env=dict(os.environ, OMP_NUM_THREADS="1"),
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_for(lambda: logged(run, 3))
        finally:
            proc.send_signal(sig)
            proc.wait(timeout=60)
    err = (tmp_path / "err").read_text()
    assert proc.returncode == 128 + sig and "Traceback" not in err, err[-3000:]
    step = latest_step(run)
    first = (f"quickstart.py: {sig.name}: the step under way finishes and is saved, then training stops (send it again "
             "to stop at once, unsaved)")
    last = f"quickstart.py: {sig.name}: stopped after step {step}, saved in {run / f'step_{step:07d}'}; continue with --resume"
    assert said(err, "quickstart.py") == [first, last]  # named as the user ran it: quickstart.py, not train.py
    assert err.split(first)[1] == f"\n{last}\n", err[-3000:]  # and the progress bar is not drawn again between or after
    quickstart.train(fast(run, "--steps", step + 1, "--resume"))
    quickstart.train(fast(tmp_path / "straight", "--steps", step + 1))
    assert losses(run)[step + 1] == losses(tmp_path / "straight")[step + 1]


def test_a_second_signal_stops_at_once(tmp_path):
    """A save that takes long (slowed here: a large checkpoint, a slow disk) after SIGTERM; a second SIGTERM ends the
    process at once, unsaved, by the signal's default action; the checkpoint before it is intact."""
    run, worker = tmp_path / "run", tmp_path / "worker.py"
    worker.write_text(f"import sys, time\nsys.path.insert(0, {REPO!r})\nimport checkpoints, quickstart\n"
                      f"quickstart.DIT.update({TINY_DIT!r})\nsave_state = checkpoints.save_state\n"
                      "def slow(out, step, *args):\n    time.sleep(60 if step > 2 else 0)\n"
                      "    return save_state(out, step, *args)\n"
                      "checkpoints.save_state = slow\nquickstart.train(sys.argv[1:])\n")
    proc = subprocess.Popen([sys.executable, str(worker), *fast(run, "--steps", 10_000, "--save-every", 2)],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: logged(run, 3))
        proc.send_signal(signal.SIGTERM)
        time.sleep(1)
        start = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM and time.time() - start < 5
    assert latest_step(run) == 2


# ---------------------------------------------------------------------------------------------- torchrun
def torchrun(tmp_path, free_port, *flags, nan_step=0):
    """2 gloo ranks of the quick start (tiny DiT) under torchrun, each writing its pid to tmp_path/rank<N>; rank 1's
    loss is NaN at step nan_step. -> (the process, the file its output goes to)."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        f"import os, sys\nsys.path.insert(0, {REPO!r})\nimport diffusion, quickstart\nquickstart.DIT.update({TINY_DIT!r})\n"
        f"rank = int(os.environ['RANK'])\nopen({str(tmp_path)!r} + f'/rank{{rank}}', 'w').write(str(os.getpid()))\n"
        "def training_losses(*args, calls=[], real=diffusion.training_losses):\n    out = real(*args)\n"
        f"    calls.append(1)\n    if rank == 1 and len(calls) == {nan_step}:\n        out['loss'] = out['loss'] * float('nan')\n"
        "    return out\ndiffusion.training_losses = training_losses\nquickstart.train(sys.argv[1:])\n")
    output = open(tmp_path / "output", "w")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             free_port, str(worker), *fast(tmp_path / "run", "--batch-size", 2, *flags)],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=output, stderr=subprocess.STDOUT)
    return proc, tmp_path / "output"


def pid(tmp_path, rank):
    return int((tmp_path / f"rank{rank}").read_text())


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def end(proc, tmp_path):
    """torchrun and its workers, killed if still there (they run in sessions of their own): a failed test leaves none."""
    proc.kill()
    for rank in (0, 1):
        if (tmp_path / f"rank{rank}").exists() and alive(pid(tmp_path, rank)):
            os.kill(pid(tmp_path, rank), signal.SIGKILL)
    proc.wait()


def test_torchrun_a_signal_to_one_rank_stops_both_after_the_same_step(tmp_path, tiny, monkeypatch, free_port):
    """2 gloo ranks under torchrun. Rank 1 alone has a NaN loss at step 2: both skip it (they decide on the all-reduced
    loss). Then SIGTERM to rank 1 alone (SLURM signals every task and torchrun forwards to every worker; one is the
    strictest case): both stop after the same step, rank 0 saves it and says where; --resume (1 process × batch 4 =
    2 ranks × 2) continues as the run would have."""
    run = tmp_path / "run"
    proc, output = torchrun(tmp_path, free_port, "--steps", 10_000, nan_step=2)
    try:
        wait_for(lambda: logged(run, 4))
        os.kill(pid(tmp_path, 1), signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        end(proc, tmp_path)
    out = output.read_text()
    step = latest_step(run)
    assert f"train.py: SIGTERM: stopped after step {step}, saved in {run / f'step_{step:07d}'}; continue with " \
           "--resume" in out and "exitcode  : 143" in out, out[-3000:]  # rank 1 too, or torchrun's SIGTERM ends it
    assert "train.py: step 2: loss nan, gradient norm nan: skipped, nothing updated" in out
    assert [json.loads(line)["skipped_steps"] for line in open(run / "log.jsonl")][:3] == [0, 1, 1]
    real, calls = diffusion.training_losses, []

    def training_losses(*args):  # the same NaN at step 2, in one process
        out = real(*args)
        calls.append(1)
        out["loss"] = out["loss"] * (float("nan") if len(calls) == 2 else 1)
        return out
    monkeypatch.setattr(diffusion, "training_losses", training_losses)
    quickstart.train(fast(tmp_path / "straight", "--steps", step + 1))
    monkeypatch.setattr(diffusion, "training_losses", real)
    quickstart.train(fast(run, "--steps", step + 1, "--resume"))
    assert losses(run)[step + 1] == pytest.approx(losses(tmp_path / "straight")[step + 1], rel=1e-5)


@pytest.mark.parametrize("fault", ["killed", pytest.param("hung", marks=pytest.mark.slow)])  # hung: waits out an 8 s timeout
def test_torchrun_a_dead_or_hung_rank_stops_the_other(tmp_path, tiny, free_port, fault):
    """kill -9 of rank 1 (or SIGSTOP: a rank that hangs) once step 2 is saved: rank 0 stops with one line instead of
    waiting for ever, at once when the peer's connection drops, after --ddp-timeout (8 s here) when it hangs;
    `latest` loads, and --resume on a new launch (1 process × batch 4 = 2 ranks × 2) continues as the run would have."""
    run = tmp_path / "run"
    proc, output = torchrun(tmp_path, free_port, "--steps", 10_000, "--save-every", 2, "--ddp-timeout", 8)
    try:
        wait_for(lambda: (run / "latest").exists())
        start = time.time()
        os.kill(pid(tmp_path, 1), signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        wait_for(lambda: not alive(pid(tmp_path, 0)), 60)
        took = time.time() - start
    finally:
        end(proc, tmp_path)  # the hung rank: torchrun would wait 30 s for it before it kills it
    out = output.read_text()
    step = latest_step(run)
    assert f"train.py: rank 0: lost contact with the other ranks (" in out, out[-3000:]
    assert f"); the run's last checkpoint is {run / f'step_{step:07d}'}: continue it with --resume on a new launch" in out
    assert took < (10 if fault == "killed" else 25), took
    quickstart.train(fast(run, "--steps", step + 1, "--resume"))
    quickstart.train(fast(tmp_path / "straight", "--steps", step + 1))
    assert losses(run)[step + 1] == pytest.approx(losses(tmp_path / "straight")[step + 1], rel=1e-5)


# ---------------------------------------------------------------------------------------------- the run's flags
def test_resume_continues_the_run_with_its_recorded_flags(tmp_path, tiny, capsys):
    """A run started with --steps 6 --save-every 2 --lr 5e-4 --ema 0.9 and killed after its step-4 checkpoint:
    `quickstart.py train --out X --resume` alone continues it with those flags, step for step as the run that was
    not killed; a flag given again changes that one, and the start line says so; --optimizer cannot change (the
    optimizer state would not load)."""
    run, straight = tmp_path / "run", tmp_path / "straight"
    final = snapshot(quickstart.train(run_args(straight, "--steps", 6, "--save-every", 2, "--lr", 5e-4, "--ema", 0.9,
                                               "--preview-every", 0)))
    shutil.copytree(straight, run)
    shutil.rmtree(run / "step_0000006")
    (run / "latest").write_text("step_0000004")  # as a kill during step 6 leaves it
    capsys.readouterr()
    assert max_diff(snapshot(quickstart.train(["--out", str(run), "--resume"])), final) == 0
    out = capsys.readouterr().out
    assert f"train.py: --resume: {run} continues from step_0000004 with its recorded flags\n" in out
    assert f"train.py: run folder {run}: a checkpoint every 2 steps and at step 6" in out
    log, ref = ([json.loads(line) for line in open(r / "log.jsonl")] for r in (run, straight))
    assert [r["loss"] for r in log] == [r["loss"] for r in ref] and len(log) == 6
    quickstart.train(["--out", str(run), "--resume", "--steps", "7", "--lr", "2.5e-4"])
    assert "continues from step_0000006 with its recorded flags; changed: --steps 6 -> 7, --lr 0.0005 -> 0.00025\n" \
           in capsys.readouterr().out
    with pytest.raises(ValueError, match=f"--optimizer came: the run in {run} was trained with adamw"):
        quickstart.train(["--out", str(run), "--resume", "--steps", "8", "--optimizer", "came"])


def test_resume_no_longer_needs_the_init_it_started_from(tmp_path, tiny):
    """A run started from --init FILE continues its own model: FILE may be gone since (moved, or rotated away by the
    --keep of the run that wrote it), although the recorded flags name it."""
    quickstart.train(fast(tmp_path / "first", "--steps", 2))
    init = tmp_path / "init.safetensors"
    shutil.copy(tmp_path / "first" / "step_0000002" / "model.safetensors", init)
    quickstart.train(fast(tmp_path / "run", "--steps", 2, "--init", init))
    os.remove(init)
    quickstart.train(["--out", str(tmp_path / "run"), "--resume", "--steps", "3"])
    assert latest_step(tmp_path / "run") == 3
