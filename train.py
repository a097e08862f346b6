"""Fine-tune PixArt-Σ (arXiv 2403.04692) on your captioned images, one GPU or many, through the paper's
"weak-to-strong" stages: a trained DiT is adapted to a stronger VAE, a higher resolution and KV compression
at ~9% of the cost of training from scratch (paper §3).

Recipe (official configs): CAME, lr 2e-5 × √(total batch / 256), warmup then constant, grad clip 0.01,
bf16 autocast, gradient checkpointing, caption dropout 0.1 to the null caption T5(""), IDDPM loss
(ε MSE + learned-variance VB term), no EMA (a flag here). What is ours: the noise, timesteps and caption
dropout of global micro-batch k are drawn from a generator seeded by (seed, k), and the data order is a pure
function of (seed, epoch) — so 2 ranks × batch B train exactly like 1 rank × 2B, and --resume continues
the very same loss curve without storing any RNG state.

Reading order: main, in sections (Setup DDP, Data, Create model, Encoders, Create optimizer, Resume, Train); then
train_step (one optimizer step) and training_batches (one micro-batch and its seeded randomness); then the helpers
in the order main calls them. cli.py holds the flags and their checks, checkpoints.py the run's folder and its stops.

    python quickstart.py train                                     # CPU, no download: shapes in ~4 min
    torchrun --nproc_per_node 8 train.py --init 1024 --data my_images/ --image-size 1024 --out runs/mine
    torchrun --nproc_per_node 8 train.py --init 1024 --data my_images/ --cache runs/cache1024 --resume --out runs/mine
    python train.py --init 1024 --data my_images/ --lora-rank 16 --bf16 --grad-checkpoint --out runs/mylora   # lora.py
    python train.py --init 1024 --data pairs/ --controlnet 13 --bf16 --grad-checkpoint --out runs/mycn   # controlnet.py

Weak-to-strong stages (each one command; add --data/--out/--cache as above):
    1. new VAE:   --init PixArt-XL-2-512x512.pth (PixArt-α, SD VAE 0.18215) --image-size 512 --steps 2000
                  (the components' SDXL VAE, 0.13025, encodes the images; same DiT)
    2. higher res: --init runs/stage1/step_0002000/model.safetensors --image-size 1024 --steps 1000
                  (sample_size 128 and pe_interpolation 2 follow from the size; the 1024 bucket table)
    3. KV compression: --init runs/stage2/step_0001000/model.safetensors --kv-compress-layers deep --warmup 500 --steps 500
"""
import contextlib
import copy
import datetime
import functools
import itertools
import json
import math
import os
import signal
import sys
import time
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from PIL import Image
from tqdm import tqdm

import checkpoints
import cli
import controlnet
import data
import diffusion
import hub
import lora
import sample
import sigma
import sizes
import t5
import weights
from came import CAME
from tokenizer import Tokenizer


