"""Export a train.py run as a whole diffusers pipeline folder: diffusers' `PixArtSigmaPipeline.from_pretrained(folder)`
and `python sample.py --model folder` both load it as it is.

    python export.py runs/mine exported/                   # the run's latest checkpoint (EMA weights when kept)
    python export.py runs/mine/step_0002000 exported/      # a given step
    python export.py runs/mine exported/ --components ./pixart_sigma_sdxlvae_T5_diffusers

The folder has the layout of the released PixArt-alpha/PixArt-Sigma-XL-2-*-MS repositories:
    model_index.json   which class diffusers loads each part with
    transformer/       the DiT in diffusers' PixArtTransformer2DModel format (weights.save_diffusers)
    scheduler/         DPMSolverMultistepScheduler with diffusers' defaults: DPM-Solver++(2M), as diffusion.dpm_solver
    text_encoder/, tokenizer/, vae/   the components the run trained with, as they are (their config files
                       included): hard-linked, or copied where a link cannot go (another file system); never downloaded
A train.py --controlnet run is written as its copies alone, in the layout of diffusers' research example
(examples/research_projects/pixart: PixArtControlNetAdapterModel, config.json + diffusion_pytorch_model.safetensors);
its base model is a run or a released model of its own.
The components are the ones train.py recorded in step_N/trainer.pt (its --components: a folder, or a Hub repo found
in the Hugging Face cache, by default the released one; and its --vae); --components names them instead, for a run
that does not record them.
"""
import argparse
import json
import os
import shutil
import sys

import checkpoints
import hub
import lora
import weights

PIPELINE = {"_class_name": "PixArtSigmaPipeline", "_diffusers_version": "0.28.0",  # the first release with PixArt-Σ
            "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "PixArtTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"]}
# diffusers' DPMSolverMultistepScheduler() defaults, the sampler diffusion.dpm_solver follows step for step: the DDPM
# linear β schedule, ε-prediction, second-order multistep DPM-Solver++ with a first-order last step to σ = 0.
# variance_type None: the pipeline itself keeps only ε̂ of the DiT's (ε̂, v) output.
SCHEDULER = {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
             "beta_end": 0.02, "beta_schedule": "linear", "trained_betas": None, "prediction_type": "epsilon",
             "algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True,
             "euler_at_final": False, "final_sigmas_type": "zero", "use_karras_sigmas": False, "thresholding": False,
             "timestep_spacing": "linspace", "steps_offset": 0, "variance_type": None}


WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "controlnet.safetensors")  # a full run, a LoRA run, a ControlNet


def checkpoint(path):
    """A train.py run folder (its 'latest' checkpoint) or one of its step_N folders -> (run folder, step folder)."""
    if not os.path.isdir(path):
        raise ValueError(f"no run at {path}: give a train.py --out folder or one of its step_N folders")
    has_weights = lambda step: any(os.path.isfile(os.path.join(step, f)) for f in WEIGHTS)
    if has_weights(path):
        return os.path.dirname(os.path.abspath(path)), path
    step = weights.latest_checkpoint(path)
    if step is None:
        raise ValueError(f"{path} has no checkpoint yet (no 'latest' file): train.py writes one every --save-every "
                         "steps and at the end")
    if not has_weights(step):
        raise ValueError(f"{path}/latest names {step}, which holds no model.safetensors (nor a LoRA or ControlNet): give a "
                         "step_N folder instead")
    return path, step


def components(source, vae=None):
    """A components folder or Hub repo id (None: the released one) -> local folders text_encoder, tokenizer, vae.
    A Hub repo must already be in the Hugging Face cache: the exported files are the very ones the run used."""
    source = source or hub.COMPONENTS_REPO
    if not os.path.isdir(source):
        if source.startswith((".", "/", "~")) or source.count("/") != 1:  # a path, not a Hub repo id 'owner/name'
            raise ValueError(f"the components folder {source} is not there (a relative path recorded by train.py "
                             "is relative to where it ran): pass --components FOLDER")
        paths = hub.cached(source, [hub.T5_INDEX] + hub.OTHER_COMPONENTS)
        if paths is None:
            raise ValueError(f"the components {source} are not in the Hugging Face cache (export.py downloads "
                             "nothing): pass --components with a local copy")
        source = os.path.dirname(os.path.dirname(paths[0]))  # the cached snapshot folder
    found = hub.resolve_components(source)
    found["tokenizer"] = os.path.dirname(found["tokenizer"])  # the whole tokenizer/ folder
    if vae is not None:
        if not os.path.isfile(os.path.join(vae, "config.json")):
            raise ValueError(f"the run's --vae {vae} is not a diffusers VAE folder here (config.json and weights), "
                             "which the pipeline needs: pass --components with one that holds this VAE in vae/")
        found["vae"] = vae
    for name in ("text_encoder", "vae"):
        if not os.path.isfile(os.path.join(found[name], "config.json")):
            raise ValueError(f"{found[name]} has no config.json, which diffusers/transformers need to load it")
    return found


