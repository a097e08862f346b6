"""AutoencoderKL: the frozen VAE whose latent space PixArt-Σ's DiT lives in (PixArt-Σ, arXiv 2403.04692).

The LDM autoencoder (Rombach et al., arXiv 2112.10752; weights retrained for SDXL, arXiv 2307.01952). Encoder:
conv_in, one level per block_out_channels entry (GroupNorm-SiLU-conv ResNet blocks, a stride-2 conv between
levels: 8x smaller per side with 4 levels), a mid block (resnet, single-head self-attention over all pixels,
resnet), then GroupNorm-SiLU-conv to 2x4 channels: mean and log-variance of a diagonal Gaussian q(z|x).
`encode` returns its mean (the mode) or, with sample=True, mean + std·ε (diffusers' latent_dist.sample()). The
decoder mirrors it (one more resnet per level, nearest-x2 upsampling) to an image in about [-1, 1], unclamped.
Modules are named after diffusers' keys; the single-file LDM layout goes through `convert_ldm` (files: weights.py).

Notable features:
- scaling_factor s ≈ 1/std of the latents, so the DiT sees ~unit-variance z·s like its noise: 0.18215 for
  SD 1.x's VAE, 0.13025 for SDXL's. Same architecture, other weights: PixArt-α was trained on SD's VAE and
  PixArt-Σ's weak-to-strong training first swaps in SDXL's ("VAE adaptation", ~2K steps), hence `SD`, `SDXL`.
- fp16: SDXL's VAE has activations beyond fp16's 65504 and decodes to inf/NaN, so weights.load_vae(dtype=fp16)
  loads fp32 with a warning (diffusers' force_upcast) and a model cast to fp16 by hand refuses to run.
  bf16 has fp32's exponent range and is fine.
- Tiling, diffusers' scheme: tiles of 128 latents (1024 px) every 96, each blended into its upper and left
  neighbours by a linear ramp over 32 latents (256 px): memory is bounded by one tile. Tiles see their own
  GroupNorm statistics (faint tile-sized colour drift), so tiled=None tiles only above 2048² pixels.
- Attention: F.scaled_dot_product_attention, one head of width 512. Its fused kernels (flash on CPU,
  memory-efficient on CUDA) never form the (hw x hw) scores: 275 GB in fp32 at 4096² untiled.
Letters: N batch, C channels, H, W image pixels, h, w latent pixels (H = 8h with 4 levels).
    vae = weights.load_vae("pixart_sigma_sdxlvae_T5_diffusers/vae")   # or sdxl_vae.safetensors
    z = vae.encode(images)                 # (N, 3, H, W) in [-1, 1] -> (N, 4, h, w), scaled
    images = vae.decode(z).clamp(-1, 1)    # (N, 3, H, W)
"""
import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VAEConfig:
    block_out_channels: tuple = (128, 256, 512, 512)  # width per level; 2^(levels-1) = 8x downsampling
    layers_per_block: int = 2        # resnets per encoder level (decoder levels have one more)
    in_channels: int = 3             # RGB
    out_channels: int = 3
    latent_channels: int = 4
    norm_num_groups: int = 32        # GroupNorm groups (eps 1e-6 everywhere)
    scaling_factor: float = 0.13025  # latents = z * scaling_factor
    force_upcast: bool = True        # overflows in fp16: run fp32 instead (diffusers' field and default)
    tile_latent: int = 128           # tile side in latents (x8 in pixels)
    tile_overlap: float = 0.25       # stride = tile·(1 - overlap), blend ramp = tile·overlap
    tile_above: int = 2048 * 2048    # tiled=None tiles images with more pixels than this

    @property
    def factor(self):  # pixels per latent per side: 2x downsampling between levels (8 with 4 levels)
        return 2 ** (len(self.block_out_channels) - 1)


SDXL = VAEConfig()
SD = VAEConfig(scaling_factor=0.18215, force_upcast=False)  # SD 1.x (PixArt-α's VAE), fine in fp16