# ---------------------------------------------------------------------------------------------- training
def main(args, dataset=None, components=None, config=None):
    """Train from parsed and checked flags (cli.parse_train_args). A caller that brings its own world (the quick start,
    an experiment) passes dataset: a Dataset of dict(index, image, captions) or dict(index, latent, y) items with a
    .buckets list (instead of --data); components: dict(text_encoder, tokenizer, vae) of local paths (instead of
    --components); config: the SigmaConfig of --init scratch."""
    # Setup DDP: torchrun's ranks (or one process); the VAE's latent space; --out's latest checkpoint
    rank, world, device = setup_ddp(args.device, args.ddp_timeout)
    torch.manual_seed(args.seed + rank)  # per-rank seed; the loss noise comes from the per-micro-batch generator
    master = rank == 0
    # the VAE's latent space, read from its config.json (nothing loads yet): pixels per latent, 8 for SD's and SDXL's
    vae_factor = weights.vae_factor(cli.run_vae(args, components))
    cli.check_image_size(args.image_size, vae_factor)
    resume = weights.latest_checkpoint(args.out)  # None: nothing saved in --out yet (checked against the flags by cli)

    # Data: images (--data) or the caller's dataset, every image and caption checked before a model is built
    caption_keys, caption_weights = data.caption_keys(args.caption_keys)
    table = {"1.0": (args.image_size, args.image_size)} if args.no_buckets else sizes.bucket_table(args.image_size)
    dataset, records, skipped = load_data(args, dataset, table, caption_keys, rank, world)
    setup_run_folder(args, components, master)

    # Create model: --init (the weak-to-strong stages: build_model), or the run's own on --resume; LoRA adapters
    model = create_model(args, resume, device, config, vae_factor)

    # Encoders: T5 and the VAE (or the feature cache that replaces them), the null caption T5(""), preview prompts
    tokens = model.config.caption_tokens
    if args.cache:  # encoded once: training loads neither T5 nor the VAE
        encoders = None
        dataset, null = feature_cache(args, records, table, tokens, components, device, rank, world)
        skipped += dataset.skipped
    else:
        encoders = load_encoders(args, tokens, device, components)
        null = Caption(*(v[0].cpu() for v in encoders.captions([""])))
    # caption dropout uses T5(""): the same null caption as diffusers' sampling pipeline uses for CFG
    dit = getattr(model, "base_model", model)  # a ControlNet's base model
    dit.y_embedder.y_embedding.copy_(null.y.to(dit.y_embedder.y_embedding))
    null = Caption(null.y.to(device), null.mask.to(device))
    if args.preview_every:  # the preview prompts encoded now: T5 need not stay in memory
        preview_encoders = encoders or load_encoders(args, tokens, device, components)
        preview_captions = Caption(*preview_encoders.captions(args.preview_prompts.split("|")))
        # a ControlNet's preview prompt k takes the condition of the data's k-th square image
        preview_control = preview_conditions(dataset, preview_encoders, len(preview_captions.y)) if args.controlnet else None

    # Create optimizer: CAME as the official configs (or AdamW), lr × √(global batch / 256) (official 'sqrt' auto-lr)
    global_batch = args.batch_size * world * args.grad_accum
    lr = args.lr * math.sqrt(global_batch / 256) if args.lr_scaling else args.lr
    opt = create_optimizer(args, model, lr)
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema else None

    # Resume: the optimizer, EMA and step of the latest checkpoint (its model is loaded above)
    step = checkpoints.load_state(resume, opt, ema, device, global_batch, master) if resume else 0
    if args.compile:  # regional: each block compiled in place, so checkpoints of `model` keep their keys
        model.compile_blocks()
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    # Train: one optimizer step per iteration; log every --log-every steps, save (and preview) every --save-every. A
    # step whose loss or gradient is not finite changes nothing; on SIGTERM or SIGINT the step under way is saved, then
    # the run stops (checkpoints.Interrupts)
    batches = training_batches(args, dataset, step * args.grad_accum, encoders, null, caption_weights, tokens, rank,
                               world, device)
    if resume and master:
        checkpoints.cut_log(os.path.join(args.out, "log.jsonl"), step)
    log = open(os.path.join(args.out, "log.jsonl"), "a") if master else None
    bar = tqdm(total=args.steps, initial=step, disable=not master, dynamic_ncols=True)
    images_since_log, log_time, nonfinite, in_a_row = 0, time.time(), 0, 0
    with checkpoints.Interrupts(args, rank, world, device, bar) as interrupts, bar:
        while step < args.steps:
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / max(1, args.warmup))  # warmup, then constant
            result = train_step(net, model, ema, opt, batches, args, world, autocast)
            step, skipped, images_since_log = step + 1, skipped + result.skipped, images_since_log + global_batch
            nonfinite += not result.finite
            in_a_row = checkpoints.count_skipped(result, step, in_a_row, args, rank)  # too many in a row: stops
            bar.update(1)
            if step % args.log_every == 0 or step == args.steps:
                now = time.time()
                log_step(log, bar, step, result, opt.param_groups[0]["lr"], images_since_log / (now - log_time),
                         dict(skipped_images=skipped, skipped_steps=nonfinite))
                images_since_log, log_time = 0, now
            signum = interrupts.stop_signal()  # the same on every rank
            if step % args.save_every == 0 or step == args.steps or signum:  # model, EMA, trainer state, a preview
                path = checkpoints.save(args, step, model, ema, opt, dict(global_batch=global_batch, epoch=result.epoch,
                                        micro_batch=step * args.grad_accum), rank, world, device)
                if master and args.preview_every and not signum and (step % args.preview_every == 0 or step == args.steps):
                    preview(ema or model, preview_captions, null, preview_encoders.vae, os.path.join(path, "preview.png"),
                            args.preview_prompts.split("|"), args.preview_sampler, clip_x0=args.clip_x0, control=preview_control)
            if signum:  # saved: stop with the shell's status for that signal (a scheduler may requeue the job)
                checkpoints.stop(f"{signal.Signals(signum).name}: stopped after step {step}, saved in {path}; continue "
                                 "with --resume", 128 + signum, say=master)

    # Done: where the run is, and how to sample it
    if master:
        prompt = args.preview_prompts.split("|")[0]
        what = f"--model {args.init} --controlnet {args.out} --control IMAGE" if args.controlnet else f"--model {args.out}"
        print(f"{checkpoints.program()}: done, step {step} in {weights.latest_checkpoint(args.out)}; sample it with:\n"
              f"    python sample.py {what} \"{prompt}\"")
    if world > 1:
        dist.barrier()  # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()
    return model


