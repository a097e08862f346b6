"""
ControlNet for PixArt, as PixArt-δ's "ControlNet-Transformer" (Chen et al., "PixArt-δ: Fast and Controllable Image
Generation with Latent Consistency Models", arXiv 2401.05252, §4), in one file.

ControlNet (Zhang et al., arXiv 2302.05543) steers a frozen text-to-image model with a spatial condition (an edge
map, a depth map, an outline) by training a copy of the model's encoder and adding its features back through
zero-initialised layers. A DiT has no encoder to copy, so PixArt-δ copies its first N transformer blocks. Deltas
against the UNet ControlNet:
- no condition encoder: the condition image is VAE-encoded like the image and embedded by the base model's own
  frozen patch embedding and position table (`base_model.tokens`).
- base block 0 runs without control; copy 0 sees block 0's OUTPUT x plus `before_proj(c)`; copy j > 0 sees only
  copy j-1's output: the control stream is a residual stream of its own, meeting x only through `after_proj`.
- copy j's `after_proj` output is added to the INPUT of base block j+1 (blocks 1..N); deeper blocks and the final
  layer are untouched. Copies share the base's timestep modulation t0, caption and mask.
- `before_proj` and every `after_proj` start at zero, so training starts from exactly the base model, and only the
  copies learn (~295M of XL/2's 611M parameters with N = 13).
Beyond the official code: `control_scale` multiplies every residual (0 = the base model exactly), and a base with
KV compression keeps it (a copy of a compressed block compresses too).

Letters as sigma.py: N batch, C latent channels, T image tokens, D width. Module names ARE the official checkpoint's
keys (`base_model.*`, `controlnet.{i}.copied_block.*`, `controlnet.0.before_proj.*`, `controlnet.{i}.after_proj.*`),
so the released .pth loads as the identity; diffusers' research layout goes through `convert_diffusers` (files:
weights.py).

    model = ControlPixArt(base)                  # or weights.load_checkpoint("PixArt-XL-2-512-ControlNet.pth")
    out = model(x, t, y, mask, control=c)        # c: the condition's latent, (N, C, H, W) like x
    out = model(x, t, y, mask)                   # no control: the base model
"""
import copy
import re

import torch
import torch.nn as nn

import sigma


def default_copies(depth):
    """How many blocks to copy: the shallow half after block 0 (copies feed blocks 1..N), 13 of 28 as PixArt-δ."""
    return max(depth // 2 - 1, 1)


class ControlBlock(nn.Module):
    """One trainable copy of a base block, with its zero-initialised output projection (and the input one on copy 0)."""

    def __init__(self, block, first):
        super().__init__()
        D = block.scale_shift_table.shape[1]
        self.copied_block = copy.deepcopy(block)  # starts as the base block's weights (ControlNet's "trainable copy")
        if first:
            self.before_proj = nn.Linear(D, D)
        self.after_proj = nn.Linear(D, D)
        for proj in (getattr(self, "before_proj", None), self.after_proj):
            if proj is not None:  # zero: the copy adds nothing until it has learned something (ControlNet §3.1)
                nn.init.zeros_(proj.weight)
                nn.init.zeros_(proj.bias)

    def forward(self, x, c, y, mask, t0, hw):
        """x: base block 0's output (used by copy 0 only), c: the control stream, both (N, T, D)."""
        if hasattr(self, "before_proj"):
            c = x + self.before_proj(c)
        c = self.copied_block(c, y, mask, t0, hw)  # (N, T, D): the next copy's input
        return c, self.after_proj(c)  # and the residual for base block j+1


class ControlPixArt(nn.Module):
    def __init__(self, base, copies=None):
        super().__init__()
        depth = base.config.depth
        copies = default_copies(depth) if copies is None else copies
        if not 1 <= copies < depth:  # copy j feeds block j+1, which must exist
            raise ValueError(f"a ControlNet copies 1 to {depth - 1} blocks of this {depth}-block model, got {copies}")
        self.config = base.config
        self.controlnet = nn.ModuleList([ControlBlock(base.blocks[i], i == 0) for i in range(copies)])
        self.controlnet.requires_grad_(True)  # even when the blocks were copied from a frozen model
        self.base_model = base.requires_grad_(False)  # frozen: only the copies learn

    def forward(self, x, t, y, mask, control=None, control_scale=1.0):
        """sigma.PixArtSigma's forward, plus `control` (N, C, H, W): the condition's latent. A batch of n conditions
        serves a k·n batch in order (classifier-free guidance runs [unconditional; conditional], both controlled)."""
        base = self.base_model
        if control is None:
            return base(x, t, y, mask)
        if control.shape[1:] != x.shape[1:] or len(x) % len(control):
            raise ValueError(f"control must be a latent shaped like x {tuple(x.shape)}, got {tuple(control.shape)}")
        c, _ = base.tokens(control.repeat(len(x) // len(control), 1, 1, 1))  # (N, T, D): frozen patch + pos embedding
        x, t, t0, y, mask, hw = base.embed(x, t, y, mask)  # (N, T, D), …
        x = base.run(base.blocks[0], x, y, mask, t0, hw)  # block 0 never sees the control
        for j, block in enumerate(self.controlnet):
            c, residual = base.run(block, x, c, y, mask, t0, hw)  # copy 0 reads block 0's output; later copies ignore x
            x = base.run(base.blocks[j + 1], x + control_scale * residual, y, mask, t0, hw)
        for block in base.blocks[len(self.controlnet) + 1:]:
            x = base.run(block, x, y, mask, t0, hw)
        return base.head(x, t, hw)


# ----------------------------------------------------------------------------------------------------
# diffusers' research-project adapter (examples/research_projects/pixart, PixArtControlNetAdapterModel; SimpleTuner's Σ
# ControlNet too) names copy i `controlnet_blocks.i` and its block `transformer_block`, in diffusers' block names
# (sigma.DIFFUSERS_BLOCK). Reading and writing the files: weights.py.
COPY = (r"^blocks\.(\d+)\.", r"controlnet.\1.copied_block.")  # sigma's block names, inside copy i
ADAPTER = (r"^transformer_blocks\.(\d+)\.", r"controlnet_blocks.\1.transformer_block.")  # diffusers' block names, inside it


def convert_diffusers(sd):
    """diffusers' adapter state dict -> ours, `controlnet.*` (pure; keys it does not name pass through)."""
    # each copy's block under the name sigma.convert_diffusers reads (transformer_blocks.i), then under ours
    sd = {re.sub(r"^controlnet_blocks\.(\d+)\.transformer_block\.", r"transformer_blocks.\1.", k): v for k, v in sd.items()}
    return {re.sub(*COPY, re.sub(r"^controlnet_blocks\.", "controlnet.", k)): v for k, v in sigma.convert_diffusers(sd).items()}


def diffusers_pairs(copies):
    """(our tensor name, its diffusers names: one, or the parts of a fused tensor) for `copies` copies."""
    pairs = [(re.sub(*COPY, a), tuple(re.sub(*ADAPTER, n) for n in b))
             for a, b in sigma.diffusers_pairs(copies) if a.startswith("blocks.")]
    projs = ["controlnet.0.before_proj"] + [f"controlnet.{i}.after_proj" for i in range(copies)]
    return pairs + [(p + s, (p.replace("controlnet.", "controlnet_blocks.") + s,)) for p in projs for s in (".weight", ".bias")]
