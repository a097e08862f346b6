"""A training run's folder, and how a run stops early without losing what it learned.

    runs/mine/
        latest         the name of the newest complete checkpoint, replaced atomically once that one is written
        step_0001000/  model.safetensors (sample.py loads it), ema.safetensors, trainer.pt (the optimizer state, the
                       step, the data position and the run's flags), preview.png
        log.jsonl      one line per --log-every steps
        sample.json    the components to sample with (save_run_settings)

What a fault does (the README's "When things go wrong"), and where:
- kill -9, a power cut: every file is written under a temporary name and renamed (weights.atomic), `latest` last;
- SIGTERM or SIGINT: the step under way finishes and is saved, then the run stops; a second one ends it at once
  (Interrupts, main);
- a loss or gradient norm that is not finite: train.train_step skips the step; too many in a row stop the run
  (count_skipped, diverged); weights that are not finite are never saved (save);
- a save the file system refuses (disk full, read-only, quota): nothing of the step is kept, `latest` stays (save);
- a rank that dies or hangs: the others stop within --ddp-timeout (Interrupts).
A run that stops early says why in one line and exits with status 128 + the signal's number after a signal (its step
saved; a scheduler may requeue it), 1 otherwise. `--resume` continues from `latest`, with the flags recorded there.
"""
import errno
import json
import os
import shutil
import signal
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm

import hub
import lora
import weights

FIXED = ("optimizer", "controlnet")  # flags --resume may not change: the optimizer state saved would not load
NOT_RECORDED = ("out", "resume")  # where the record is, and the flag that reads it


def program():
    """The command the user ran, which the run's messages name: quickstart.py and weak_to_strong.py run train.main too;
    train.py when train.main is called from elsewhere (a test, a notebook)."""
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.basename(script) if script.endswith(".py") and os.path.dirname(script) == here else "train.py"


def stop(message, code=1, say=True):
    """End the run: `message` on stderr (say=False: not on this rank; rank 0 says it), exit status `code`. A SystemExit:
    no `except Exception` swallows it, and a caller in the same process (the quick start, an experiment) stops too."""
    if message and say:
        tqdm.write(f"{program()}: {message}", file=sys.stderr)
    raise SystemExit(code)


# ---------------------------------------------------------------------------------------------- sample.json
def save_run_settings(out, components, clip_x0=None):
    """out/sample.json: what `sample.py --model <run>` needs besides the weights, so that it takes no flags — the
    local components the run trained with (text_encoder, tokenizer, vae), relative to the run folder when inside it,
    and the x̂0 clipping range it samples with (train.py --clip-x0; None: none)."""
    rel = lambda p: None if p is None else os.path.relpath(p, out) if os.path.abspath(p).startswith(
        os.path.abspath(out) + os.sep) else os.path.abspath(p)
    settings = {k: rel(components.get(k)) for k in ("text_encoder", "tokenizer", "vae")}
    with open(os.path.join(out, "sample.json"), "w") as f:
        json.dump(dict(settings, clip_x0=clip_x0), f)

def run_settings(checkpoint):
    """sample.json of the run a checkpoint belongs to (run/sample.json beside run/step_N/model.safetensors) ->
    dict(text_encoder, tokenizer, vae, clip_x0) with absolute paths, each checked to exist; None when there is none."""
    here = os.path.dirname(os.path.abspath(checkpoint))
    for folder in (here, os.path.dirname(here)):
        path = os.path.join(folder, "sample.json")
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    settings = json.load(f)
            except ValueError as e:
                raise ValueError(f"--model {checkpoint}: {path} is not valid JSON ({e}); delete it and pass the run's "
                                 "components with --components FOLDER") from None
            files = {k: settings.get(k) and os.path.join(folder, settings[k]) for k in ("text_encoder", "tokenizer", "vae")}
            for k, p in files.items():  # absolute paths stay as they are
                if not p or not os.path.exists(p):
                    raise ValueError(f"--model {checkpoint}: the {k} named in {path} is missing ({p}; moved?): pass "
                                     "the components with --components FOLDER")
            return dict(files, clip_x0=settings.get("clip_x0"))
    return None