class MicroBatch(NamedTuple):
    """One micro-batch of this rank, ready for the loss."""
    x0: torch.Tensor     # (n, C, h, w) clean latents, scaled (the VAE's encode)
    t: torch.Tensor      # (n,) timesteps
    noise: torch.Tensor  # (n, C, h, w) ε
    y: torch.Tensor      # (n, L, D) caption features, T5("") where the caption was dropped
    mask: torch.Tensor   # (n, L)
    epoch: int
    skipped: int         # images of the micro-batch that could not be decoded (left out)
    control: torch.Tensor = None  # (n, C, h, w) a ControlNet's condition latents, encoded like x0


class StepResult(NamedTuple):
    sums: torch.Tensor       # (4,) all ranks' sums over the step of loss, mse, vb and the number of images
    grad_norm: torch.Tensor  # before clipping (the same on every rank: DDP averaged the gradients)
    finite: bool             # False: the loss or the gradient norm was not, and the step was skipped
    epoch: int
    skipped: int


def train_step(net, model, ema, opt, batches, args, world, autocast):
    """One optimizer step, as in DiT's train.py: --grad-accum micro-batches of this rank through the IDDPM loss and
    backward (DDP averages the gradients over the ranks on the last one only), gradient clip, optimizer step, EMA.
    A step whose loss or gradient norm is not finite changes nothing (no weight, EMA or optimizer-state update); every
    rank decides on the all-reduced loss and the averaged gradients, so all skip it together."""
    sums, skipped = 0, 0  # sums: a (4,) tensor from the first micro-batch on
    for micro in range(args.grad_accum):
        batch = next(batches)
        sync = net.no_sync() if world > 1 and micro < args.grad_accum - 1 else contextlib.nullcontext()
        with sync:
            y, mask = diffusion.drop_padding(batch.y, batch.mask)  # (n, L', D): outside the (compiled) model
            with autocast:
                fn = net if batch.control is None else functools.partial(net, control=batch.control)  # a ControlNet's
                out = diffusion.training_losses(fn, batch.x0, batch.t, y, mask, batch.noise)
            (out["loss"].mean() / args.grad_accum).backward()
        sums = sums + torch.stack([out["loss"].sum(), out["mse"].sum(), out["vb"].sum(),
                                   out["loss"].new_tensor(len(batch.t))]).detach()
        skipped += batch.skipped
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    if world > 1:
        dist.all_reduce(sums)
    finite = bool(sums.isfinite().all() and grad_norm.isfinite())
    if finite:
        opt.step()
        if ema is not None:  # ema ← decay·ema + (1 − decay)·model, outside autograd: else each step's lerp is
            with torch.no_grad():  # chained onto the last in a graph that lives as long as the run (memory grows)
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - args.ema)
    opt.zero_grad(set_to_none=True)
    return StepResult(sums, grad_norm, finite, batch.epoch, skipped)


