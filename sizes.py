"""Image sizes: the aspect-ratio buckets PixArt-Σ trains on, and which size the DiT samples at for a requested one.

PixArt-Σ was trained on 40 aspect-ratio buckets per resolution (PixArt-α §2.4; tables in
aspect_ratios.json, key = height/width): an image goes to the bucket of nearest ratio (data.py). At
sampling time diffusers' PixArtSigmaPipeline moves the
requested H×W to the bucket of nearest ratio, generates there and resizes + center-crops the image
back to H×W ("resolution binning"); this file does the same, with the same tables. Far above the
training size (4096² from the 2K model) there is no bucket: the nearest one is scaled up to the
requested area and the DiT runs on that larger token grid, its position table stretched to it
(sigma.py: pe_interpolation keeps positions in [0, 32)). diffusers would generate at the training
size and upsample instead. What a size costs (tokens, memory, time) is estimated before sampling starts
(check_cost): far above the training size a single step can take hours, or more memory than the machine has.
"""
import json
import math
import os
import re
import time

import torch
import torch.nn.functional as F

TABLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aspect_ratios.json")
# The tables diffusers' PixArtSigmaPipeline picks by the transformer's sample_size (latent side): the
# official demo's *_TEST tables up to 1024 px, the 2K training table at 2048 px.
BIN_TABLES = {32: "ASPECT_RATIO_256_TEST", 64: "ASPECT_RATIO_512_TEST", 128: "ASPECT_RATIO_1024_TEST",
              256: "ASPECT_RATIO_2048"}
MAX_AREA = 4096 * 4096  # the paper's largest images
UPSCALE_ABOVE = 1.5  # buckets grow to the requested area only above 1.5x the training area; below, as diffusers


def _tables():
    """aspect_ratios.json: {table name: {ratio string: [height, width]}}."""
    with open(TABLES) as f:
        return json.load(f)


def bucket_table(size):
    """The official training table of 40 buckets around size² pixels (train.py --image-size): {ratio: (height, width)}."""
    tables = _tables()
    if f"ASPECT_RATIO_{size}" not in tables:
        known = [k.split("_")[-1] for k in tables if k.startswith("ASPECT_RATIO_") and not k.endswith("TEST")]
        raise ValueError(f"--image-size {size}: no official bucket table for it (there are tables for {', '.join(known)} "
                         "px); or train square images with --no-buckets")
    return {k: tuple(v) for k, v in tables[f"ASPECT_RATIO_{size}"].items()}


def nearest_bucket(height, width, table):
    """Key of the bucket whose height/width ratio is closest to the image's (official rule; the first of equals, as
    diffusers)."""
    return min(table, key=lambda ratio: abs(float(ratio) - height / width))


def parse_size(text, vae_factor=8):
    """'1024' | '2K' | 'WxH' -> (height, width), checked before any weight is loaded: whole latents of the VAE's
    vae_factor x vae_factor pixels (8 for SD's and SDXL's, as diffusers' pipeline requires; generation rounds up to
    whole patches)."""
    m = re.fullmatch(r"(\d+)(?:[x*](\d+))?", {"1K": "1024", "2K": "2048", "4K": "4096"}.get(text.upper(), text))
    if not m:
        raise ValueError(f"--size must be 1024, 2048, 4096, 1K, 2K, 4K (square) or WxH (e.g. 1344x768), got {text!r}")
    width, height = int(m[1]), int(m[2] or m[1])
    f = vae_factor
    if width % f or height % f:
        raise ValueError(f"--size must be a multiple of {f} on both sides (the VAE turns {f}x{f} pixels into one latent), "
                         f"got {width}x{height}; e.g. {f * max(2, round(width / f))}x{f * max(2, round(height / f))}")
    if min(width, height) < 16 or width * height > MAX_AREA:  # 16: the smallest model trained here (the quick start)
        raise ValueError(f"--size {width}x{height} is out of range: sides from 16 px, at most 4096x4096 pixels in all")
    return height, width


