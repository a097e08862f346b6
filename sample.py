"""Sample PixArt-Σ (Chen et al. 2024, arXiv 2403.04692): prompts -> PNG files, any size up to 4096².

The pipeline, one model on the accelerator at a time:
  1. T5-XXL encodes each prompt and the negative prompt ("" by default: the null caption T5(""), with
     its own mask, as diffusers does) to (300, 4096) features; then T5 is freed (t5.py).
  2. The DiT denoises Gaussian latents (1, 4, H/8, W/8) with classifier-free guidance, DPM-Solver++(2M)
     in 20 steps or IDDPM ancestral in ~100 (sigma.py, diffusion.py).
  3. The SDXL VAE decodes the latents, tiled above 2048² (vae.py).
A train.py run folder's sample.json names the components it trained with; a pixel-space run (the quick start,
`python quickstart.py train`) has no VAE: the DiT denoises the image itself (1, 3, H, W) × pixel_scale, x̂0 clipped.
Sizes (sizes.py): as diffusers' pipeline does, W×H moves to the nearest trained aspect-ratio bucket and the
image is resized and center-cropped back; far above the training size (4096² from the 2K model) the DiT
runs on the larger grid through position-embedding interpolation; what a size costs (tokens, memory, time) is
said before sampling, and a size that cannot fit in memory, or would take over an hour, is refused. Weights (hub.py): the Hugging Face cache.
Image k of a run uses seed+k; its noise is drawn alone on the CPU, so one image equals diffusers'
pipeline with generator=torch.Generator("cpu").manual_seed(seed), and batches never change an image.

Examples:
    python sample.py "a small cactus with a happy face in the Sahara desert"
    python sample.py "a red fox in fresh snow, golden hour" --size 1344x768 --n 4 --seed 7
    python sample.py "a lighthouse on a cliff at dawn" --size 4096 --kv-compress avgpool
    python sample.py --prompts-file prompts.txt --model 512 --size 512 --out previews
    python sample.py "a cat" --model PixArt-Sigma-XL-2-1024-MS.pth --components ./pixart_sigma_sdxlvae_T5_diffusers
    python sample.py "a red circle on a blue background" --model runs/quickstart --n 4   # python quickstart.py train
    python sample.py "a cat in the style of my photos" --lora runs/mylora:0.8        # a LoRA (train.py --lora-rank, PEFT)
    python sample.py "a red circle on a blue background" --model runs/quickstart --controlnet runs/quickstart_controlnet \
        --control outline.png                                # a ControlNet (train.py --controlnet; python quickstart.py controlnet)
    HF_HUB_OFFLINE=1 python sample.py "a cat" --low-memory     # cache only; T5 stays on the CPU
"""
import functools
import gc
import os
import random
import re
import sys

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import cli
import data
import diffusion
import hub
import lora
import sizes
import t5 as t5lib
import weights
from tokenizer import Tokenizer


def _take(component):
    """A loaded module (or None) is used where it lives; a loader function is called now (and its result freed later)."""
    return (component, False) if component is None or isinstance(component, torch.nn.Module) else (component(), True)