def link_tree(src, dst, keep=lambda name: True):
    """Every file under src at the same place under dst: a hard link (no second copy on disk), or a copy where a
    link cannot be made. Links to links (the Hugging Face cache's snapshot files) are followed to the data."""
    for folder, _, files in os.walk(src):
        here = os.path.join(dst, os.path.relpath(folder, src))
        os.makedirs(here, exist_ok=True)
        for name in filter(keep, files):
            data = os.path.realpath(os.path.join(folder, name))  # Linux's link(2) would link a symlink itself
            try:
                os.link(data, os.path.join(here, name))
            except OSError:  # another file system, or one without hard links
                shutil.copy2(data, os.path.join(here, name))


def export(run, out, components_flag=None):
    """Write the pipeline folder `out` from a run folder or step folder; returns the weights file used."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"{out} exists and is not empty: give a new (or empty) output folder")
    run, step = checkpoint(run)
    if os.path.isfile(os.path.join(step, "controlnet.safetensors")):  # a --controlnet run: its copies (EMA if kept)
        copies = next(os.path.join(step, f) for f in ("controlnet_ema.safetensors", "controlnet.safetensors")
                      if os.path.isfile(os.path.join(step, f)))
        weights.save_controlnet_diffusers(weights.read_safetensors(copies)[0], out)  # the base: export its own run
        return copies
    args = checkpoints.recorded_flags(step) or {}
    base, loras = lora.split_model(step, [])  # a LoRA run: its base model, merged with its adapter below
    # EMA weights when the run kept them, as sample.py takes; a LoRA run: the base model it names
    dit = hub.resolve_model(base)[0] if loras else weights.step_weights(step)
    settings = checkpoints.run_settings(dit if loras else os.path.join(step, "model.safetensors"))  # run/sample.json
    if settings and settings["clip_x0"]:  # diffusers' DPMSolverMultistepScheduler has no fixed x̂0 clipping
        print(f"export.py: note: {run} samples with x̂0 clipped to ±{settings['clip_x0']:g} (train.py --clip-x0), which "
              "diffusers' pipeline does not do: its images will differ", file=sys.stderr)
    if components_flag is None and not args and not settings:
        raise ValueError(f"{step} does not record the run's components (no trainer.pt with its args): pass "
                         f"--components (train.py's default was {hub.COMPONENTS_REPO})")
    if components_flag or not settings:
        parts = components(components_flag) if components_flag else components(args.get("components"), args.get("vae"))
    else:  # the run's own components, as its sample.json names them
        parts = {k: settings[k] for k in ("text_encoder", "vae")} | dict(tokenizer=os.path.dirname(settings["tokenizer"]))
    model = lora.merge(hub.load("transformer", dit, weights.load_checkpoint), loras)  # the pipeline loads a full DiT
    with weights.atomic(os.path.normpath(out)) as tmp:  # written aside, renamed when complete (also onto an empty folder)
        weights.save_diffusers(model, os.path.join(tmp, "transformer"))
        os.makedirs(os.path.join(tmp, "scheduler"))
        for name, content in (("model_index.json", PIPELINE), ("scheduler/scheduler_config.json", SCHEDULER)):
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(content, f, indent=2)
        for name, src in parts.items():
            link_tree(src, os.path.join(tmp, name))
        if loras:  # the adapter files too, beside the merged transformer, for PEFT users
            link_tree(step, os.path.join(tmp, "lora"), lambda f: f.startswith("adapter_"))
    return dit


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a train.py --out folder (its latest checkpoint) or one of its step_N folders")
    p.add_argument("out", help="the pipeline folder to write (new, or empty)")
    p.add_argument("--components", help="text_encoder/, tokenizer/ and vae/ to put in: a folder or a cached Hub repo "
                   "(default: the ones the run recorded)")
    args = p.parse_args(argv)
    try:
        dit = export(args.run, args.out, args.components)
    except (ValueError, FileNotFoundError) as e:  # bad input: one line, no traceback
        print(f"export.py: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: PixArtSigmaPipeline with the transformer from {dit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