def grid_step(config, factor):
    """Pixels per step of the token grid: whole patches of `factor` pixels per latent, and whole KV-compression blocks."""
    return factor * config.patch_size * (config.kv_compress_ratio if config.kv_compress_layers else 1)


def generation_size(height, width, config, binning=True, factor=8):
    """The (height, width) the DiT runs at for a requested size: the nearest bucket of the model's table
    (scaled up to the requested area far above the training size), or with binning=False the size itself,
    each rounded up to whole patches (and KV-compression blocks) of `factor` pixels per latent (the VAE's: 8 for
    SD's and SDXL's); resize_and_crop brings it back."""
    step = grid_step(config, factor)
    if binning:
        if config.sample_size not in BIN_TABLES:
            raise ValueError(f"no aspect-ratio table for a model trained at {8 * config.sample_size} px: use --no-binning")
        table = _tables()[BIN_TABLES[config.sample_size]]
        bh, bw = table[nearest_bucket(height, width, table)]
        if height * width > UPSCALE_ABOVE * (8 * config.sample_size) ** 2:  # e.g. 4096² from the 2K model
            scale = math.sqrt(height * width / (bh * bw))
            bh, bw = scale * bh, scale * bw  # same trained shape, the requested area
        height, width = bh, bw
    return step * math.ceil(height / step - 1e-6), step * math.ceil(width / step - 1e-6)


def resize_and_crop(images, height, width):
    """(N, 3, h, w) -> (N, 3, height, width): bilinear resize to cover, then center crop (as diffusers)."""
    h, w = images.shape[-2:]
    if (h, w) == (height, width):
        return images
    scale = max(height / h, width / w)
    images = F.interpolate(images, size=(int(h * scale), int(w * scale)), mode="bilinear", align_corners=False)
    top, left = (images.shape[2] - height) // 2, (images.shape[3] - width) // 2
    return images[:, :, top:top + height, left:left + width]


# ---------------------------------------------------------------------------------------------- what a size costs
MAX_SECONDS = 3600  # an estimated time above an hour is refused without --force-size: longer than one waits unasked
ACTIVATIONS = 16  # (rows, T, D) tensors alive at a block's peak without grad: x, qkv (3), the MLP's hidden and its GELU
                  # (4 + 4), norms and temporaries; measured on the CPU (fp32, 1K-65K tokens, width 128 and 1152): 11-19


