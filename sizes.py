"""Image sizes: the aspect-ratio buckets PixArt-Σ trains on, and which size the DiT samples at for a requested one.

PixArt-Σ was trained on 40 aspect-ratio buckets per resolution (PixArt-α §2.4; tables in
aspect_ratios.json, key = height/width): an image goes to the bucket of nearest ratio (data.py). At
sampling time diffusers' PixArtSigmaPipeline moves the
requested H×W to the bucket of nearest ratio, generates there and resizes + center-crops the image
back to H×W ("resolution binning"); this file does the same, with the same tables. Far above the
training size (4096² from the 2K model) there is no bucket: the nearest one is scaled up to the
requested area and the DiT runs on that larger token grid, its position table stretched to it
(sigma.py: pe_interpolation keeps positions in [0, 32)). diffusers would generate at the training
size and upsample instead.
"""
import json
import math
import os
import re

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


def parse_size(text, latent=True):
    """'1024' | '2K' | 'WxH' -> (height, width), checked before any weight is loaded. latent=False: a pixel-space
    model (the quick start), which has no VAE and so no multiple-of-8 rule (generation rounds up to whole patches)."""
    m = re.fullmatch(r"(\d+)(?:[x*](\d+))?", {"1K": "1024", "2K": "2048", "4K": "4096"}.get(text.upper(), text))
    if not m:
        raise ValueError(f"--size must be a number (1024, 2048, 4096) or WxH (e.g. 1344x768), got {text!r}")
    width, height = int(m[1]), int(m[2] or m[1])
    if latent and (width % 8 or height % 8):  # as diffusers' pipeline requires: the VAE maps 8x8 pixels to 1 latent
        raise ValueError(f"--size must be a multiple of 8 on both sides (the VAE turns 8x8 pixels into one latent), "
                         f"got {width}x{height}; e.g. {8 * max(2, round(width / 8))}x{8 * max(2, round(height / 8))}")
    if min(width, height) < 16 or width * height > MAX_AREA:  # 16: the quick-start pixel-space model's size
        raise ValueError(f"--size {width}x{height} is out of range: sides from 16 px, at most 4096x4096 pixels in all")
    return height, width


def generation_size(height, width, config, binning=True, factor=8):
    """The (height, width) the DiT runs at for a requested size: the nearest bucket of the model's table
    (scaled up to the requested area far above the training size), or with binning=False the size itself,
    each rounded up to whole patches (and KV-compression blocks) of `factor` pixels per latent (8: the VAE's,
    1: pixel space); resize_and_crop brings it back."""
    step = factor * config.patch_size * (config.kv_compress_ratio if config.kv_compress_layers else 1)
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