def _release_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def generate(prompts, model, t5, tokenizer, vae, *, negative="", size=(1024, 1024), steps=20, cfg=4.5, seed=0,
             n=1, sampler="dpm", binning=True, progress=True, pixel_scale=None, batch_size=1, output_type="pil",
             control=None, control_scale=1.0):
    """prompts (list of str) -> n PIL images per prompt (prompt-major; output_type="np": float (H, W, 3)
    arrays in [0, 1] as diffusers' pipelines name it); image k uses seed + k.
    batch_size: images per DiT forward (with CFG, twice as many rows); an image is the same in any batch.

    model, t5, vae: loaded modules (sigma.PixArtSigma, t5.T5Encoder, vae.AutoencoderKL), used on their own
    device and dtype, or functions returning one, called in the order T5, DiT, VAE; a T5 loaded that way
    is freed before the DiT runs. tokenizer: a tokenizer.Tokenizer. size: (height, width) of the images. pixel_scale: a
    pixel-space model (the quick start): no VAE (vae=None), images × pixel_scale denoised, x̂0 clipped.
    control: a ControlNet's condition (a PIL image; model: a controlnet.ControlPixArt), resized to the generation
    size and encoded like an image; control_scale: its strength."""
    height, width = size
    # diffusers lower-cases and strips prompts (its fallback when clean_caption's packages are missing);
    # done here too, so the same prompt gives the same image in both.
    prompts = [p.lower().strip() for p in prompts]
    t5, loaded = _take(t5)
    y, mask = t5lib.encode(t5, tokenizer, prompts)  # (P, L, 4096), (P, L)
    y_neg, mask_neg = t5lib.encode(t5, tokenizer, [negative.lower().strip()])  # (1, L, 4096), (1, L)
    if loaded:  # T5-XXL (9.5 GB in bf16) leaves before the DiT arrives
        del t5
        _release_memory()
    model, _ = _take(model)
    weight = next(model.parameters())  # the network's device and dtype
    y, y_neg, mask, mask_neg = (a.to(weight.device) for a in (y.to(weight.dtype), y_neg.to(weight.dtype), mask, mask_neg))
    vae, _ = _take(vae)
    factor = 1 if pixel_scale else 8  # pixels per latent
    gen_h, gen_w = sizes.generation_size(height, width, model.config, binning, factor)
    images, total, shape = [], len(prompts) * n, (1, model.config.in_channels, gen_h // factor, gen_w // factor)
    if control is not None:  # the condition as the ControlNet was trained on it: the generation size, encoded
        c = data.to_tensor(control.resize((gen_w, gen_h), Image.BICUBIC)).to(weight.device)  # (1, 3, gen_h, gen_w)
        c = c * pixel_scale if pixel_scale else vae.encode(c.to(vae.post_quant_conv.weight))  # (1, C, h, w)
        model = functools.partial(model, control=c.to(weight.dtype), control_scale=control_scale)
    for start in range(0, total, batch_size):
        ks = range(start, min(start + batch_size, total))  # image k: prompt k // n, seed + k
        gens = [torch.Generator("cpu").manual_seed(seed + k) for k in ks]  # one per image: its noise is drawn alone
        x = torch.cat([torch.randn(shape, generator=g) for g in gens]).to(weight.device)  # (B, C, h, w)
        p = [k // n for k in ks]  # with CFG one forward of B null + B captions; pixels: x̂0 clipped to their range
        x = diffusion.sample(model, x, y[p], mask[p], y_neg, mask_neg, sampler, steps, cfg, clip_x0=pixel_scale,
                             generator=gens, progress=progress)  # (B, C, h, w)
        for z in x.split(1):  # one by one: the VAE's memory does not grow with the batch
            # (1, 3, gen_h, gen_w) in [-1, 1]; pixel space: the DiT denoised the image × pixel_scale itself
            image = z.float() / pixel_scale if pixel_scale else vae.decode(z.to(vae.post_quant_conv.weight)).float()
            image = sizes.resize_and_crop(image, height, width)  # (1, 3, height, width)
            pixels = (image * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()  # (height, width, 3)
            images.append(pixels if output_type == "np" else Image.fromarray((pixels * 255).round().astype(np.uint8)))
    return images


def save_png(image, folder, parameters, seed):
    """Write `image` as folder/NNNNN-seed.png with the next free number (never overwriting); returns the path."""
    os.makedirs(folder, exist_ok=True)
    info = PngInfo()
    info.add_text("parameters", parameters)  # the text chunk image tools read generation settings from
    number = 1 + max((int(f[:5]) for f in os.listdir(folder) if re.match(r"\d{5}-.*\.png$", f)), default=-1)
    while True:
        path = os.path.join(folder, f"{number:05d}-{seed}.png")
        try:
            with open(path, "xb") as f:  # exclusive create: a concurrent run cannot take the same name
                image.save(f, format="PNG", pnginfo=info)
            return path
        except FileExistsError:
            number += 1


def enlarged(image, side):
    """A small image for a person to look at: every pixel a square block (nearest neighbour, nothing smoothed or
    invented), by the whole factor that makes the taller side at least `side` px (a 16 px image ×16 at 256)."""
    k = max(1, -(-side // image.height))
    return image.resize((image.width * k, image.height * k), Image.NEAREST)


def save_grid(images, labels, path, tile=128):
    """A labelled grid PNG: one row per label (its text on the left), len(images) // len(labels) images a row, each
    enlarged() to at least `tile` px tall (train.py's previews, the quick start's figures)."""
    from PIL import ImageDraw
    tiles = [enlarged(image, tile) for image in images]
    n, (w, h) = len(images) // len(labels), tiles[0].size
    margin = 12 + max(round(ImageDraw.Draw(tiles[0]).textlength(label)) for label in labels)
    grid = Image.new("RGB", (margin + n * w, len(labels) * h), "white")
    for k, image in enumerate(tiles):
        grid.paste(image, (margin + k % n * w, k // n * h))
    for r, label in enumerate(labels):
        ImageDraw.Draw(grid).text((6, r * h + h // 2 - 6), label, fill="black")
    grid.save(path)


def main(argv=None):
    args = cli.sample_parser(__doc__).parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:  # bad input or missing/damaged weights: a message, no traceback
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    return 0


def run(args):
    prompts, device = cli.check_sample_args(args)
    # LoRA files are small: read and checked now; --model <a train.py LoRA run> = its base model + its adapter
    model_arg, loras = lora.split_model(args.model, [lora.read(spec) for spec in args.lora])
    local = os.path.exists(model_arg)
    path, name, repo = hub.resolve_model(model_arg) if local else (None, None, None)  # checked, not loaded yet
    files = hub.run_settings(path) if local else None  # a train.py run: its own components
    pixel_scale = files and files["pixel_scale"]  # pixel space (the quick start): no VAE, no aspect-ratio buckets
    height, width = sizes.parse_size(args.size, latent=not pixel_scale) if args.size else (None, None)
    if not local:  # a released name; auto: the native model for the size, 1024-MS up to ~1.5K, 2K-MS above
        model_arg = ("2K" if args.size and height * width > 1536 * 1536 else "1024") if model_arg == "auto" else model_arg
        path, name, repo = hub.resolve_model(model_arg)  # from the Hugging Face cache, or downloaded
    dtype = cli.DTYPES[args.dtype.lower()] or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    t5_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16  # T5 overflows in float16
    model = hub.load_model(path, name, args.kv_compress)  # on the CPU first: a bad file fails before T5 loads
    model = lora.merge(model, loras).to(dtype)  # W += scale·(α/r)·B·A, in fp32; a LoRA that doesn't fit fails here
    if args.controlnet:  # its copies on the model: a file that does not fit fails here, before T5 loads
        model = weights.load_controlnet(args.controlnet, model.float()).to(dtype)
    factor, binning = (1, False) if pixel_scale else (8, not args.no_binning)  # pixels per latent
    trained = factor * model.config.sample_size
    height, width = (height, width) if args.size else (trained, trained)
    gen_h, gen_w = sizes.generation_size(height, width, model.config, binning, factor)
    # said before anything runs: far above the training size one step can take hours, or more memory than there is
    rows = min(args.batch_size, len(prompts) * args.n) * (2 if args.cfg > 1 else 1)  # CFG: a null row per image
    weights_bytes = sum(p.numel() for p in model.parameters()) * dtype.itemsize  # on the CPU: already loaded
    free = sizes.free_memory(device) - (weights_bytes if device.type == "cuda" else 0)
    if note := sizes.check_cost(model.config, (height, width), factor, binning, rows, dtype.itemsize, free,
                                sizes.flops_per_second(device, dtype), args.steps, args.force_size):
        above = name and gen_h * gen_w > 1.1 * trained**2
        print(f"sample.py: {note}" + ("; no released checkpoint was trained at this size" + (
              "" if args.kv_compress else ", --kv-compress avgpool makes it faster") if above else ""), file=sys.stderr)
    if files is None or args.components:  # T5 and the VAE: may download them
        files = dict(hub.resolve_components(args.components, repo, model_arg), pixel_scale=pixel_scale)
    tokenizer = hub.load("tokenizer", files["tokenizer"], Tokenizer)
    for prompt in prompts + [args.negative]:  # any tokenizer: words it has no pieces for become <unk>
        if unknown := [w for w in dict.fromkeys(prompt.lower().split()) if tokenizer.special["<unk>"] in tokenizer.encode(w)]:
            print(f"sample.py: warning: the tokenizer does not know {', '.join(map(repr, unknown))} in {prompt!r}: "
                  "they become <unk>, which the model cannot read", file=sys.stderr)
    seed = random.randrange(2**31) if args.seed is None else args.seed
    control = args.control and data.read_image(args.control, "--control")
    images = generate(
        prompts, lambda: model.to(device).compile_blocks() if args.compile else model.to(device),
        lambda: hub.load("text encoder", files["text_encoder"], weights.load_t5, t5_dtype, "cpu" if args.low_memory else device),
        tokenizer, None if pixel_scale else lambda: hub.load("VAE", files["vae"], weights.load_vae, dtype, device),
        negative=args.negative, size=(height, width), steps=args.steps, cfg=args.cfg, seed=seed, n=args.n,
        sampler=args.sampler, binning=binning, pixel_scale=pixel_scale, batch_size=args.batch_size,
        control=control and (data.edge_map(control) if args.control_edges else control), control_scale=args.control_scale)
    for k, image in enumerate(images):
        parameters = (f"{prompts[k // args.n]}\nNegative prompt: {args.negative}\nSteps: {args.steps}, Sampler: "
                      f"{args.sampler}, CFG scale: {args.cfg}, Seed: {seed + k}, Size: {width}x{height}, Model: {name or path}"
                      f"{lora.describe(loras)}" + (f", ControlNet: {args.controlnet}, Control: {args.control}"
                      f"{' (edges)' if args.control_edges else ''}, Control scale: {args.control_scale:g}" if args.controlnet else ""))
        path = save_png(image, args.out, parameters, seed + k)
        if max(image.size) < 128:  # a 16 px quick-start image is a dot in a viewer: a copy ×16 beside it, in enlarged/
            os.makedirs(os.path.join(args.out, "enlarged"), exist_ok=True)
            copy = os.path.join(args.out, "enlarged", os.path.basename(path))
            enlarged(image, 256).save(copy)
            path += f" (enlarged: {copy})"
        print(path)


if __name__ == "__main__":
    cli.stop_on_interrupt("sample.py")
    sys.exit(main())
