"""The no-download CPU quick start of train.py: synthetic captioned shapes, their tokenizer and a tiny T5.

    python train.py --quickstart          # then look at runs/quickstart/step_*/preview.png
    python sample.py --model runs/quickstart "a red circle on a blue background"   # its latest EMA weights

- Data: "a red circle on a blue background" — 3 shapes × 6 colours × 5 other background colours, drawn
  on the fly (item i from seed i: nothing to download, resumable like any dataset), small random size/offset.
- Text: a word-level sentencepiece model trained on those captions (T5's special ids: pad 0, eos 1, unk 2),
  so t5.Tokenizer and sample.py load it like the real spiece.model; and a 2-layer T5 encoder with frozen
  random weights. A random T5 is enough: every word gets a distinct vector, mixed with its neighbours by the
  relative-position bias, so "red circle on blue" and "blue circle on red" differ.
- Pixel space, no VAE: the DiT denoises 16×16 RGB images directly (as DDPM/IDDPM did on pixels), so there is
  no autoencoder to train first and nothing to download. Two pixel-space details: the images are multiplied
  by 4 (--pixel-scale, a VAE scaling factor in reverse) so that colours and layout are decided at less extreme
  noise levels, where a tiny, briefly trained ε-predictor is accurate enough (x̂0 = (x − σ ε̂)/α multiplies ε̂'s
  error by σ/α ≈ 158 at t = 999); and sampling clips x̂0 to the image range (clip_x0). An EMA of the
  weights (0.995) smooths the last steps' Adam noise out of the samples.
"""
import json
import os
import random
from dataclasses import asdict

import sentencepiece as spm
import torch
from safetensors.torch import save_file

import diffusion
import t5 as t5lib

# train.py --quickstart flags (explicit flags still win), the tiny DiT (pixel space: 3 channels in, ε + v out) and T5
DEFAULTS = dict(image_size=16, no_buckets=True, vae_factor=1, pixel_scale=4.0, batch_size=32, lr=1e-3, optimizer="adamw",
                warmup=100, clip=1.0, ema=0.995, steps=3000, save_every=500, log_every=25, out="runs/quickstart",
                workers=0, caption_tokens=16, lr_scaling=False, preview_every=500, preview_sampler="ancestral",
                preview_prompts="a red circle on a blue background|a green square on a white background|"
                                "a yellow triangle on a black background|a blue circle on a yellow background")
DIT = dict(depth=4, hidden_size=128, num_heads=4, patch_size=2, in_channels=3, out_channels=6,
           caption_channels=64, caption_tokens=16, sample_size=16, pe_interpolation=1.0)
T5 = dict(d_model=64, d_ff=128, num_heads=4, d_kv=16, num_layers=2)


class ShapesDataset(torch.utils.data.Dataset):
    """Synthetic captioned shapes, item i drawn from seed i: "a red circle on a blue background"."""

    COLORS = dict(red=(220, 30, 30), green=(30, 180, 40), blue=(30, 60, 220),
                  yellow=(240, 220, 30), white=(245, 245, 245), black=(15, 15, 15))
    SHAPES = ("circle", "square", "triangle")

    def __init__(self, size=16, length=100_000):
        self.size, self.length = size, length
        self.buckets = ["1.0"] * length

    def __len__(self):
        return self.length

    @classmethod
    def captions(cls):
        return [f"a {c} {s} on a {b} background" for s in cls.SHAPES for c in cls.COLORS for b in cls.COLORS if b != c]

    def __getitem__(self, i):
        rng = random.Random(i)
        shape = rng.choice(self.SHAPES)
        color, bg = rng.sample(list(self.COLORS), 2)
        S = 2 * self.size  # draw at 2x, then average 2x2 pixels: smooth edges
        r = S * rng.uniform(0.22, 0.34)
        cy, cx = S / 2 + S * rng.uniform(-0.1, 0.1), S / 2 + S * rng.uniform(-0.1, 0.1)
        y, x = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
        if shape == "circle":
            inside = (y - cy) ** 2 + (x - cx) ** 2 < r * r
        elif shape == "square":
            inside = ((y - cy).abs() < 0.85 * r) & ((x - cx).abs() < 0.85 * r)
        else:  # upright triangle: apex at the top, base at the bottom
            inside = (y > cy - r) & (y < cy + 0.8 * r) & ((x - cx).abs() < 0.6 * (y - cy + r))
        fg, bgc = torch.tensor(self.COLORS[color]), torch.tensor(self.COLORS[bg])
        img = torch.where(inside[None], fg[:, None, None], bgc[:, None, None]).float()  # (3, S, S)
        img = torch.nn.functional.avg_pool2d(img[None], 2)[0]  # (3, size, size)
        return dict(index=i, image=img / 127.5 - 1, captions=[f"a {color} {shape} on a {bg} background"])