class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-6)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None  # LDM: nin_shortcut

    def forward(self, x):  # (N, c_in, H, W) -> (N, c_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class Attention(nn.Module):
    """Single-head self-attention over all h·w pixels, with a residual (the mid block's only attention)."""

    def __init__(self, C, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, C, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.to_out = nn.ModuleList([nn.Linear(C, C)])  # key to_out.0 (diffusers keeps a dropout at .1)

    def forward(self, x):
        N, C, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (N, hw, C)
        q, k, v = (f(tokens).unsqueeze(1) for f in (self.to_q, self.to_k, self.to_v))  # (N, 1, hw, C)
        tokens = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (N, hw, C), scale 1/sqrt(C)
        return x + self.to_out[0](tokens).transpose(1, 2).reshape(N, C, h, w)


class MidBlock(nn.Module):
    def __init__(self, C, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(C, C, groups), ResnetBlock(C, C, groups)])
        self.attentions = nn.ModuleList([Attention(C, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Level(nn.Module):
    """One resolution level: resnets, then optionally 2x down- or upsampling (keys down_blocks.b / up_blocks.b)."""

    def __init__(self, c_in, c_out, n, groups, resample=None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n)])
        self.resample = resample
        if resample:  # keys downsamplers.0.conv / upsamplers.0.conv
            conv = nn.Conv2d(c_out, c_out, 3, stride=2 if resample == "down" else 1, padding=int(resample == "up"))
            setattr(self, resample + "samplers", nn.ModuleList([nn.ModuleDict({"conv": conv})]))

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.resample == "down":  # pad right/bottom only, then stride 2: (H, W) -> (H/2, W/2) as in LDM
            return self.downsamplers[0]["conv"](F.pad(x, (0, 1, 0, 1)))
        if self.resample == "up":  # nearest x2, then conv: (H, W) -> (2H, 2W)
            return self.upsamplers[0]["conv"](F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g,
                                                "down" if i < n - 1 else None) for i in range(n)])
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x):  # (N, 3, H, W) -> (N, 2*4, h, w)
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList([Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g,
                                              "up" if i < n - 1 else None) for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):  # (N, 4, h, w) -> (N, 3, H, W)
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def _blend_(a, b, n, dim):
    """In place on b: fade from a's trailing n rows (dim=2) or columns (dim=3) into b's leading ones."""
    n = min(a.shape[dim], b.shape[dim], n)
    if n > 0:
        r = (torch.arange(n, device=b.device, dtype=torch.float32) / n).to(b.dtype)
        r = r.view(-1, 1) if dim == 2 else r  # broadcast along dim
        b.narrow(dim, 0, n).mul_(r).add_(a.narrow(dim, a.shape[dim] - n, n) * (1 - r))


def _tiled(fn, x, tile_in, tile_out, overlap):
    """Apply fn to overlapping tiles of x and blend (diffusers' order: above, then left, each
    neighbour already blended); tile_in/tile_out = tile side before/after fn. Keeps two rows of tiles."""
    stride, n = int(tile_in * (1 - overlap)), int(tile_out * overlap)
    keep, above, rows = tile_out - n, None, []
    for i in range(0, x.shape[2], stride):
        row = []
        for j in range(0, x.shape[3], stride):
            tile = fn(x[:, :, i:i + tile_in, j:j + tile_in])
            if above is not None:
                _blend_(above[len(row)], tile, n, dim=2)
            if row:
                _blend_(row[-1], tile, n, dim=3)
            row.append(tile)
        rows.append(torch.cat([tile[:, :, :keep, :keep] for tile in row], dim=3))  # each tile owns keep x keep
        above = row
    return torch.cat(rows, dim=2)