def dit_cost(config, height, width, factor, rows, dtype_bytes):
    """One DiT forward at a generation size (height × width pixels, `factor` pixels per latent) over `rows` rows (with
    CFG two per image) -> (T image tokens, bytes of activations at its peak, FLOPs). Attention runs fused
    (scaled_dot_product_attention's flash and memory-efficient kernels): its memory grows like T, its work like T²,
    which is what dominates far above the training size."""
    D, L, depth, kv = config.hidden_size, config.caption_tokens, config.depth, len(config.kv_compress_layers)
    T = (height // (factor * config.patch_size)) * (width // (factor * config.patch_size))
    keys = T * (depth - kv) + T // config.kv_compress_ratio**2 * kv  # keys per query, summed over the blocks
    linear = 2 * 14 * D * D * depth * T  # per token and block: qkv 3D², proj, cross q and proj 2D², MLP 8D²
    flops = rows * (linear + 4 * D * T * keys + 4 * D * T * L * depth)  # + QKᵀ and AV, self and cross
    return T, rows * T * D * dtype_bytes * ACTIVATIONS, flops


def check_cost(config, requested, generated, factor, binning, rows, dtype_bytes, free_bytes, flops_per_s, steps,
               force=False):
    """Sampling at `requested` (height, width), which the DiT runs at `generated` (generation_size's, for `factor`
    pixels per latent and `binning`), against the model's training size -> a warning line when the DiT's token
    count is above 1.1x the training size's or 4x below it (None otherwise), with the estimated memory and time; a
    ValueError when the activations would not fit in `free_bytes` or the DiT's work would take over MAX_SECONDS at
    `flops_per_s`, naming the largest size of the same shape that fits both (force: a warning instead)."""
    trained, step = factor * config.sample_size, grid_step(config, factor)
    T0 = dit_cost(config, trained, trained, factor, 1, dtype_bytes)[0]
    (h, w), (gh, gw) = requested, generated
    cost = lambda hw: dit_cost(config, *generation_size(*hw, config, binning, factor), factor, rows, dtype_bytes)
    T, memory, flops = dit_cost(config, gh, gw, factor, rows, dtype_bytes)
    line = f"--size {w}x{h}"
    if (gh, gw) != (h, w):
        line += (f" is sampled at {gw}x{gh} (" + ("the nearest trained aspect-ratio bucket" if binning else
                 f"sides rounded up to whole {step}-px patches") + "; the image is resized back)")
    line += f": {T:,} tokens, {T / T0:.3g}x the {T0:,} of its training size {trained}²"
    if T > 1.1 * T0:
        line += ": the DiT runs on a larger grid through position-embedding interpolation"
    if T > 4 * T0 or T < T0 / 4:
        line += ", far from what it was trained at: expect a poor image"
    seconds = lambda flops: steps * flops / flops_per_s  # a lower bound: every FLOP at a large matrix product's rate
    line += (f"; estimated {memory / 2**30:.3g} GiB of activations ({free_bytes / 2**30:.3g} GiB free), "
             f"at least {duration(seconds(flops))} for {steps} step{'s' * (steps > 1)}")
    over = [why for why, bad in (("it would not fit", memory > free_bytes),
                                 ("it would take over an hour", seconds(flops) > MAX_SECONDS)) if bad]
    if over:
        # the largest size of this shape that fits in memory and in the hour: both grow with the size (binning keeps
        # the training bucket's area up to 1.5x it), so a bisection on the scale of the sides finds it
        unit = factor  # what --size accepts: whole latents
        scaled = lambda s: tuple(max(16, unit * int(side * s / unit)) for side in (h, w))
        fits = lambda s: (c := cost(scaled(s)))[1] <= free_bytes and seconds(c[2]) <= MAX_SECONDS
        lo, hi = 0.0, 1.0
        for _ in range(30):
            lo, hi = ((lo + hi) / 2, hi) if fits((lo + hi) / 2) else (lo, (lo + hi) / 2)
        fh, fw = scaled(lo)
        largest = (f"the largest size of this shape that fits in memory and in an hour is about {fw}x{fh}" if fits(lo)
                   else "not even the smallest size of this shape fits" + (" at this --batch-size" if rows > 2 else ""))
        if not force:
            raise ValueError(f"{line}: {' and '.join(over)}; {largest} (--force-size to try anyway)")
        return f"{line}: {' and '.join(over).replace('would', 'may')} ({largest}); sampling anyway (--force-size)"
    return line if T > 1.1 * T0 or T < T0 / 4 else None


def free_memory(device):
    """Bytes free for the DiT's activations: the accelerator's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # Linux: what can be allocated without swapping
        return int(re.search(r"MemAvailable:\s+(\d+) kB", open("/proc/meminfo").read())[1]) * 1024
    except (OSError, TypeError):  # no /proc (macOS, Windows): all of it
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def flops_per_second(device, dtype, n=1024):
    """This device's matrix-product rate in `dtype`, from the faster of two n×n products (~0.02 s on a CPU core)."""
    a = torch.randn(n, n, device=device).to(dtype)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        (a @ a)[0, 0].item()  # .item(): waits for an accelerator
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def duration(seconds):
    """A rough duration in words, two significant digits: 40 s, 12 min, 3.5 h, 9 days, 280 days."""
    for unit, length in (("days", 86400), ("h", 3600), ("min", 60), ("s", 0)):
        if seconds >= 2 * length:
            return f"{float(f'{seconds / (length or 1):.2g}'):g} {unit}"