def components(folder, seed=0):
    """A word-level sentencepiece model trained on the shape captions and a tiny random T5, saved in the
    released layout (tokenizer/spiece.model, text_encoder/) so sample.py loads them like the real ones."""
    os.makedirs(os.path.join(folder, "tokenizer"), exist_ok=True)
    os.makedirs(os.path.join(folder, "text_encoder"), exist_ok=True)
    spiece = os.path.join(folder, "tokenizer", "spiece.model")
    if not os.path.exists(spiece):  # 'word' model: one id per word of a closed vocabulary, T5's special ids
        spm.SentencePieceTrainer.train(sentence_iterator=iter(ShapesDataset.captions()), model_prefix=spiece[:-6],
                                       model_type="word", vocab_size=32, hard_vocab_limit=False, pad_id=0,
                                       eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    weights = os.path.join(folder, "text_encoder", "model.safetensors")
    if not os.path.exists(weights):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            cfg = t5lib.T5Config(vocab_size=t5lib.Tokenizer(spiece).sp.get_piece_size(), **T5)
            save_file(t5lib.T5Encoder(cfg).state_dict(), weights)
        json.dump(dict(asdict(cfg), feed_forward_proj="gated-gelu"),
                  open(os.path.join(folder, "text_encoder", "config.json"), "w"))
    return dict(text_encoder=os.path.dirname(weights), tokenizer=spiece, vae=None)


def clip_x0(model_fn, bound=1.0):
    """Pixel-space sampling clips x̂0 = (x − σ ε̂)/α to the image range ±bound (±1 × --pixel-scale; IDDPM's
    clip_denoised): at t = 999, 1/α = 158 turns any ε̂ error into a huge x̂0. Returns the ε of the clipped x̂0."""
    ac = diffusion.alphas_cumprod()

    def fn(x, t):
        out = model_fn(x, t)
        C, a = x.shape[1], ac.to(x.device)[t].float().view(-1, 1, 1, 1)
        x0 = ((x - (1 - a).sqrt() * out[:, :C]) / a.sqrt()).clamp(-bound, bound)
        return torch.cat([(x - a.sqrt() * x0) / (1 - a).sqrt(), out[:, C:]], 1)
    return fn


def save_sample_settings(out, pixel_scale):
    """out/sample.json: what `python sample.py --model <out>` needs besides the weights, so it takes no flags:
    the pixel scale (its presence means pixel space: no VAE, no binning) and the folder of the run's
    text_encoder/ and tokenizer/, relative to the run folder."""
    with open(os.path.join(out, "sample.json"), "w") as f:
        json.dump(dict(pixel_scale=pixel_scale, components="."), f)


def sample_settings(checkpoint):
    """sample.json of the run a checkpoint belongs to (run/sample.json beside run/step_N/model.safetensors) ->
    dict(text_encoder, tokenizer, vae=None, pixel_scale), laid out as hub.resolve_components'; None elsewhere."""
    here = os.path.dirname(os.path.abspath(checkpoint))
    for folder in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(folder, "sample.json")):
            with open(os.path.join(folder, "sample.json")) as f:
                settings = json.load(f)
            comps = os.path.join(folder, settings["components"])
            return dict(text_encoder=os.path.join(comps, "text_encoder"), vae=None, pixel_scale=settings["pixel_scale"],
                        tokenizer=os.path.join(comps, "tokenizer", "spiece.model"))
    return None