class AutoencoderKL(nn.Module):
    def __init__(self, config=SDXL):
        super().__init__()
        self.config = config = dataclasses.replace(config)  # own copy: tests may change tile fields
        self.encoder, self.decoder = Encoder(config), Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.factor = config.factor  # pixels per latent per side

    @property
    def scaling_factor(self):
        return self.config.scaling_factor

    def _check(self, x, channels, what):
        w = self.quant_conv.weight
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must be (N, {channels}, H, W), got shape {tuple(x.shape)}")
        if w.dtype == torch.float16 and self.config.force_upcast:
            raise ValueError("this VAE (force_upcast, e.g. SDXL's) overflows in float16: use vae.float() or "
                             "vae.to(torch.bfloat16); weights.load_vae(..., dtype=torch.float16) upcasts to float32")
        return x.to(w.device, w.dtype)  # results come back in the input's dtype, on the model's device

    def _run(self, fn, x, tiled, pixels, tile_in, tile_out):
        if tiled is None:  # by size: above config.tile_above pixels
            tiled = pixels > self.config.tile_above
        return _tiled(fn, x, tile_in, tile_out, self.config.tile_overlap) if tiled else fn(x)

    def encode(self, images, sample=False, generator=None, tiled=None):
        """images (N, 3, H, W) in [-1, 1] -> scaled latents (N, 4, H/8, W/8): the posterior mean (mode),
        or with sample=True mean + std·ε (ε from `generator`, drawn like diffusers' latent_dist.sample).
        tiled=None tiles above config.tile_above pixels; True/False forces it. Returns images.dtype."""
        x, side = self._check(images, self.config.in_channels, "images"), self.config.tile_latent  # tile side, latents
        enc = lambda x: self.quant_conv(self.encoder(x))  # (N, 3, H, W) -> (N, 8, h, w)
        moments = self._run(enc, x, tiled, x.shape[2] * x.shape[3], side * self.factor, side)
        mean, logvar = moments.contiguous().chunk(2, dim=1)  # (N, 4, h, w) each
        if sample:
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                              device=generator.device if generator is not None else mean.device)
            mean = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps.to(mean.device)
        return (mean * self.scaling_factor).to(images.dtype)

    def decode(self, latents, tiled=None):
        """Scaled latents (N, 4, h, w) -> images (N, 3, 8h, 8w) in about [-1, 1], not clamped; tiled as in
        encode. Returns latents.dtype."""
        z = self._check(latents, self.config.latent_channels, "latents") / self.scaling_factor
        side = self.config.tile_latent  # tile side, in latents
        dec = lambda z: self.decoder(self.post_quant_conv(z))  # (N, 4, h, w) -> (N, 3, H, W)
        images = self._run(dec, z, tiled, z.shape[2] * z.shape[3] * self.factor**2, side, side * self.factor)
        return images.contiguous().to(latents.dtype)


def convert_old_attention(sd):
    """Older diffusers files name the attention projections query/key/value/proj_attn."""
    names = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    return {re.sub(r"\.(query|key|value|proj_attn)\.", lambda m: names[m.group(0)], k): v for k, v in sd.items()}


def convert_ldm(sd):
    """The original single-file LDM/SGM layout (sdxl_vae.safetensors, first_stage_model.* in SD checkpoints).
    Its decoder counts levels from the output side (up.0 = full resolution), diffusers' from the input side;
    attention q/k/v/proj_out are 1x1 convs (C, C, 1, 1) there and Linear (C, C) here."""
    sd = {re.sub(r"^(first_stage_model|vae)\.", "", k): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}  # discriminator/LPIPS of training ckpts
    n = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up\.(\d+)\.", k))), default=0)
    rules = [(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
             (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
             (r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{n - 1 - int(m.group(1))}.resnets."),
             (r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{n - 1 - int(m.group(1))}.upsamplers.0."),
             (r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}."),
             (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
             (r"\.mid\.attn_1\.(q|k|v)\.", r".mid_block.attentions.0.to_\1."),
             (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
             (r"\.nin_shortcut\.", ".conv_shortcut."), (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.")]
    out = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v[:, :, 0, 0] if ".attentions.0.to_" in k and k.endswith("weight") and v.ndim == 4 else v
    return out
