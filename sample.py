"""Sample PixArt-Σ (Chen et al. 2024, arXiv 2403.04692): prompts -> PNG files, any size up to 4096².

The pipeline, one model on the accelerator at a time:
  1. T5-XXL encodes each prompt and the negative prompt ("" by default: the null caption T5(""), with
     its own mask, as diffusers does) to (300, 4096) features; then T5 is freed (t5.py).
  2. The DiT denoises Gaussian latents (1, 4, H/8, W/8) with classifier-free guidance, DPM-Solver++(2M)
     in 20 steps or IDDPM ancestral in ~100 (sigma.py, diffusion.py).
  3. The SDXL VAE decodes the latents, tiled above 2048² (vae.py).
A train.py run folder's sample.json names the components it trained with (T5, tokenizer, VAE: any VAE, such as the
quick start's, whose config gives its pixels per latent) and the x̂0 clipping it samples with (train.py --clip-x0).
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

import checkpoints
import cli
import data
import diffusion
import hub
import lora
import sizes
import t5 as t5lib
import weights
from tokenizer import Tokenizer


def release_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def encode_prompts(t5, tokenizer, prompts, negative=""):
    """prompts (list of str) and the negative prompt -> their T5 features and masks: (P, L, D), (P, L), (1, L, D),
    (1, L). diffusers lower-cases and strips prompts (its fallback when clean_caption's packages are missing); done
    here too, so the same prompt gives the same image in both."""
    y, mask = t5lib.encode(t5, tokenizer, [p.lower().strip() for p in prompts])  # (P, L, D), (P, L)
    return (y, mask, *t5lib.encode(t5, tokenizer, [negative.lower().strip()]))


def image_noise(shape, seeds):
    """(1, C, h, w) and one seed per image -> their noise (B, C, h, w), each image's drawn alone on the CPU from its own
    generator (as diffusers' pipeline draws one image), so an image is the same in any batch; and the generators,
    which the ancestral sampler goes on drawing from."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    return torch.cat([torch.randn(shape, generator=g) for g in generators]), generators


@torch.no_grad()
def sample_latents(model, captions, latent_size, *, n=1, seed=0, steps=20, cfg=4.5, sampler="dpm", clip_x0=None,
                   batch_size=1, progress=True, control=None, control_scale=1.0):
    """captions: encode_prompts' (y, mask, y_neg, mask_neg) -> latents (P·n, C, h, w) of latent_size (h, w), on the
    model's device, in its dtype. Image k: prompt k // n, noise from seed + k drawn alone on the CPU, so an image is the
    same in any batch. batch_size: images per DiT forward (with CFG, twice as many rows). control: a ControlNet's
    condition latent (1, C, h, w) (encode_condition; model: a controlnet.ControlPixArt), at strength control_scale."""
    weight, (y, mask, y_neg, mask_neg) = next(model.parameters()), captions  # the network's device and dtype
    fn = model if control is None else functools.partial(model, control=control.to(weight), control_scale=control_scale)
    y, y_neg, mask, mask_neg = y.to(weight), y_neg.to(weight), mask.to(weight.device), mask_neg.to(weight.device)
    latents, total, shape = [], len(y) * n, (1, model.config.in_channels, *latent_size)
    for start in range(0, total, batch_size):
        ks = range(start, min(start + batch_size, total))  # image k: prompt k // n, seed + k
        x, gens = image_noise(shape, [seed + k for k in ks])  # (B, C, h, w)
        p = [k // n for k in ks]  # with CFG one forward of B null + B captions
        latents.append(diffusion.sample(fn, x.to(weight.device), y[p], mask[p], y_neg, mask_neg, sampler, steps, cfg,
                                        clip_x0=clip_x0, generator=gens, progress=progress))  # (B, C, h, w)
    return torch.cat(latents)


@torch.no_grad()
def decode(vae, latents, size, output_type="pil"):
    """Latents (N, C, h, w) -> N images of size (height, width): PIL images, or with output_type="np" float (H, W, 3)
    arrays in [0, 1], as diffusers' pipelines name it. One by one: the VAE's memory does not grow with N."""
    images = []
    for z in latents.split(1):
        image = vae.decode(z.float()).float()  # (1, 3, gen_h, gen_w) in about [-1, 1], computed in the VAE's dtype
        image = sizes.resize_and_crop(image, *size)  # (1, 3, height, width)
        pixels = (image * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()  # (height, width, 3)
        images.append(pixels if output_type == "np" else Image.fromarray((pixels * 255).round().astype(np.uint8)))
    return images


@torch.no_grad()
def encode_condition(vae, image, size, edges=False):
    """A ControlNet's condition, a PIL image -> its latent (1, C, h, w): resized to the generation size (height, width)
    and encoded like an image, as the ControlNet was trained on it; edges: a photo's edges instead (data.edge_map)."""
    x = data.to_tensor((data.edge_map(image) if edges else image).resize(size[::-1], Image.BICUBIC))  # (1, 3, H, W)
    return vae.encode(x.to(next(vae.parameters()))).float()


def generate(prompts, model, t5, tokenizer, vae, *, negative="", size=(1024, 1024), binning=True, output_type="pil",
             control=None, **sampling):
    """prompts (list of str) -> n images per prompt (prompt-major), image k from seed + k: encode_prompts,
    sample_latents, decode, with the three models loaded (sigma.PixArtSigma, t5.T5Encoder, vae.AutoencoderKL, each
    used on its own device and dtype). size: (height, width) of the images; binning: the DiT runs at the nearest
    trained aspect ratio (sizes.generation_size). sampling: sample_latents' n, seed, steps, cfg, sampler, clip_x0,
    batch_size, progress, control_scale. control: a ControlNet's condition (a PIL image; model: a
    controlnet.ControlPixArt). sample.py's run takes the same steps, loading each model only for its own."""
    captions = encode_prompts(t5, tokenizer, prompts, negative)
    gen_h, gen_w = sizes.generation_size(*size, model.config, binning, vae.factor)
    control = None if control is None else encode_condition(vae, control, (gen_h, gen_w))
    latents = sample_latents(model, captions, (gen_h // vae.factor, gen_w // vae.factor), control=control, **sampling)
    return decode(vae, latents, size, output_type)


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


def main(argv=None):
    args = cli.sample_parser(__doc__).parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:  # bad input or missing/damaged weights: a message, no traceback
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    return 0


def say_cost(args, model, name, size, generated, vae_factor, binning, prompts, device, dtype):
    """Said before anything runs (sizes.check_cost): far above the training size one step can take hours, or more
    memory than there is; a size that cannot fit is refused."""
    rows = min(args.batch_size, prompts * args.n) * (2 if args.cfg > 1 else 1)  # CFG: a null row per image
    weights_bytes = sum(p.numel() for p in model.parameters()) * dtype.itemsize  # on the CPU: already loaded
    free = sizes.free_memory(device) - (weights_bytes if device.type == "cuda" else 0)
    trained = vae_factor * model.config.sample_size
    if note := sizes.check_cost(model.config, size, generated, vae_factor, binning, rows, dtype.itemsize, free,
                                sizes.flops_per_second(device, dtype), args.steps, args.force_size):
        if name and generated[0] * generated[1] > 1.1 * trained**2:  # a released model, far above its size
            note += "; no released checkpoint was trained at this size"
            note += "" if args.kv_compress else ", --kv-compress avgpool makes it faster"
        print(f"sample.py: {note}", file=sys.stderr)


def warn_unknown_words(tokenizer, prompts):
    """Any tokenizer: the words it has no pieces for become <unk>, which the model cannot read: said, per prompt."""
    for prompt in prompts:
        if unknown := [w for w in dict.fromkeys(prompt.lower().split()) if tokenizer.special["<unk>"] in tokenizer.encode(w)]:
            print(f"sample.py: warning: the tokenizer does not know {', '.join(map(repr, unknown))} in {prompt!r}: "
                  "they become <unk>, which the model cannot read", file=sys.stderr)


def run(args):
    prompts, device = cli.check_sample_args(args)
    # LoRA files are small: read and checked now; --model <a train.py LoRA run> = its base model + its adapter
    model_arg, loras = lora.split_model(args.model, [lora.read(spec) for spec in args.lora])
    local = os.path.exists(model_arg)
    path, name, repo = hub.resolve_model(model_arg) if local else (None, None, None)  # checked, not loaded yet
    files = checkpoints.run_settings(path) if local else None  # a train.py run: its own components
    known = hub.check_components(args.components) if args.components else files  # local components, or None (a Hub repo)
    vae_factor = weights.vae_factor(known and known["vae"])  # pixels per latent, from its config.json (None: SDXL's 8)
    height, width = sizes.parse_size(args.size, vae_factor) if args.size else (None, None)
    if not local:  # a released name; auto: the native model for the size, 1024-MS up to ~1.5K, 2K-MS above
        model_arg = ("2K" if args.size and height * width > 1536 * 1536 else "1024") if model_arg == "auto" else model_arg
        path, name, repo = hub.resolve_model(model_arg)  # from the Hugging Face cache, or downloaded
    dtype = cli.DTYPES[args.dtype.lower()] or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    t5_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16  # T5 overflows in float16
    model = hub.load_model(path, name, args.kv_compress)  # on the CPU first: a bad file fails before T5 loads
    model = lora.merge(model, loras).to(dtype)  # W += scale·(α/r)·B·A, in fp32; a LoRA that doesn't fit fails here
    if args.controlnet:  # its copies on the model: a file that does not fit fails here, before T5 loads
        model = weights.load_controlnet(args.controlnet, model.float()).to(dtype)
    # binning needs the aspect-ratio table of the model's training size (a train.py --no-buckets run may have none)
    binning = not args.no_binning and model.config.sample_size in sizes.BIN_TABLES
    trained = vae_factor * model.config.sample_size
    height, width = (height, width) if args.size else (trained, trained)
    gen_h, gen_w = sizes.generation_size(height, width, model.config, binning, vae_factor)
    say_cost(args, model, name, (height, width), (gen_h, gen_w), vae_factor, binning, len(prompts), device, dtype)
    if files is None or args.components:  # T5 and the VAE: may download them
        files = dict(hub.resolve_components(args.components, repo, model_arg), clip_x0=files and files["clip_x0"])
    tokenizer = hub.load("tokenizer", files["tokenizer"], Tokenizer)
    warn_unknown_words(tokenizer, prompts + [args.negative])
    seed = random.randrange(2**31) if args.seed is None else args.seed

    # 1. T5 encodes the prompts, then leaves: T5-XXL (9.5 GB in bf16) is gone before the DiT arrives on the device
    t5 = hub.load("text encoder", files["text_encoder"], weights.load_t5, t5_dtype, "cpu" if args.low_memory else device)
    captions = encode_prompts(t5, tokenizer, prompts, args.negative)
    del t5
    release_memory()
    # 2. a ControlNet's condition, encoded by the VAE (small: it stays for step 4)
    vae = hub.load("VAE", files["vae"], weights.load_vae, dtype, device) if args.controlnet else None
    control = vae and encode_condition(vae, data.read_image(args.control, "--control"), (gen_h, gen_w), args.control_edges)
    # 3. the DiT denoises; then it leaves too
    model = model.to(device).compile_blocks() if args.compile else model.to(device)
    latents = sample_latents(model, captions, (gen_h // vae_factor, gen_w // vae_factor), n=args.n, seed=seed,
                             steps=args.steps, cfg=args.cfg, sampler=args.sampler, clip_x0=files["clip_x0"],
                             batch_size=args.batch_size, control=control, control_scale=args.control_scale)
    del model
    release_memory()
    # 4. the VAE decodes, image by image
    vae = vae or hub.load("VAE", files["vae"], weights.load_vae, dtype, device)
    for k, image in enumerate(decode(vae, latents, (height, width))):
        parameters = (f"{prompts[k // args.n]}\nNegative prompt: {args.negative}\nSteps: {args.steps}, Sampler: "
                      f"{args.sampler}, CFG scale: {args.cfg}, Seed: {seed + k}, Size: {width}x{height}, Model: {name or path}"
                      f"{lora.describe(loras)}" + (f", ControlNet: {args.controlnet}, Control: {args.control}"
                      f"{' (edges)' if args.control_edges else ''}, Control scale: {args.control_scale:g}" if args.controlnet else ""))
        png = save_png(image, args.out, parameters, seed + k)
        if max(image.size) < 128:  # a 16 px quick-start image is a dot in a viewer: a copy ×16 beside it, in enlarged/
            os.makedirs(os.path.join(args.out, "enlarged"), exist_ok=True)
            copy = os.path.join(args.out, "enlarged", os.path.basename(png))
            enlarged(image, 256).save(copy)
            png += f" (enlarged: {copy})"
        print(png)


if __name__ == "__main__":
    cli.stop_on_interrupt("sample.py")
    sys.exit(main())
