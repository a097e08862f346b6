"""
PixArt-Σ, the Diffusion Transformer (Chen et al., "PixArt-Σ: Weak-to-Strong Training of Diffusion
Transformer for 4K Text-to-Image Generation", arXiv 2403.04692), in one file.

The network is DiT (Peebles & Xie, arXiv 2212.09748) turned into a text-to-image model. Deltas against DiT:
- adaLN-single: the timestep goes through ONE shared MLP (`t_block`) to 6 modulation vectors; each block
  only adds its own learned `scale_shift_table` to them (DiT has a modulation MLP per block: -27% params).
- text comes in through a cross-attention after every self-attention, over T5-XXL features (N, 300, 4096);
  padded caption tokens get zero attention weight.
- position embeddings are recomputed for any token grid, scaled by `pe_interpolation` so that every
  released model sees positions in [0, 32) whatever its training resolution (multi-aspect, up to 4K).
- KV token compression (the paper's contribution, §3.2): in the deep layers the keys and values, not the
  queries, are merged 2×2 by a depthwise conv + LayerNorm, so self-attention costs 4× less at 4K.
- the output has 8 channels: 4 for ε and 4 that interpolate the variance (IDDPM's learned range).

Letters: N batch, C latent channels, H×W latent size, h×w token grid, T = h·w image tokens,
L caption tokens, D width, S heads. Module names ARE the official checkpoint's keys, so an official
.pth loads as the identity; diffusers' layout goes through `convert_diffusers` (files: weights.py).

    model = weights.load_checkpoint("PixArt-Sigma-XL-2-1024-MS.pth")   # or a diffusers folder, or our own
    out = model(x, t, y, mask)                                         # (N, 8, H, W): ε and variance
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class SigmaConfig:
    depth: int = 28                     # transformer blocks
    hidden_size: int = 1152             # D
    num_heads: int = 16                 # S heads of 72
    patch_size: int = 2                 # p: latent p×p patches become tokens
    in_channels: int = 4                # C: SDXL-VAE latent channels
    out_channels: int = 8               # ε (C) + variance interpolation (C)
    mlp_ratio: float = 4.0
    caption_channels: int = 4096        # T5-XXL width
    caption_tokens: int = 300           # T5 sequence length the model was trained with
    sample_size: int = 128              # latent size of the training resolution (1024 px / 8)
    pe_interpolation: float = 2.0       # training size / 512: keeps positions in [0, 32)
    kv_compress_layers: tuple = ()      # block indices with KV compression (paper: the deep half, 14..27)
    kv_compress_ratio: int = 2          # keys/values merged ratio×ratio
    kv_compress_mode: str = "conv"      # 'conv' (learned, paper) | 'uniform' (strided) | 'avgpool' (2×2 mean)

    def __post_init__(self):
        self.kv_compress_layers = tuple(int(i) for i in self.kv_compress_layers)
        if self.kv_compress_mode not in ("conv", "uniform", "avgpool"):
            raise ValueError(f"kv_compress_mode must be 'conv', 'uniform' or 'avgpool', got {self.kv_compress_mode!r}")
        if bad := [i for i in self.kv_compress_layers if not 0 <= i < self.depth]:
            raise ValueError(f"kv_compress_layers {bad} outside the {self.depth} blocks")


# The released XL/2 models (PixArt-alpha/PixArt-Sigma-XL-2-*; their diffusers configs): same network, different training resolution.
CONFIGS = {
    "256": SigmaConfig(sample_size=32, pe_interpolation=0.5),
    "512": SigmaConfig(sample_size=64, pe_interpolation=1.0),
    "1024": SigmaConfig(sample_size=128, pe_interpolation=2.0),
    "2K": SigmaConfig(sample_size=256, pe_interpolation=4.0),
}


def deep_half(depth):
    """Where KV compression goes by default: the deep half of the blocks (paper Tab. 3d: it costs the least there)."""
    return tuple(range(depth // 2, depth))


KV_DEEP_HALF = deep_half(28)  # the official KV-compression config: blocks 14..27


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def sincos_1d(dim, pos):
    """(P,) positions -> (P, dim) [sin | cos] features, frequencies 1/10000^(i/(dim/2)), in float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.double()[:, None] * omega[None]  # (P, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def pos_embed_2d(dim, h, w, base_size, pe_interpolation):
    """(h·w, dim) position table for an h×w grid; row-major tokens, first half encodes the column."""
    # Positions are rescaled to the training grid (base_size) and divided by pe_interpolation, so a
    # model trained at 1024² (base 64, interpolation 2) sees [0, 32) on any grid: this is the whole
    # "higher resolution" step of weak-to-strong training. Float32 grid, float64 sin/cos, as the official code.
    grid_h = torch.arange(h, dtype=torch.float32) / (h / base_size) / pe_interpolation
    grid_w = torch.arange(w, dtype=torch.float32) / (w / base_size) / pe_interpolation
    gh, gw = torch.meshgrid(grid_h, grid_w, indexing="ij")  # (h, w) each
    return torch.cat([sincos_1d(dim // 2, gw.flatten()), sincos_1d(dim // 2, gh.flatten())], dim=1).float()


def timestep_embedding(t, dim=256, max_period=10000):
    """(N,) timesteps -> (N, dim) [cos | sin] features (DiT/ADM convention), float32."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, dtype=torch.float32, device=t.device) / (dim // 2))
    args = t.float()[:, None] * freqs[None]  # (N, dim/2)
    return torch.cat([args.cos(), args.sin()], dim=1)


class Mlp(nn.Module):  # fc1 -> GELU(tanh) -> fc2: the block MLP and the caption projection
    def __init__(self, d_in, d_hidden, d_out):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TimestepEmbedder(nn.Module):
    def __init__(self, D):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))

    def forward(self, t):
        return self.mlp(timestep_embedding(t).to(self.mlp[0].weight.dtype))  # (N, D)


class CaptionEmbedder(nn.Module):
    def __init__(self, c_in, D, tokens):
        super().__init__()
        self.y_proj = Mlp(c_in, D, D)
        # The null caption T5("") kept with the weights (official checkpoints store it; caption dropout uses it).
        self.register_buffer("y_embedding", torch.randn(tokens, c_in) / c_in**0.5)

    def forward(self, y):
        return self.y_proj(y)  # (N, L, D)


class SelfAttention(nn.Module):
    """Multi-head self-attention over image tokens, optionally with KV token compression (paper §3.2)."""

    def __init__(self, D, num_heads, kv_compress=None, ratio=2):
        super().__init__()
        self.num_heads, self.kv_compress, self.ratio = num_heads, kv_compress, ratio
        self.qkv = nn.Linear(D, 3 * D)  # fused q, k, v
        self.proj = nn.Linear(D, D)
        if kv_compress == "conv":
            # One depthwise ratio×ratio conv, shared by K and V, then a LayerNorm (average_init)
            self.sr = nn.Conv2d(D, D, kernel_size=ratio, stride=ratio, groups=D)
            self.norm = nn.LayerNorm(D)

    @torch.no_grad()
    def average_init(self):
        """The paper's init of the compression (§3.2): the conv a plain ratio×ratio average (weights 1/ratio², bias 0),
        the LayerNorm at 1/0, so that adding it to a trained model starts close to no compression."""
        nn.init.constant_(self.sr.weight, 1 / self.ratio**2)
        nn.init.zeros_(self.sr.bias)
        self.norm.reset_parameters()

    def compress(self, kv, hw):
        """(M, T, D) keys or values on an h×w grid -> (M, T/ratio², D)."""
        (h, w), r = hw, self.ratio
        M, T, D = kv.shape
        if h % r or w % r:
            raise ValueError(f"KV compression ×{r} needs a token grid divisible by {r}, got {h}×{w} tokens: "
                             f"use image sides that are multiples of {8 * 2 * r} px (latent multiples of {2 * r})")
        if self.kv_compress == "uniform":  # keep the top-left token of every r×r patch
            return kv.view(M, h, w, D)[:, ::r, ::r].reshape(M, -1, D)
        kv = kv.transpose(1, 2).reshape(M, D, h, w)  # (M, D, h, w)
        if self.kv_compress == "avgpool":
            return F.avg_pool2d(kv, r).flatten(2).transpose(1, 2)  # (M, T/r², D)
        return self.norm(self.sr(kv).flatten(2).transpose(1, 2))  # (M, T/r², D)

    def forward(self, x, hw):
        N, T, D = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 × (N, T, D)
        if self.kv_compress:
            k, v = self.compress(torch.cat([k, v]), hw).chunk(2)  # 2 × (N, T/r², D); queries keep all T
        q, k, v = (z.view(N, -1, self.num_heads, D // self.num_heads).transpose(1, 2) for z in (q, k, v))  # (N, S, ·, D/S)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, S, T, D/S)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to caption tokens (keys/values); padded tokens are masked out."""

    def __init__(self, D, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(D, D)
        self.kv_linear = nn.Linear(D, 2 * D)  # fused k, v
        self.proj = nn.Linear(D, D)

    def forward(self, x, y, mask):
        (N, T, D), L, S = x.shape, y.shape[1], self.num_heads
        q = self.q_linear(x).view(N, T, S, D // S).transpose(1, 2)  # (N, S, T, D/S)
        k, v = self.kv_linear(y).view(N, L, 2, S, D // S).permute(2, 0, 3, 1, 4)  # 2 × (N, S, L, D/S)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask (N, 1, 1, L): exact zero weight
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class PixArtBlock(nn.Module):
    def __init__(self, config, kv_compress=None):
        super().__init__()
        D = config.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(D, config.num_heads, kv_compress, config.kv_compress_ratio)
        self.cross_attn = CrossAttention(D, config.num_heads)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(D, int(D * config.mlp_ratio), D)
        self.scale_shift_table = nn.Parameter(torch.randn(6, D) / D**0.5)  # adaLN-single: per-block offsets

    def forward(self, x, y, mask, t0, hw):
        N, D = x.shape[0], x.shape[2]
        mods = (self.scale_shift_table[None] + t0.view(N, 6, D)).chunk(6, dim=1)  # 6 × (N, 1, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), hw)
        x = x + self.cross_attn(x, y, mask)  # no norm, no modulation, no gate (as the released models)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, D, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(D, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, D) / D**0.5)

    def forward(self, x, t):
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # 2 × (N, 1, D); raw t, not t0
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p·p·C_out)


class PatchEmbed(nn.Module):
    def __init__(self, p, c_in, D):
        super().__init__()
        self.proj = nn.Conv2d(c_in, D, kernel_size=p, stride=p)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D), row-major


class PixArtSigma(nn.Module):
    def __init__(self, config: SigmaConfig):
        super().__init__()
        self.config, D = config, config.hidden_size
        self.gradient_checkpointing = False
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))  # adaLN-single, shared by all blocks
        self.y_embedder = CaptionEmbedder(config.caption_channels, D, config.caption_tokens)
        self.blocks = nn.ModuleList([
            PixArtBlock(config, config.kv_compress_mode if i in config.kv_compress_layers else None)
            for i in range(config.depth)])
        self.final_layer = FinalLayer(D, config.patch_size, config.out_channels)
        self._pos_cache = {}
        self.initialize_weights()

    def initialize_weights(self):
        """Init for training from scratch (official PixArt / DiT recipe)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):  # xavier everywhere, zero bias
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight  # patch embed initialised like a Linear (DiT)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1],
                    self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2):
            nn.init.normal_(lin.weight, std=0.02)  # small conditioning MLPs (DiT §3.2, PixArt)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)  # zero: each cross-attention starts as identity
            nn.init.zeros_(block.cross_attn.proj.bias)
            if hasattr(block.attn, "sr"):  # averaging conv: compression starts as 2×2 mean pooling
                block.attn.average_init()
        nn.init.zeros_(self.final_layer.linear.weight)  # zero: the model starts by predicting 0
        nn.init.zeros_(self.final_layer.linear.bias)

    def compile_blocks(self, **kwargs):
        """Regional compilation (--compile): torch.compile(**kwargs) each block in place, so the keys stay (no
        `_orig_mod.`). The blocks share one forward: built once (and once for KV blocks), not 28 unrolled. A new
        image size or caption length recompiles once, with dynamic shapes; later ones and the steps reuse it."""
        for block in self.blocks:
            block.compile(**kwargs)
        return self

    def pos_embed(self, h, w, device, dtype):
        key = (h, w, device, dtype)
        if key not in self._pos_cache:
            c = self.config
            base = c.sample_size // c.patch_size  # the token grid of the training resolution
            self._pos_cache[key] = pos_embed_2d(c.hidden_size, h, w, base, c.pe_interpolation).to(device, dtype)
        return self._pos_cache[key]  # (T, D)

    def tokens(self, x):  # a latent (N, C, H, W) -> its patches with positions (N, T, D), and the token grid (h, w)
        (H, W), p, dtype = x.shape[-2:], self.config.patch_size, self.x_embedder.proj.weight.dtype
        if H % p or W % p:
            raise ValueError(f"latent sides must be multiples of the patch size {p}, got {H}×{W}")
        return self.x_embedder(x.to(dtype)) + self.pos_embed(H // p, W // p, x.device, dtype), (H // p, W // p)

    def embed(self, x, t, y, mask):
        """Everything before the blocks: image tokens, t (N, D) for the final layer, t0 (N, 6D), caption tokens."""
        (x, hw), N, dtype = self.tokens(x), x.shape[0], self.x_embedder.proj.weight.dtype  # (N, T, D)
        t = self.t_embedder(t.expand(N) if t.dim() == 0 else t)  # (N, D)
        y = self.y_embedder(y.to(dtype))  # (N, L, D); callers cut the padding first (diffusion.drop_padding)
        return x, t, self.t_block(t), y, mask.bool()[:, None, None, :], hw  # mask (N, 1, 1, L): True = attend

    def run(self, block, *args):  # a block (or a ControlNet copy), through gradient checkpointing when training with it
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        return checkpoint(block, *args, use_reentrant=False) if ckpt else block(*args)

    def head(self, x, t, hw):  # the final layer, and unpatchify: (N, T, D) -> (N, C_out, H, W)
        (h, w), p, C = hw, self.config.patch_size, self.config.out_channels
        x = self.final_layer(x, t).view(-1, h, w, p, p, C)  # (N, h, w, p, p, C_out)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(-1, C, h * p, w * p)

    def forward(self, x, t, y, mask):
        """x (N, C, H, W) latent, t (N,) timesteps, y (N, L, 4096) caption features, mask (N, L) 1 = real."""
        x, t, t0, y, mask, hw = self.embed(x, t, y, mask)
        for block in self.blocks:
            x = self.run(block, x, y, mask, t0, hw)
        return self.head(x, t, hw)


# ----------------------------------------------------------------------------------------------------
# The same tensors in diffusers' PixArtTransformer2DModel: ours -> theirs, a tuple where ours fuses their Linears on
# dim 0; DIFFUSERS_BLOCK inside blocks.i -> transformer_blocks.i. Reading and writing the files: weights.py.
DIFFUSERS = {"x_embedder.proj": "pos_embed.proj", "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
             "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2", "t_block.1": "adaln_single.linear",
             "y_embedder.y_proj.fc1": "caption_projection.linear_1", "y_embedder.y_proj.fc2": "caption_projection.linear_2",
             "final_layer.linear": "proj_out", "final_layer.scale_shift_table": "scale_shift_table"}
DIFFUSERS_BLOCK = {"attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "attn.proj": "attn1.to_out.0",
                   "cross_attn.q_linear": "attn2.to_q", "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
                   "cross_attn.proj": "attn2.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
                   "scale_shift_table": "scale_shift_table"}


def diffusers_pairs(depth):
    """(our tensor name, its diffusers names: one, or the parts of a fused tensor) for a model of `depth` blocks."""
    names = lambda b, prefix="": tuple(prefix + n for n in (b if isinstance(b, tuple) else (b,)))
    mods = [(a, names(b)) for a, b in DIFFUSERS.items()]
    mods += [(f"blocks.{i}.{a}", names(b, f"transformer_blocks.{i}.")) for i in range(depth) for a, b in DIFFUSERS_BLOCK.items()]
    suffixes = lambda a: [""] if a.endswith("scale_shift_table") else [".weight", ".bias"]  # a parameter, or a module's
    return [(a + s, tuple(n + s for n in b)) for a, b in mods for s in suffixes(a)]


def convert_diffusers(sd):
    """diffusers' state dict -> ours (pure; keys it does not name pass through, for the loader to report)."""
    sd, out = dict(sd), {}
    for ours, theirs in diffusers_pairs(len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})):
        if all(n in sd for n in theirs):
            tensors = [sd.pop(n) for n in theirs]
            out[ours] = torch.cat(tensors) if len(tensors) > 1 else tensors[0]  # q, k, v -> our fused qkv
    return {**out, **sd}