def training_batches(args, dataset, start, encoders, null, caption_weights, caption_tokens, rank, world, device):
    """This rank's micro-batches from global micro-batch number `start` on, endless. The randomness of micro-batch k
    (timesteps, noise, caption dropout, which caption) is drawn for all ranks' rows from a generator seeded by
    (seed, k), and each rank keeps its own rows: N ranks × batch B train as one process with batch N·B, and a
    resumed run draws what the straight run drew. encoders: load_encoders' (None with cached features)."""
    sampler = data.BucketSampler(dataset.buckets, args.batch_size, rank, world, args.seed)
    stream = data.micro_batches(dataset, sampler, start, args.workers)
    global_size = args.batch_size * world  # rows of one micro-batch of all ranks
    for k in itertools.count(start):
        epoch, items = next(stream)
        valid = [i for i, item in enumerate(items) if item is not None]  # an image that failed to decode is None
        skipped, items = len(items) - len(valid), [items[i] for i in valid]
        rows = torch.tensor([rank * args.batch_size + i for i in valid], device=device)  # this rank's rows
        g = data.generator(args.seed, k, device)
        t = torch.randint(0, diffusion.NUM_TIMESTEPS, (global_size,), generator=g, device=device)[rows]
        drop = (torch.rand(global_size, generator=g, device=device) < args.caption_dropout)[rows]
        choice = torch.multinomial(caption_weights.to(device).expand(global_size, -1), 1, generator=g)[rows, 0].tolist()
        control = None
        if "latent" in items[0]:  # cached features
            x0 = torch.stack([item["latent"] for item in items]).to(device)
            y, mask = (v.to(device) for v in data.pad_tokens([it["y"][c] for it, c in zip(items, choice)], caption_tokens))
            if args.controlnet:
                control = torch.stack([item["control_latent"] for item in items]).to(device)
        else:
            with torch.no_grad():
                x0 = encoders.images(torch.stack([item["image"] for item in items]))
                y, mask = encoders.captions([it["captions"][c] for it, c in zip(items, choice)])
                if args.controlnet:  # the condition image through the same encoder as the image
                    control = encoders.images(torch.stack([item["control"] for item in items]))
        noise = torch.randn((global_size, *x0.shape[1:]), generator=g, device=device)[rows]
        y = torch.where(drop[:, None, None], null.y.to(y.dtype), y)  # caption dropout 0.1 -> T5("")
        mask = torch.where(drop[:, None], null.mask.to(mask.dtype), mask)
        yield MicroBatch(x0, t, noise, y, mask, epoch, skipped, control)


def log_step(log, bar, step, result, lr, images_per_s, counts):
    """The step's loss over all ranks -> a line of log.jsonl and the progress bar, on rank 0 (log: None on the others).
    counts: images and steps skipped so far."""
    loss, mse, vb, n = result.sums.tolist()
    record = dict(step=step, epoch=result.epoch, loss=loss / n, mse=mse / n, vb=vb / n, lr=lr,
                  grad_norm=result.grad_norm.item(), images_per_s=images_per_s, **counts)
    if log is not None:
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{images_per_s:.1f}")
        log.write(json.dumps(record) + "\n")
        log.flush()


def preview_conditions(dataset, encoders, n):
    """A ControlNet's preview conditions: the latents (n, C, h, w) of the conditions of the data's first n square images."""
    square = [i for i, b in enumerate(dataset.buckets) if b == "1.0"][:n]
    if len(square) < n:
        raise ValueError(f"--preview-every: a ControlNet's previews take the conditions of the data's square images; "
                         f"it has {len(square)} for {n} preview prompts: give fewer, or --preview-every 0")
    items = [dataset[i] for i in square]
    if "control_latent" in items[0]:  # cached
        return torch.stack([it["control_latent"] for it in items]).to(next(encoders.vae.parameters()).device)
    return encoders.images(torch.stack([it["control"] for it in items]))


