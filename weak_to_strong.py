"""The paper's weak-to-strong training (PixArt-Σ §3) in miniature, on the quick start's shapes (quickstart.py).

    python weak_to_strong.py --out runs/weak_to_strong      # ~7 min on 2 idle CPU cores
    python weak_to_strong.py --fast --out runs/w2s_fast     # ~2.5 min: 800-step weak model, 200-step stages, 4 seeds

Each stage runs through train.main with the documented stage flags (not a loop of its own), and is compared with
training the same model from scratch at the stage's target setting. Latent space this time: two tiny
vae.AutoencoderKL (2x downsampling, 4 latent channels) are trained on the shapes first, a weak one (narrower,
shorter-trained) and a strong one, each with scaling_factor = 1/std of its latents as SD did; same latent shape,
different bases.
  0. weak model: the DiT from scratch on the weak VAE's latents of 16 px images (the role of PixArt-α);
  1. new VAE: that DiT trained on the strong VAE's latents (SD 0.18215 -> SDXL 0.13025 in the paper): --vae;
  2. higher resolution: 32 px images (latents 8 -> 16, pe_interpolation 1 -> 2): --image-size 32;
  3. KV compression: 2x2 conv (averaging init) in the deep half at 32 px: --kv-compress-layers deep; also the two
     parameter-free modes (avgpool, uniform) with no fine-tuning.
The judge is quickstart.score (the drawing rules, not a model) on the 15 held-out captions, several seeds each,
along each run's EMA checkpoints (one run per curve, resumed from point to point: --resume continues the very
same run). Writes DIR/results.json and DIR/weak_to_strong.png (matplotlib).

Like the quick start, this file is a user of the product (train.py, vae.py, ...): nothing imports it.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import torch
from safetensors.torch import save_file

import cli
import diffusion
import hub
import quickstart
import sigma
import t5 as t5lib
import train
import vae as vae_lib
import weights
from quickstart import ShapesDataset, score
from tokenizer import Tokenizer

VAES = dict(weak=dict(block_out_channels=(8, 16), steps=300), strong=dict(block_out_channels=(16, 32), steps=500))
DIT = dict(quickstart.DIT, depth=4, in_channels=4, out_channels=8)  # 4 blocks as measured (the quick start has 3 now);
# 4 latent channels in, ε + v out
# the stages' train.py flag defaults: the quick start's (AdamW, lr 1e-3, warmup 100) with a shorter EMA, no previews,
# and no x̂0 clipping by sample.py (the judge clips to its VAE's latent range itself)
DEFAULTS = dict(quickstart.DEFAULTS, clip_x0=None, ema=0.99, preview_every=0, save_every=10**9, keep=1, log_every=100)
STEPS = dict(scratch=(50, 100, 200, 400, 700, 1000), adapt=(0, 25, 50, 100, 150, 200, 300),
             kv=(0, 25, 50, 100), seeds=8, weak=1000, vae=1.0)  # where each curve is judged (--fast: FAST)
FAST = dict(scratch=(200,), adapt=(0, 200), kv=(0,), seeds=4, weak=800, vae=0.5)


def train_vae(folder, channels, steps, seed=0, size=16, batch=32, kl=1e-4):
    """A tiny AutoencoderKL trained on the shapes (the experiment's own loop: train.py trains DiTs): MSE of the
    decoded posterior sample + kl × KL(q(z|x) ‖ N(0, I)), as LDM's autoencoders minus their perceptual and GAN
    losses; 16 px images (it is convolutional: 32 px ones encode too). scaling_factor = 1/std of the latents
    (posterior means) of 256 images, as SD chose 0.18215. Saved in diffusers' layout (config.json +
    diffusion_pytorch_model.safetensors): weights.load_vae reads it."""
    file = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    if os.path.exists(file):
        return folder
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cfg = vae_lib.VAEConfig(block_out_channels=channels, layers_per_block=1, norm_num_groups=8, force_upcast=False,
                                scaling_factor=1.0)
        model, data_ = vae_lib.AutoencoderKL(cfg), ShapesDataset(size)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        for step in range(steps):
            x = torch.stack([data_[10**7 * (seed + 1) + step * batch + i]["image"] for i in range(batch)])  # (N, 3, H, W)
            mean, logvar = model.quant_conv(model.encoder(x)).chunk(2, dim=1)  # (N, 4, H/2, W/2) each
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
            rec = model.decoder(model.post_quant_conv(z))  # (N, 3, H, W)
            loss = (rec - x).pow(2).mean() + kl * 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            scale = 1 / model.encode(torch.stack([data_[i]["image"] for i in range(256)])).std().item()  # scaling 1: raw
            error = {}
            for side in (16, 32):  # reconstruction error at both sizes of the experiment
                x = torch.stack([ShapesDataset(side)[i]["image"] for i in range(64)])
                error[side] = (model.decode(model.encode(x)).clamp(-1, 1) - x).pow(2).mean().sqrt().item()
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, file)
    json.dump(dict(asdict(cfg), scaling_factor=scale, reconstruction_rmse_16px=error[16], reconstruction_rmse_32px=error[32]),
              open(os.path.join(folder, "config.json"), "w"))
    print(f"vae {folder}: {channels} channels, {steps} steps: scaling_factor {scale:.4f}, reconstruction "
          f"{error[16]:.3f} rms at 16 px, {error[32]:.3f} at 32 px", flush=True)
    return folder


def make_judge(comps, seeds, steps=20, cfg=4.5):
    """-> judge(model, vae_path): quickstart.score() of a DiT's samples for the held-out captions × `seeds` seeds, drawn in
    one batch: DPM-Solver++(2M), CFG 4.5 (sample.py's defaults), x̂0 clipped to the largest |latent| of 256 of the
    data's images (clip_denoised's range bound, as the quick start clips pixels to theirs), decoded by the VAE the
    model was trained on. -> dict(score=(right-shape + right-colour fractions)/2 in %, shape, color, rmse)."""
    text, tok = weights.load_t5(comps["text_encoder"]), Tokenizer(comps["tokenizer"], max_length=DIT["caption_tokens"])
    prompts = [c for c in ShapesDataset.captions(held_out=True) for _ in range(seeds)]
    y, mask = t5lib.encode(text, tok, prompts)  # (N, L, D), (N, L)
    y_null, m_null = t5lib.encode(text, tok, [""])  # (1, L, D), (1, L)
    vaes = {}

    @torch.no_grad()
    def judge(model, vae_path):
        h = model.config.sample_size
        if (vae_path, h) not in vaes:
            vae = weights.load_vae(vae_path)
            data_ = ShapesDataset(h * vae.factor)
            vaes[vae_path, h] = vae, vae.encode(torch.stack([data_[i]["image"] for i in range(256)])).abs().max().item()
        vae, bound = vaes[vae_path, h]
        g = lambda k: torch.Generator().manual_seed(1000 + k)  # seed k: the same noise for every caption
        x = torch.cat([torch.randn((1, 4, h, h), generator=g(k)) for k in range(seeds)]).repeat(len(prompts) // seeds, 1, 1, 1)  # (N, 4, h, h)
        x = diffusion.sample(model.eval(), x, y, mask, y_null, m_null, "dpm", steps, cfg, clip_x0=bound, progress=False)
        images = vae.decode(x).clamp(-1, 1)  # (N, 3, 2h, 2h)
        r = score(images, prompts)
        return dict(score=100 * (r["shape"] + r["color"]) / 2, shape=r["shape"], color=r["color"], rmse=r["rmse"])
    return judge


def run_curve(out, points, judge, vae, argv, comps, size):
    """One curve: train.main on the shapes up to each step of `points` in turn (--resume: the very same run,
    continued), judging its EMA weights at each; step 0: the --init model as train.main builds it for this
    setting (new VAE, size or KV layers), before any step. -> [dict(step, score, ...)]."""
    def flags(*more):  # the stage's train.py flags, parsed and checked
        return cli.parse_train_args([*argv, *more], dict(DEFAULTS, image_size=size), need_data=False, own_components=True)
    curve = []
    for step in points:
        if step:
            train.main(flags("--out", out, "--steps", str(step), "--resume"), ShapesDataset(size), comps,
                       sigma.SigmaConfig(**DIT))
            model = weights.load_checkpoint(os.path.join(weights.latest_checkpoint(out), "ema.safetensors"))
        else:
            model = train.build_model(flags("--out", out), torch.device("cpu"), vae_factor=weights.vae_factor(vae))
        curve.append(dict(step=step, **judge(model, vae)))
        print(f"weak-to-strong: {out} at step {step}: score {curve[-1]['score']:.1f} "
              f"(shape {curve[-1]['shape']:.0%}, colours {curve[-1]['color']:.0%})", flush=True)
    return curve


def reach(adapted, target):
    """The first step at which a curve scores at least `target`; None if it never does."""
    return next((p["step"] for p in adapted if p["score"] >= target), None)


def main(argv=None):
    """python weak_to_strong.py [--out DIR] [--fast]: the stages above, judged -> the results dict (results.json)."""
    p = cli.ArgumentParser(prog="weak_to_strong.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/weak_to_strong", help="experiment folder: VAEs, runs, results.json, plot")
    p.add_argument("--fast", action="store_true", help="a ~2.5-minute version with fewer steps and seeds (the slow test)")
    args = p.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("the plot needs matplotlib: pip install matplotlib")
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise ValueError(f"--out {args.out} is not empty: give another --out or delete it")
    plan = FAST if args.fast else STEPS
    t0, D = time.time(), lambda *name: os.path.join(args.out, *name)
    text = quickstart.components(D("text"))
    vaes = {k: train_vae(D(f"vae_{k}"), v["block_out_channels"], round(v["steps"] * plan["vae"]), seed=i)
            for i, (k, v) in enumerate(VAES.items())}
    weak, strong = dict(text, vae=vaes["weak"]), dict(text, vae=vaes["strong"])
    judge = make_judge(text, plan["seeds"])
    final = lambda run: os.path.join(weights.latest_checkpoint(run), "ema.safetensors")

    # 0. the weak model; 1. its latent space changes (the paper: SD's VAE -> SDXL's), same DiT: --vae
    stage0 = run_curve(D("stage0_weak"), [plan["weak"]], judge, vaes["weak"], [], weak, 16)
    scratch1 = run_curve(D("stage1_scratch"), plan["scratch"], judge, vaes["strong"], [], strong, 16)
    adapt1 = run_curve(D("stage1_vae"), plan["adapt"], judge, vaes["strong"],
                       ["--init", final(D("stage0_weak")), "--vae", vaes["strong"]], weak, 16)
    # 2. twice the image side: sample_size 8 -> 16 and pe_interpolation 1 -> 2 follow, the position table is
    # recomputed; the scratch model gets the same pe_interpolation (one architecture, like the released ones)
    scratch2 = run_curve(D("stage2_scratch"), plan["scratch"], judge, vaes["strong"], ["--pe-interpolation", "2"], strong, 32)
    adapt2 = run_curve(D("stage2_resolution"), plan["adapt"], judge, vaes["strong"],
                       ["--init", final(D("stage1_vae")), "--image-size", "32"], strong, 32)
    # 3. KV compression of the deep half (paper Tab. 3d) at 32 px; the reference is the uncompressed stage-2 model
    adapt3 = run_curve(D("stage3_kv"), plan["kv"], judge, vaes["strong"],
                       ["--init", final(D("stage2_resolution")), "--image-size", "32", "--kv-compress-layers", "deep"], strong, 32)
    free = {mode: judge(hub.load_model(final(D("stage2_resolution")), None, mode), vaes["strong"])
            for mode in ("avgpool", "uniform")}  # parameter-free KV compression, no fine-tuning

    stages = compare(adapt1, scratch1, adapt2, scratch2, adapt3, free)
    results = dict(fast=args.fast, seeds_per_caption=plan["seeds"], held_out_captions=len(ShapesDataset.held_out()),
                   weak_model=dict(steps=plan["weak"], score=stage0[-1]), stages=stages,
                   wall_time_s=round(time.time() - t0), torch_threads=torch.get_num_threads())
    json.dump(results, open(D("results.json"), "w"), indent=1)
    plot(results, D("weak_to_strong.png"), plt)
    say(results, D("results.json"))
    return results


def compare(adapt1, scratch1, adapt2, scratch2, adapt3, free):
    """The curves -> each stage's figures: where the adapted model reaches the from-scratch baseline's final score
    (stages 1 and 2), or comes within 2 points of the uncompressed model (stage 3)."""
    stages = {}
    for name, adapted, baseline in (("vae", adapt1, scratch1), ("resolution", adapt2, scratch2)):
        target, steps = baseline[-1]["score"], baseline[-1]["step"]
        at = reach(adapted, target)
        stages[name] = dict(adapted=adapted, scratch=baseline, baseline_steps=steps, baseline_final=target,
                            adapted_final=adapted[-1]["score"], steps_to_baseline=at,
                            fraction_of_baseline_steps=None if at is None else at / steps)
    reference = adapt2[-1]["score"]
    at = reach(adapt3, reference - 2)
    stages["kv"] = dict(adapted=adapt3, uncompressed=reference, conv_at_step0=adapt3[0]["score"],
                        no_finetune={m: r["score"] for m, r in free.items()}, steps_to_within_2_points=at,
                        adapted_final=adapt3[-1]["score"])
    return stages


def say(results, path):
    """The results in a few lines."""
    stages = results["stages"]
    for name in ("vae", "resolution"):
        s = stages[name]
        print(f"stage {name}: scratch {s['baseline_final']:.1f} after {s['baseline_steps']} steps; adapted reaches it at "
              f"step {s['steps_to_baseline']} ({'not reached' if s['steps_to_baseline'] is None else format(s['fraction_of_baseline_steps'], '.0%')}), "
              f"{s['adapted_final']:.1f} at {s['adapted'][-1]['step']}")
    k = stages["kv"]
    print(f"stage kv: uncompressed {k['uncompressed']:.1f}; conv init at step 0 {k['conv_at_step0']:.1f}, within 2 points at step "
          f"{k['steps_to_within_2_points']}; no fine-tuning: avgpool {k['no_finetune']['avgpool']:.1f}, uniform "
          f"{k['no_finetune']['uniform']:.1f}; wall time {results['wall_time_s'] / 60:.1f} min -> {path}")


def plot(results, path, plt):
    """One panel per stage: held-out score vs training steps (symmetric log: step 0 is the init), adapted vs scratch."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    titles = dict(vae="1. new VAE (weak -> strong latents, 16 px)", resolution="2. higher resolution (16 -> 32 px)",
                  kv="3. KV compression, deep half (32 px)")
    for ax, (name, s) in zip(axes, results["stages"].items()):
        curve = lambda c, **kw: ax.plot([p["step"] for p in c], [p["score"] for p in c], marker="o", **kw)
        curve(s["adapted"], label="adapted from the previous stage", color="C0")
        if "scratch" in s:
            curve(s["scratch"], label="from scratch", color="C1")
            ax.axhline(s["baseline_final"], color="C1", ls=":", lw=1)
        else:
            ax.axhline(s["uncompressed"], color="C2", ls="--", label="uncompressed (stage 2)")
            for (mode, v), c in zip(s["no_finetune"].items(), ("C3", "C4")):
                ax.scatter([0], [v], marker="x", s=60, color=c, label=f"{mode}, no fine-tuning", zorder=3)
        steps = sorted({p["step"] for c in (s["adapted"], s.get("scratch", [])) for p in c})
        ax.set_xscale("symlog", linthresh=25, linscale=0.5)  # logarithmic above 25 steps; 0 = the init
        ax.set_xticks(steps, [str(k) for k in steps], fontsize=7)
        ax.minorticks_off()
        ax.set(title=titles[name], xlabel="training steps (log scale above 25)", ylabel="held-out score (%)",
               xlim=(0, max(steps[-1], 25) * 1.2), ylim=(0, 100))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    quickstart.pick_threads("weak_to_strong.py")
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad flags or files: one line, exit 2 as the other command lines
        print(f"weak_to_strong.py: error: {e}", file=sys.stderr)
        sys.exit(2)
