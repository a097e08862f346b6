"""A training run's folder: its checkpoints, what --resume continues, and the log.

    runs/mine/
        latest         the name of the newest complete checkpoint, replaced atomically once that one is written
        step_0001000/  model.safetensors (sample.py loads it), ema.safetensors, trainer.pt (the optimizer state, the
                       step, the data position and the run's flags), preview.png
        log.jsonl      one line per --log-every steps
        sample.json    the components to sample with (hub.save_run_settings)
"""
import json
import os
import shutil

import torch

import hub
import lora
import weights


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
        else:
            weights.save_checkpoint(model, os.path.join(tmp, "model.safetensors"))  # loadable by sample.py as is
        if ema is not None:
            weights.save_checkpoint(ema, os.path.join(tmp, "ema.safetensors"))
        torch.save(dict(optimizer=opt.state_dict(), step=step, **extra), os.path.join(tmp, "trainer.pt"))
    with weights.atomic(os.path.join(out, "latest")) as tmp, open(tmp, "w") as f:
        f.write(name)
    old = sorted(d for d in os.listdir(out) if d.startswith("step_"))[:-keep] if keep > 0 else []
    for d in old:
        shutil.rmtree(os.path.join(out, d))
    return final


def load_state(resume, opt, ema, device, global_batch, master):
    """--resume: the optimizer state and EMA weights of checkpoint folder `resume` (its model was loaded when main
    created the model) -> the step to continue from."""
    try:
        state = torch.load(os.path.join(resume, "trainer.pt"), map_location=device, weights_only=True)
    except Exception as e:  # a save cut short outside save_state's atomic rename, a disk error
        raise ValueError(f"--resume: cannot read {resume}/trainer.pt ({type(e).__name__}: {e}); point 'latest' at "
                         "an earlier step_N folder") from None
    opt.load_state_dict(state["optimizer"])
    if ema is not None:
        ema.load_state_dict(weights.read_safetensors(os.path.join(resume, "ema.safetensors"))[0])
    if state["global_batch"] != global_batch and master:
        print(f"resume: global batch {state['global_batch']} -> {global_batch}: the data order changes")
    if master:
        print(f"resumed from {resume} at step {state['step']}")
    return state["step"]


def check_resume(args, resume):
    """--out's latest checkpoint (or None) against the flags: a run is continued only with --resume, to a later
    --steps, and with the model it has: a flag that would change it is refused, not ignored."""
    if resume is None:
        return
    if not args.resume:  # a second run would mix its checkpoints with the first one's
        raise ValueError(f"{args.out} already holds a run (latest: {os.path.basename(resume)}): add --resume to "
                         "continue it, or give another --out (or delete the folder) to start afresh")
    if (done := int(os.path.basename(resume).rpartition("_")[2])) >= args.steps:
        raise ValueError(f"--steps {args.steps}: the run in {args.out} is already at step {done}; give a larger --steps "
                         "to train on")
    if args.lora_rank:  # a LoRA run saves adapters only; lora.load checks their rank and alpha against the flags
        return
    try:
        saved = weights.checkpoint_config(os.path.join(resume, "model.safetensors"))
    except Exception as e:  # damaged, or not written by this train.py
        raise ValueError(f"--resume: cannot read the config of {resume}/model.safetensors ({type(e).__name__}: {e}); "
                         "point 'latest' at an earlier step_N folder, or start a new run") from None
    layers = args.kv_compress_layers and hub.parse_layers(args.kv_compress_layers, saved.depth)
    for flag, now, then in (("--image-size", args.image_size, saved.sample_size * args.vae_factor),
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


def recorded_flags(step):
    """The flags (train.py's args, a dict) that the run of checkpoint folder `step` recorded in its trainer.pt, or None.
    mmap: the optimizer state beside them is not read."""
    file = os.path.join(step, "trainer.pt")
    if not os.path.isfile(file):
        return None
    args = torch.load(file, map_location="cpu", weights_only=True, mmap=True).get("args")
    return json.loads(args) if args else None