@torch.no_grad()
def preview(model, captions, null, vae, path, prompts, sampler="dpm", per_prompt=4, cfg=4.5, seed=0, clip_x0=None,
            control=None):
    """Grid PNG (save_grid): one row per prompt, labelled with it, `per_prompt` seeds; CFG 4.5 and
    DPM-Solver++(2M) in 20 steps as sample.py runs it, or IDDPM's ancestral sampler in 100 (stochastic: forgives a
    young model's early mistakes). Image k (row k // per_prompt) is sample.py's image k with --seed `seed`: its noise
    drawn alone from seed + k. captions: the prompts' Caption; null: T5("")'s. control: a ControlNet's condition
    latent per prompt (P, C, h, w), shown first in its row."""
    model.eval()
    images, shape = [], (1, model.config.in_channels, model.config.sample_size, model.config.sample_size)
    for p in range(len(captions.y)):  # one prompt's images per batch (all at once was no faster on the CPU, and takes more memory)
        x, gens = sample.image_noise(shape, [seed + p * per_prompt + j for j in range(per_prompt)])  # (n, C, h, w)
        y, mask = captions.y[p:p + 1].expand(per_prompt, -1, -1), captions.mask[p:p + 1].expand(per_prompt, -1)
        fn = model if control is None else functools.partial(model, control=control[p:p + 1])
        x = diffusion.sample(fn, x.to(y.device), y, mask, null.y, null.mask, sampler, 20 if sampler == "dpm" else 100,
                             cfg, clip_x0=clip_x0, generator=gens, progress=False)
        x = x if control is None else torch.cat([control[p:p + 1].float(), x])  # the condition left of its samples
        rgb = ((vae.decode(x).float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # (n, H, W, 3)
        images += [Image.fromarray(image) for image in rgb]
    model.train()
    save_grid(images, prompts, path)  # small images enlarged


def save_grid(images, labels, path, tile=128):
    """A labelled grid PNG: one row per label (its text on the left), len(images) // len(labels) images a row, each
    sample.enlarged() to at least `tile` px tall (the previews; the quick start's figures)."""
    from PIL import ImageDraw
    tiles = [sample.enlarged(image, tile) for image in images]
    n, (w, h) = len(images) // len(labels), tiles[0].size
    margin = 12 + max(round(ImageDraw.Draw(tiles[0]).textlength(label)) for label in labels)
    grid = Image.new("RGB", (margin + n * w, len(labels) * h), "white")
    for k, image in enumerate(tiles):
        grid.paste(image, (margin + k % n * w, k // n * h))
    for r, label in enumerate(labels):
        ImageDraw.Draw(grid).text((6, r * h + h // 2 - 6), label, fill="black")
    grid.save(path)


# ---------------------------------------------------------------------------------------------- setup
def setup_ddp(device, timeout):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: NCCL on GPUs, gloo on CPU. Plain `python` = one process. timeout
    (--ddp-timeout, seconds): how long a collective waits for a rank that died or hangs before it fails."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "RANK" not in os.environ:
        return 0, 1, dev
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if dev.type == "cuda":  # one GPU per rank
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout))
    return rank, world, dev


def load_data(args, dataset, table, caption_keys, rank, world):
    """--data's images, scanned (every image and caption checked), or the caller's dataset -> (dataset, --data's
    records or None, images skipped). A batch no bucket fills is refused now."""
    records, skipped = None, 0
    if dataset is None:
        records, skipped = data.scan(args.data, caption_keys, control=bool(args.controlnet))
        dataset = data.ImageDataset(records, table)
    if args.controlnet and not {"control", "control_latent"} & set(dataset[0]):
        raise ValueError(f"--controlnet: this dataset's items have no condition ('control' image): {sorted(dataset[0])}")
    data.BucketSampler(dataset.buckets, args.batch_size, rank, world, args.seed)  # refuses a batch no bucket fills
    return dataset, records, skipped


def setup_run_folder(args, components, master):
    """--out, said and created, with a caller's components (text_encoder, tokenizer, vae paths) and --clip-x0 recorded
    in its sample.json, so that `sample.py --model <out>` needs no flags."""
    os.makedirs(args.out, exist_ok=True)
    if master:
        print(f"{checkpoints.program()}: run folder {args.out}: a checkpoint every {args.save_every} steps and at step {args.steps} "
              f"({f'the last {args.keep}' if args.keep else 'all'} kept), log.jsonl; stop any time and continue with --resume")
        if components is not None:  # --vae is the run's VAE
            checkpoints.save_run_settings(args.out, dict(components, vae=cli.run_vae(args, components)), args.clip_x0)


def create_model(args, resume, device, config=None, vae_factor=8):
    """The model to train: --init built by build_model (every weak-to-strong stage), or on --resume the run's own
    weights; with --lora-rank, the base model frozen and adapters around its layers (they alone train and are saved)."""
    if args.controlnet:  # the --init model frozen, trainable copies of its first N blocks (or the run's own copies)
        base = build_model(args, device, config, vae_factor)
        model = (weights.load_controlnet(os.path.join(resume, "controlnet.safetensors"), base) if resume
                 else controlnet.ControlPixArt(base, args.controlnet))
        model = model.to(device).train()
    elif resume and not args.lora_rank:
        model = weights.load_checkpoint(os.path.join(resume, "model.safetensors")).to(device).train()
    else:
        model = build_model(args, device, config, vae_factor)
    if args.lora_rank:
        lora.add(model, args.lora_rank, args.lora_alpha or args.lora_rank, args.lora_targets, lora.base_name(args.init))
        if resume:
            lora.load(model, resume)
    getattr(model, "base_model", model).gradient_checkpointing = args.grad_checkpoint  # a ControlNet's copies too
    return model


def build_model(args, device, config=None, vae_factor=8):
    """--init: 'scratch' (the released --config, or `config` when a caller such as the quick start gives one), a
    released name, an official .pth (PixArt-Σ or -α), a diffusers folder, our checkpoint. vae_factor: pixels per
    latent of the VAE (8: SD's and SDXL's)."""
    latent = args.image_size // vae_factor
    if args.init == "scratch":
        config, sd = config or sigma.CONFIGS[args.config], None
        config = replace(config, sample_size=latent, pe_interpolation=args.pe_interpolation or config.pe_interpolation,
                         caption_tokens=args.caption_tokens)
    else:
        path = hub.resolve_model(args.init, "--init")[0]  # a released name -> the Hugging Face cache, a run folder -> its latest checkpoint
        sd, config = weights.read_state_dict(path)  # PixArt-α's size/aspect micro-conditions dropped (paper §3)
        config = config or weights.config_from_official(sd)
        if config.caption_tokens != args.caption_tokens:  # PixArt-α: 120 T5 tokens; Σ: 300
            print(f"init: caption length {config.caption_tokens} -> {args.caption_tokens}; null caption re-encoded")
            sd["y_embedder.y_embedding"] = torch.zeros(args.caption_tokens, config.caption_channels)
            config = replace(config, caption_tokens=args.caption_tokens)
    if latent != config.sample_size:  # stage 2: the position table is recomputed for the new grid
        # positions keep their span: pe_interpolation grows with the size (released models: size/512)
        pe = args.pe_interpolation or config.pe_interpolation * latent / config.sample_size
        print(f"model: training size {config.sample_size * vae_factor} -> {args.image_size} px: "
              f"sample_size {latent}, pe_interpolation {pe:g}")
        config = replace(config, sample_size=latent, pe_interpolation=pe)
    elif args.pe_interpolation and args.pe_interpolation != config.pe_interpolation:
        print(f"model: pe_interpolation {config.pe_interpolation:g} -> {args.pe_interpolation:g} (--pe-interpolation)")
        config = replace(config, pe_interpolation=args.pe_interpolation)
    if args.kv_compress_layers:  # stage 3: load_checkpoint gives the new conv/norm the paper's averaging init
        config = replace(config, kv_compress_layers=hub.parse_layers(args.kv_compress_layers, config.depth),
                         kv_compress_ratio=args.kv_compress_ratio or 2)
    model = sigma.PixArtSigma(config) if sd is None else weights.load_checkpoint(sd, config)
    return model.to(device).train()


class Encoders(NamedTuple):
    """T5, its tokenizer and the VAE: a batch -> the DiT's inputs, and its output back to images (load_encoders)."""
    text_encoder: torch.nn.Module
    tokenizer: Tokenizer
    vae: torch.nn.Module

    def images(self, x):  # (N, 3, H, W) in [-1, 1] -> latents (N, C, H/f, W/f), scaled: the posterior mean
        return self.vae.encode(x).float()

    def captions(self, prompts):  # N prompts -> (y (N, L, D), mask (N, L)), float32, not inference tensors
        return tuple(v.float().clone() for v in t5.encode(self.text_encoder, self.tokenizer, prompts))


class Caption(NamedTuple):
    y: torch.Tensor     # (L, D) or (N, L, D) T5 features
    mask: torch.Tensor  # (L,) or (N, L): 1 for a real token


def load_encoders(args, caption_tokens, device, components=None):
    """components (text_encoder, tokenizer, vae paths; None: --components', fetched now when not cached) -> Encoders."""
    components = components or hub.resolve_components(args.components)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    text = hub.load("text encoder", components["text_encoder"], weights.load_t5, dtype=dtype, device=device)
    tok = hub.load("tokenizer", components["tokenizer"], Tokenizer, max_length=caption_tokens)
    vae = hub.load("VAE", cli.run_vae(args, components), weights.load_vae, dtype=dtype, device=device)
    return Encoders(text, tok, vae)


def feature_cache(args, records, table, caption_tokens, components, device, rank, world):
    """--cache: --data's VAE latents and T5 features and the null caption T5(""), encoded now (every rank a share) where
    the cache lacks them for these images, captions, components, buckets and caption length, or holds them damaged
    (data.cache_problems; said in one line) -> (data.CachedDataset, the null caption). Training then needs neither T5
    nor the VAE."""
    # the VAE and T5 enter by name, not loaded: a valid cache needs neither
    fp = data.fingerprint(records, table, args.vae or args.components, args.components, caption_tokens)
    problems = data.cache_problems(args.cache, len(records), fp)  # the same files: the same on every rank
    if world > 1:
        dist.barrier()  # every rank has looked before any writes
    if problems:
        if rank == 0:
            print(f"cache {args.cache}: encoding {len(problems)} files: " + "; ".join(
                  f"{name} {why}" for name, why in list(problems.items())[:3]) + " ..." * (len(problems) > 3))
        encoders = load_encoders(args, caption_tokens, device, components)
        data.build_cache(args.cache, records, table, fp, encoders.images, encoders.captions, problems, rank, world)
        del encoders  # free T5 and the VAE before training
        if world > 1:
            dist.barrier()
    index = os.path.join(args.cache, "index.json")
    if rank == 0 and (problems or not os.path.exists(index) or json.load(open(index))["fingerprint"] != fp):
        data.write_cache_index(args.cache, fp)
    if world > 1:
        dist.barrier()
    null = load_file(os.path.join(args.cache, "null.safetensors"))
    return data.CachedDataset(args.cache), Caption(null["y"], null["mask"])


def create_optimizer(args, model, lr):
    """CAME with the official configs' betas and eps, or AdamW, over the weights that train."""
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "came":
        return CAME(params, lr=lr, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16), weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)


if __name__ == "__main__":
    try:
        main(cli.parse_train_args(doc=__doc__))
    except (ValueError, FileNotFoundError) as e:  # bad flags, data or weights: the message, not a traceback
        raise SystemExit(f"train.py: error: {e}")
    except KeyboardInterrupt:  # Ctrl-C before training began (once it has, the step under way is saved first)
        print("train.py: interrupted before training began: nothing to save", file=sys.stderr)
        raise SystemExit(130)