# ---------------------------------------------------------------------------------------------- stopping early
class Interrupts:
    """What stops a training loop from outside (`with Interrupts(...) as interrupts:` around it):

    - SIGTERM (schedulers, Kubernetes and torchrun send it before a kill) and SIGINT (Ctrl-C) are noted, not obeyed;
      `stop_signal()` at the next step boundary returns the first one on every rank (all-reduced), so all ranks stop
      after the same step, which main saves. The first restores the default action: a second ends the process at once.
    - a collective operation that fails because another rank died or hangs (gloo and NCCL give up after
      --ddp-timeout at the latest): one line, and this process ends at once."""

    def __init__(self, args, rank, world, device, bar=None):
        self.args, self.rank, self.world, self.device, self.received = args, rank, world, device, 0
        self.bar = bar  # the progress bar, silenced once a signal is said: it would be redrawn below that line

    def __enter__(self):
        self.pid = os.getpid()  # DataLoader workers forked later inherit the handler: they leave the stop to us
        self.previous = {s: signal.signal(s, self.note) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def note(self, number, frame):
        if os.getpid() != self.pid:
            return
        self.received = self.received or number
        for s in self.previous:
            signal.signal(s, signal.SIG_DFL)
        if self.rank == 0:  # os.write: print may be in the middle of a write already (the progress bar)
            os.write(2, f"\n{program()}: {signal.Signals(number).name}: the step under way finishes and is saved, then "
                        "training stops (send it again to stop at once, unsaved)\n".encode())
            if self.bar is not None:
                self.bar.disable = True  # tqdm then neither draws nor clears it: the lines that follow stay together

    def stop_signal(self):
        """The number of the signal that any rank received (0: none): every rank gets the same answer at a step."""
        if self.world == 1:
            return self.received
        received = torch.tensor(self.received, device=self.device)
        dist.all_reduce(received, op=dist.ReduceOp.MAX)
        return int(received)

    def __exit__(self, kind, error, trace):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        # gloo and NCCL raise RuntimeErrors that name them; newer torch raises DistError
        if self.world > 1 and (isinstance(error, dist.DistError) or isinstance(error, RuntimeError) and
                               any(name in str(error) for name in ("gloo", "NCCL"))):
            reason = str(error).splitlines()[0].split(". ")[0]  # gloo goes on: "This is typically caused by ..."
            print(f"{program()}: rank {self.rank}: lost contact with the other ranks ({reason}); "
                  f"the run's last checkpoint is {weights.latest_checkpoint(self.args.out) or 'none yet'}: continue "
                  "it with --resume on a new launch", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)  # not SystemExit: the broken process group's destructor would abort or wait


def count_skipped(result, step, in_a_row, args, rank):
    """train.train_step's result -> the steps skipped in a row (their loss or gradient norm not finite), each one said;
    --max-nonfinite of them stop the run (diverged: the last good checkpoint, and what to change)."""
    if result.finite:
        return 0
    loss, in_a_row = (result.sums[0] / result.sums[3]).item(), in_a_row + 1
    what = f"loss {loss:g}, gradient norm {result.grad_norm.item():g}"
    if in_a_row >= args.max_nonfinite:
        diverged(args, step, f"{in_a_row} steps in a row with a non-finite loss or gradient ({what}), each skipped: "
                 "training stops", rank)
    if rank == 0:
        tqdm.write(f"{program()}: step {step}: {what}: skipped, nothing updated ({in_a_row} in a row; "
                   f"--max-nonfinite {args.max_nonfinite} stops the run)", file=sys.stderr)
    return in_a_row


def diverged(args, step, what, rank):
    """Stop a run whose numbers are no longer finite, naming its last good checkpoint and what to change."""
    latest = weights.latest_checkpoint(args.out)
    then = f"the last good checkpoint is {latest}: --resume it" if latest else "no checkpoint yet: start again"
    fp32 = ", or in float32 (without --bf16)" if args.bf16 else ""
    stop(f"step {step}: {what}; {then} with a lower --lr (now {args.lr:g}) or --clip (now {args.clip:g}){fp32}",
         say=rank == 0)


# ---------------------------------------------------------------------------------------------- checkpoints
def save(args, step, model, ema, opt, state, rank, world, device):
    """The checkpoint of `step`, written by rank 0 (save_state) -> its folder. Weights that are not finite are never
    written, so --keep never deletes a good checkpoint to make room for them; a write the file system refuses (disk
    full, read-only, quota) keeps nothing of the step and leaves `latest` as it was. Either stops the run on every
    rank: all hold the same weights, and all learn whether rank 0 could write."""
    for name, tensor in ((k, v) for m in (model, ema) if m is not None for k, v in m.state_dict().items()):
        if not tensor.isfinite().all():
            diverged(args, step, f"the weights are not finite ({name}), so they are not saved", rank)
    failed, reason = torch.tensor(0, device=device), None
    if rank == 0:
        try:
            save_state(args.out, step, model, ema, opt, dict(state, args=json.dumps(vars(args))), args.keep)
        except OSError as e:  # weights.atomic has removed what was written of the step
            failed += 1
            reason = (f"cannot save step {step} in {args.out}: {e.strerror} ({errno.errorcode.get(e.errno, e.errno)}, "
                      f"{e.filename}); nothing of the step was kept and 'latest' still names "
                      f"{weights.latest_checkpoint(args.out) or 'no checkpoint'}: make room (or fix the folder), then "
                      "continue with --resume")
    if world > 1:
        dist.broadcast(failed, 0)
    if failed:
        stop(reason)
    return os.path.join(args.out, f"step_{step:07d}")


def save_state(out, step, model, ema, opt, extra, keep):
    """out/step_XXXXXXX/{model,ema}.safetensors + trainer.pt, written in a temp folder and renamed, then the
    'latest' pointer is replaced atomically: a kill -9 at any moment leaves the previous checkpoint intact."""
    name = f"step_{step:07d}"
    final = os.path.join(out, name)
    shutil.rmtree(final, ignore_errors=True)  # a save that a kill interrupted before `latest` moved to it, now redone
    with weights.atomic(final) as tmp:
        os.makedirs(tmp)
        if hasattr(model, "lora_config"):  # a LoRA run: only the adapter, in PEFT's files (lora.py)
            lora.save(model, tmp)
        elif hasattr(model, "controlnet"):  # a ControlNet run: only the copies (sample.py --controlnet RUN)
            weights.save_controlnet(model, os.path.join(tmp, "controlnet.safetensors"))
        else:
            weights.save_checkpoint(model, os.path.join(tmp, "model.safetensors"))  # loadable by sample.py as is
        if ema is not None and hasattr(ema, "controlnet"):
            weights.save_controlnet(ema, os.path.join(tmp, "controlnet_ema.safetensors"))
        elif ema is not None:
            weights.save_checkpoint(ema, os.path.join(tmp, "ema.safetensors"))
        with open(os.path.join(tmp, "trainer.pt"), "wb") as f:  # a file: a full disk surfaces as the OSError it is
            torch.save(dict(optimizer=opt.state_dict(), step=step, **extra), f)
    with weights.atomic(os.path.join(out, "latest")) as tmp, open(tmp, "w") as f:
        f.write(name)
    old = sorted(d for d in os.listdir(out) if d.startswith("step_"))[:-keep] if keep > 0 else []
    for d in old:
        shutil.rmtree(os.path.join(out, d))
    return final


def trainer_state(step, **load):
    """A checkpoint folder's trainer.pt (optimizer state, step, data position, flags); damaged: one ValueError."""
    try:
        return torch.load(os.path.join(step, "trainer.pt"), weights_only=True, **load)
    except Exception as e:  # a save cut short outside save_state's atomic rename, a disk error
        raise ValueError(f"cannot read {step}/trainer.pt ({weights.first_line(e)}); point the "
                         "run's 'latest' at an earlier step_N folder") from None


def recorded_flags(step):
    """The flags the run of checkpoint folder `step` was trained with, {name: value} as in train.py's args; None for a
    folder without trainer.pt (written by hand, or None). mmap: the optimizer state beside them is not read."""
    if step is None or not os.path.isfile(os.path.join(step, "trainer.pt")):
        return None
    flags = trainer_state(step, map_location="cpu", mmap=True).get("args")
    return {k: v for k, v in json.loads(flags).items() if k not in NOT_RECORDED} if flags else None


def load_state(resume, opt, ema, device, global_batch, master):
    """--resume: the optimizer state and EMA weights of checkpoint folder `resume` (its model was loaded when main
    created the model) -> the step to continue from."""
    state = trainer_state(resume, map_location=device)
    opt.load_state_dict(state["optimizer"])
    if ema is not None and hasattr(ema, "controlnet"):  # a ControlNet's EMA: its copies
        sd = weights.read_safetensors(os.path.join(resume, "controlnet_ema.safetensors"))[0]
        ema.controlnet.load_state_dict({k.removeprefix("controlnet."): v for k, v in sd.items()})
    elif ema is not None:
        ema.load_state_dict(weights.read_safetensors(os.path.join(resume, "ema.safetensors"))[0])
    if state["global_batch"] != global_batch and master:
        print(f"resume: global batch {state['global_batch']} -> {global_batch}: the data order changes")
    return state["step"]


def check_resume(args, resume, master):
    """--out's latest checkpoint (or None) against the flags: a run is continued only with --resume, to a later
    --steps, and with the model and optimizer it has: a flag that would change them is refused, not ignored. Rank 0
    says which flags differ from the ones recorded in the checkpoint (cli.parse_train_args restored the others)."""
    if resume is None:
        if args.resume and master:
            print(f"--resume: no checkpoint in {args.out} yet, starting fresh")
        return
    if not args.resume:  # a second run would mix its checkpoints with the first one's
        raise ValueError(f"{args.out} already holds a run (latest: {os.path.basename(resume)}): add --resume to "
                         "continue it, or give another --out (or delete the folder) to start afresh")
    if (done := int(os.path.basename(resume).rpartition("_")[2])) >= args.steps:
        raise ValueError(f"--steps {args.steps}: the run in {args.out} is already at step {done}; give a larger --steps "
                         "to train on")
    flags = recorded_flags(resume) or {}
    changed = {k: (flags[k], v) for k, v in vars(args).items() if k in flags and flags[k] != v}
    for k in FIXED:
        if k in changed:
            raise ValueError(f"--{k} {changed[k][1]}: the run in {args.out} was trained with {changed[k][0]}, whose "
                             "state --resume continues; give its value, or start a new run with --init " + resume)
    if master:
        said = ", ".join(f"--{k.replace('_', '-')} {a} -> {b}" for k, (a, b) in changed.items())
        print(f"{program()}: --resume: {args.out} continues from {os.path.basename(resume)} with its recorded flags"
              + (f"; changed: {said}" if said else ""))
    if args.lora_rank or args.controlnet:  # adapters only: lora.load checks them; a ControlNet's copies, load_controlnet
        return
    try:
        saved = weights.checkpoint_config(os.path.join(resume, "model.safetensors"))
    except Exception as e:  # damaged, or not written by this train.py
        raise ValueError(f"--resume: cannot read the config of {resume}/model.safetensors ({type(e).__name__}: {e}); "
                         "point 'latest' at an earlier step_N folder, or start a new run") from None
    layers = args.kv_compress_layers and hub.parse_layers(args.kv_compress_layers, saved.depth)
    run_vae = args.vae or (run_settings(os.path.join(resume, "model.safetensors")) or {}).get("vae")
    for flag, now, then in (("--image-size", args.image_size, saved.sample_size * weights.vae_factor(run_vae)),
                            ("--caption-tokens", args.caption_tokens, saved.caption_tokens),
                            ("--kv-compress-layers", list(layers or saved.kv_compress_layers), list(saved.kv_compress_layers))):
        if now != then:
            raise ValueError(f"{flag} {now}: the run in {args.out} has {then}, and --resume continues its model as it "
                             f"is; give the run's value, or start a new run with --init {resume}")
    if bool(args.ema) != os.path.isfile(os.path.join(resume, "ema.safetensors")):  # EMA weights would be lost or missing
        raise ValueError(f"--ema {args.ema}: the run in {args.out} was trained {'without' if args.ema else 'with'} EMA; "
                         "give its --ema again")


def cut_log(path, step):
    """On --resume: log.jsonl back to the checkpoint's step. The steps logged after it (before a kill) are trained
    again, so the log reads as one run; a line cut short by the kill goes too."""
    if not os.path.exists(path):
        return
    keep = []
    for line in open(path):
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line.rstrip("\n") + "\n")
        except ValueError:
            pass
    with weights.atomic(path) as tmp, open(tmp, "w") as f:
        f.writelines(keep)
