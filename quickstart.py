"""The no-download CPU quick start: synthetic captioned shapes, their tokenizer and a tiny T5, trained by train.py.

    python quickstart.py train            # train.main on this world; then look at runs/quickstart/step_*/preview.png
    python sample.py --model runs/quickstart "a red circle on a blue background"   # its latest EMA weights
    python quickstart.py score runs/quickstart   # the right shape and colours in how many samples
    python quickstart.py lora                    # a LoRA that draws the shapes as outlines, a style never shown
    python quickstart.py score runs/quickstart --lora runs/quickstart_lora   # outlined samples at LoRA scales 0, 0.5, 1
    python quickstart.py controlnet       # a ControlNet on it: shapes where an outline says (OutlineShapes), scored

This file is a user of the product (train.py, sample.py, t5.py): they never import it. weak_to_strong.py runs the
paper's weak-to-strong stages on the same shapes.

- Data: "a red circle on a blue background" — 3 shapes × 6 colours × 5 other background colours, drawn
  on the fly (item i from seed i: nothing to download, resumable like any dataset), near the centre, with
  a slightly random size and offset.
- Text: a word-level sentencepiece model trained on those captions (T5's special ids: pad 0, eos 1, unk 2),
  so tokenizer.Tokenizer and sample.py load it like the real spiece.model; and a 2-layer T5 encoder with frozen
  weights: random, except that its attention reads neighbours (neighbour_heads) — a plain random T5 hardly
  mixes tokens, so "red" meant nearly the same vector as the shape's colour and as the background's.
- Pixel space: the DiT denoises 16×16 RGB images directly (as DDPM/IDDPM did on pixels), so there is no
  autoencoder to train first and nothing to download. The images are multiplied by 4 (PIXEL_SCALE, the VAE's
  scaling_factor) so that colours and layout are decided at less extreme noise levels, where a tiny, briefly
  trained ε-predictor is accurate enough (x̂0 = (x − σ ε̂)/α multiplies ε̂'s error by σ/α ≈ 158 at t = 999); and
  sampling clips x̂0 to the images' range, ±4 (train.py --clip-x0, diffusion.clip_denoised). An EMA of the weights
  (0.995) smooths the last steps' Adam noise out of the samples. The product has no notion of pixel space: to it,
  this is a VAE like SDXL's, one vae.AutoencoderKL file that train.py, sample.py and export.py load (pixel_space).
"""
import functools
import json
import os
import random
import sys
import time
from dataclasses import asdict

import numpy as np
import sentencepiece as spm
import torch
from safetensors.torch import save_file

import sigma
import t5 as t5lib
import vae as vae_lib
import weights
from tokenizer import Tokenizer

PIXEL_SCALE = 4.0  # the "latents" are the images × 4: pixel_space's scaling_factor
# train.py flag defaults of the quick start (explicit flags still win), the tiny DiT (pixel space: 3 channels in, ε + v out) and T5.
# 3 blocks and 2500 steps: 82 ms a step on 2 idle cores the day they were chosen (4 blocks: 122 ms), held-out right
# shapes 99-100% for two seeds (4 blocks: 99% at 2500 steps, 93% at 2000); previews with sample.py's DPM-Solver++
# (20 steps: 0.75 s, IDDPM's 100: 4 s)
DEFAULTS = dict(image_size=16, no_buckets=True, clip_x0=PIXEL_SCALE, batch_size=32, lr=1e-3, optimizer="adamw",
                warmup=100, clip=1.0, ema=0.995, steps=2500, save_every=500, log_every=25, out="runs/quickstart",
                workers=0, caption_tokens=16, lr_scaling=False, preview_every=500,
                preview_prompts="a red circle on a blue background|a green square on a white background|"
                                "a yellow triangle on a black background|a blue circle on a yellow background")
DIT = dict(depth=3, hidden_size=128, num_heads=4, patch_size=2, in_channels=3, out_channels=6,
           caption_channels=64, caption_tokens=16, sample_size=16, pe_interpolation=1.0)
T5 = dict(d_model=64, d_ff=128, num_heads=4, d_kv=16, num_layers=2)


class ShapesDataset(torch.utils.data.Dataset):
    """Synthetic captioned shapes, item i drawn from seed i: "a red circle on a blue background"."""

    COLORS = dict(red=(220, 30, 30), green=(30, 180, 40), blue=(30, 60, 220),
                  yellow=(240, 220, 30), white=(245, 245, 245), black=(15, 15, 15))
    SHAPES = ("circle", "square", "triangle")
    RADIUS, OFFSET = (0.3, 0.36), 0.03  # shape radius and centre offset, as fractions of the image side

    def __init__(self, size=16, length=100_000, outline=0.0):
        self.size, self.length, self.outline = size, length, outline  # outline > 0: the LoRA demo's style (draw)
        self.buckets = ["1.0"] * length

    def __len__(self):
        return self.length

    @classmethod
    def captions(cls, held_out=None):
        """The 90 captions; held_out=True: only the 15 never trained on, False: only the 75 trained on."""
        every = [f"a {c} {s} on a {b} background" for s in cls.SHAPES for c in cls.COLORS for b in cls.COLORS if b != c]
        return every if held_out is None else [c for c in every if (c in cls.held_out()) == held_out]

    @classmethod
    def held_out(cls):
        """15 (shape, colour, background) combinations the data never shows, 5 per shape; every shape, colour and
        background is still seen in 10 or more others, so a model that learned the words can draw them."""
        C = list(cls.COLORS)
        return {f"a {C[(2 * s + j) % 6]} {shape} on a {C[(2 * s + 2 * j + 1) % 6]} background"
                for s, shape in enumerate(cls.SHAPES) for j in range(5)}

    def __getitem__(self, i):
        rng, held_out = random.Random(i), self.held_out()
        while True:  # redraw the held-out combinations: they are for testing only
            shape = rng.choice(self.SHAPES)
            color, bg = rng.sample(list(self.COLORS), 2)
            if f"a {color} {shape} on a {bg} background" not in held_out:
                break
        r, (dy, dx) = rng.uniform(*self.RADIUS), (rng.uniform(-self.OFFSET, self.OFFSET) for _ in "yx")
        return dict(index=i, image=draw(shape, color, bg, self.size, r, dy, dx, self.outline),
                    captions=[f"a {color} {shape} on a {bg} background"])


def draw(shape, color, bg, size, r, dy=0.0, dx=0.0, outline=0.0):
    """(3, size, size) in [-1, 1]: a `color` shape of radius r·size, centre offset (dy, dx)·size, on `bg`; outline > 0:
    only its border, outline·size wide (the style the LoRA demo teaches; the quick start's data never shows it).
    r, dy, dx may also be (K, 1, 1) tensors: K drawings at once, (K, 3, size, size)."""
    S = 2 * size  # draw at 2x, then average 2x2 pixels: smooth edges
    cy, cx = S / 2 + S * dy, S / 2 + S * dx
    y, x = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")

    def within(r):  # the shape of radius r (pixels at 2x)
        if shape == "circle":
            return (y - cy) ** 2 + (x - cx) ** 2 < r * r
        if shape == "square":
            return ((y - cy).abs() < 0.85 * r) & ((x - cx).abs() < 0.85 * r)
        return (y > cy - r) & (y < cy + 0.8 * r) & ((x - cx).abs() < 0.6 * (y - cy + r))  # upright triangle, apex on top
    inside = within(S * r) & ~within(S * (r - outline)) if outline else within(S * r)
    C = ShapesDataset.COLORS
    img = torch.where(inside.unsqueeze(-3), torch.tensor(C[color])[:, None, None], torch.tensor(C[bg])[:, None, None])
    return torch.nn.functional.avg_pool2d(img.float(), 2) / 127.5 - 1  # (3, size, size) or (K, 3, size, size)


@functools.lru_cache(maxsize=None)
def drawings(shape, color, bg, size, outline=0.0):
    """(125, 3, size, size): the drawings score() compares with, at 5 sizes × 5 × 5 positions over the data's range."""
    lo, hi, d = *ShapesDataset.RADIUS, ShapesDataset.OFFSET
    r, dy, dx = torch.meshgrid(torch.linspace(lo, hi, 5), torch.linspace(-d, d, 5), torch.linspace(-d, d, 5), indexing="ij")
    return draw(shape, color, bg, size, *(v.reshape(-1, 1, 1) for v in (r, dy, dx)), outline)  # all 125 at once


@torch.no_grad()
def score(images, prompts):
    """How well samples follow their prompts, judged against the drawing rules above rather than the model:
    each image (3, H, W) in [-1, 1] is compared with the prompt's colours drawn as each of the three shapes at
    every size and position of a grid over the data's range; the nearest drawing names the shape it shows.
    -> dict(shape=fraction whose nearest drawing has the prompt's shape, and the same per prompted shape (circle,
    square, triangle), color=fraction whose centre pixel and corners have the prompt's shape and background
    colours (nearest of the six), rmse=mean distance to the nearest drawing)."""
    C = ShapesDataset.COLORS
    names, palette = list(C), torch.tensor(list(C.values())).float() / 127.5 - 1  # (6, 3)
    shape_ok, color_ok, rmse = {s: [] for s in ShapesDataset.SHAPES}, 0.0, 0.0
    for img, prompt in zip(images, prompts):
        _, color, shape, _, _, bg, _ = prompt.split()
        H = img.shape[-1]
        nearest = {s: ((img - drawings(s, color, bg, H)) ** 2).mean((1, 2, 3)).min().item() for s in ShapesDataset.SHAPES}
        best = min(nearest, key=nearest.get)
        shape_ok[shape].append(best == shape)
        rmse += nearest[best] ** 0.5
        centre, corners = img[:, H // 2, H // 2], img[:, [0, 0, -1, -1], [0, -1, 0, -1]].T  # (3,), (4, 3)
        name = lambda px: names[((palette - px) ** 2).sum(1).argmin()]
        color_ok += name(centre) == color and all(name(c) == bg for c in corners)
    n = len(prompts)
    per_shape = {s: sum(ok) / len(ok) for s, ok in shape_ok.items() if ok}
    return dict(shape=sum(map(sum, shape_ok.values())) / n, color=color_ok / n, rmse=rmse / n, **per_shape)


@torch.no_grad()
def score_style(images, prompts, outline):
    """The LoRA demo's judge, as score(): each image (3, H, W) in [-1, 1] against the prompt's colours drawn as each
    shape, filled and as outlines `outline` wide, at every size and position of the data's range. -> dict(outlined=
    fraction whose nearest drawing is an outline, shape=fraction whose nearest drawing has the prompt's shape)."""
    outlined = right = 0
    for img, prompt in zip(images, prompts):
        _, color, shape, _, _, bg, _ = prompt.split()
        H = img.shape[-1]
        nearest = {(s, o): ((img - drawings(s, color, bg, H, o)) ** 2).mean((1, 2, 3)).min().item()
                   for s in ShapesDataset.SHAPES for o in (0.0, outline)}
        best_shape, best_outline = min(nearest, key=nearest.get)
        outlined, right = outlined + (best_outline > 0), right + (best_shape == shape)
    return dict(outlined=outlined / len(prompts), shape=right / len(prompts))


def components(folder, seed=0):
    """A word-level sentencepiece model trained on the shape captions, a tiny frozen T5 (random weights,
    neighbour_heads attention) and the pixel space as a VAE, saved in the released layout (tokenizer/spiece.model,
    text_encoder/, vae/) so that train.py and sample.py load them like the real ones."""
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
            cfg = t5lib.T5Config(vocab_size=Tokenizer(spiece).sp.get_piece_size(), **T5)
            save_file(neighbour_heads(t5lib.T5Encoder(cfg)).state_dict(), weights)
        json.dump(dict(asdict(cfg), feed_forward_proj="gated-gelu"),
                  open(os.path.join(folder, "text_encoder", "config.json"), "w"))
    return dict(text_encoder=os.path.dirname(weights), tokenizer=spiece, vae=pixel_space(os.path.join(folder, "vae")))


@torch.no_grad()
def pixel_space(folder, scale=PIXEL_SCALE, big=2.0**12):
    """The quick start's pixel space as a VAE: encode x -> scale·x, decode z -> z/scale, one latent per pixel (3
    channels), to float32 rounding (~1e-7). It is written as a vae.AutoencoderKL in diffusers' layout
    (folder/config.json, diffusion_pytorch_model.safetensors), so that the product loads it through its one VAE path.
    The weights make the network linear:
    - one level (no downsampling); every residual branch (resnet conv2, attention to_out) is zero: blocks pass through;
    - conv_in carries each colour c as the 4 channels of one GroupNorm group: x_c, -x_c, +big, -big. The group's
      mean is then exactly 0 and its variance (x_c² + big²)/2 is big²/2 to within x²/big² (< 1e-7 for |x| < 1.2),
      so the last GroupNorm only divides by the constant big/√2;
    - SiLU(a) - SiLU(-a) = a·σ(a) + a·σ(-a) = a: conv_out takes that difference of the x_c and -x_c channels,
      times big/√2. The quant convs are identities; scaling_factor multiplies by `scale` and divides it back."""
    if os.path.exists(os.path.join(folder, "diffusion_pytorch_model.safetensors")):
        return folder
    cfg = vae_lib.VAEConfig(block_out_channels=(12,), layers_per_block=0, latent_channels=3, norm_num_groups=3,
                            scaling_factor=scale, force_upcast=False)
    vae = vae_lib.AutoencoderKL(cfg)
    for p in vae.parameters():
        p.zero_()
    for norm in (m for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)):
        norm.weight.fill_(1)
    for conv_in, conv_out in ((vae.encoder.conv_in, vae.encoder.conv_out), (vae.decoder.conv_in, vae.decoder.conv_out)):
        for c in range(3):  # group c: channels 4c .. 4c + 3; 3x3 kernels, centre tap only
            conv_in.weight[4 * c, c, 1, 1], conv_in.weight[4 * c + 1, c, 1, 1] = 1, -1
            conv_in.bias[4 * c + 2], conv_in.bias[4 * c + 3] = big, -big
            conv_out.weight[c, 4 * c, 1, 1], conv_out.weight[c, 4 * c + 1, 1, 1] = big / 2**0.5, -big / 2**0.5
    for quant in (vae.quant_conv, vae.post_quant_conv):
        quant.weight.copy_(torch.eye(quant.weight.shape[0])[:, :, None, None])
    os.makedirs(folder, exist_ok=True)
    save_file(vae.state_dict(), os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(asdict(cfg), f)
    return folder


@torch.no_grad()
def neighbour_heads(model, offsets=(-1, 1, -2, 2), bias=10.0, gain=3.0):
    """Make a random T5 mix each word with its neighbours, so a word's vector says where it stands. Head h
    attends by position only (q = k = 0) to the token at relative offset offsets[h]: a bias of +10 on that
    offset's bucket; the output projections are scaled ×3 so the neighbours' share is not drowned by the
    residual. Measured with the quick start's tokenizer: "red" as the shape's colour vs as the background's
    has cosine 0.98 in a plain random T5 and 0.63 after this; samples with the right colours at 1500 steps
    went from 7% to 81%. Still a standard T5: t5.py and transformers load it unchanged."""
    attention = [block.layer[0].SelfAttention for block in model.encoder.block]
    if len(offsets) != model.config.num_heads:
        raise ValueError(f"one offset per head: {len(offsets)} offsets for {model.config.num_heads} heads")
    table = attention[0].relative_attention_bias.weight  # (buckets, heads), shared by all blocks
    table.zero_()
    for h, offset in enumerate(offsets):
        bucket = t5lib.relative_position_bucket(torch.tensor(offset), model.config.relative_attention_num_buckets,
                                                model.config.relative_attention_max_distance)
        table[bucket, h] = bias
    for a in attention:
        a.q.weight.zero_()
        a.k.weight.zero_()
        a.o.weight.mul_(gain)
    return model


GRID_PROMPTS = ["a red circle on a blue background", "a green square on a white background",
                "a yellow triangle on a black background", "a blue circle on a yellow background",
                "a white square on a red background", "a black triangle on a green background",
                "a red circle on a green background", "a yellow square on a black background"]  # last 3: held out


def busy_cores(seconds=0.5):
    """How many cores other work keeps busy now: the non-idle share of /proc/stat's CPU time over `seconds` (Linux),
    else the 1-minute load average (which trails: a job that just ended still counts)."""
    def ticks():  # user nice system idle iowait irq softirq steal: (all, idle + iowait)
        cpu = [int(v) for v in open("/proc/stat").readline().split()[1:9]]
        return sum(cpu), cpu[3] + cpu[4]
    try:
        (all0, idle0), _, (all1, idle1) = ticks(), time.sleep(seconds), ticks()
        return (1 - (idle1 - idle0) / max(1, all1 - all0)) * (os.cpu_count() or 1)
    except OSError:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def pick_threads(prog):
    """Torch threads for these small models: the cores idle now, at least one; OMP_NUM_THREADS, when set, decides.
    Their matrix products are small, so the threads of one op wait for each other: on 2 idle cores 2 threads run a
    quick-start step 1.7x faster than 1, but while another job holds a core they run it several times slower than 1
    thread does (README, 'CPU quick start')."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores, busy = torch.get_num_threads(), busy_cores()  # torch's default: the cores it may use
    threads = max(1, min(cores, round(cores - busy)))
    torch.set_num_threads(threads)
    print(f"{prog}: {threads} torch thread{'s' * (threads > 1)}: {busy:.1f} of {cores} cores busy with other work "
          "(OMP_NUM_THREADS=N to choose)")
    return threads


def train(argv=None):
    """python quickstart.py train [train.py flags]: train.main on the shapes, with this file's tokenizer, T5, pixel
    space and DiT."""
    import cli
    import train as trainer
    args = cli.parse_train_args(argv, DEFAULTS, need_data=False, own_components=True)
    model = trainer.main(args, ShapesDataset(args.image_size), components(args.out, args.seed), sigma.SigmaConfig(**DIT))
    look_at(args.out)
    print(f"score it: python quickstart.py score {args.out}")
    return model


def look_at(run):
    """Name the run's last preview, the picture a person looks at first."""
    if os.path.exists(preview := os.path.join(weights.latest_checkpoint(run), "preview.png")):
        print(f"look at it: {preview} (the preview prompts, 4 seeds each, 8x larger)")


# The LoRA demo: the quick-start DiT, frozen, learns in rank-8 adapters to draw its shapes as outlines, a style its data
# never shows. Flags before the user's (theirs win). Measured on the style score at scale 1 (README): lr 1e-3 on the
# blocks' layers reached 13% outlined at 300 steps and 74% at 600; lr 3e-3 on every layer (--lora-targets all: the
# output layer too) 23% at 150 and 100% at 450. LoRA's own default lr, 1e-4, is sized for pretrained giants.
OUTLINE = 0.12  # the border's width, a fraction of the side: 2 px at 16 px
LORA = ["--init", "runs/quickstart", "--lora-rank", "8", "--lora-targets", "all", "--lr", "3e-3", "--warmup", "20",
        "--steps", "500", "--save-every", "100", "--preview-every", "500", "--out", "runs/quickstart_lora"]


def lora(argv=None):
    """python quickstart.py lora [train.py flags]: LoRA adapters (train.py --lora-rank) on the quick-start model (--init;
    trained first when it does not exist), trained on the shapes drawn as outlines; then
    `python quickstart.py score runs/quickstart --lora runs/quickstart_lora` measures the style at scales 0, 0.5, 1."""
    import argparse
    import checkpoints
    import cli
    import hub
    import train as trainer
    argv = LORA + [str(a) for a in argv or []]
    only_init = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    only_init.add_argument("--init")
    init = only_init.parse_known_args(argv)[0].init  # the last --init given
    if {"-h", "--help"} & set(argv):  # the flags first: --help trains nothing
        cli.parse_train_args(argv, DEFAULTS, need_data=False, own_components=True)
    if not os.path.exists(init):
        print(f"quickstart.py lora: no model at {init} yet: training it first (python quickstart.py train --out {init})")
        train(["--out", init])
    files = checkpoints.run_settings(hub.resolve_model(init, "--init")[0])
    if files is None:
        raise ValueError(f"--init {init} is not a quick-start run (no sample.json beside it)")
    args = cli.parse_train_args(argv, DEFAULTS, need_data=False, own_components=True)
    trainer.main(args, ShapesDataset(args.image_size, outline=OUTLINE),
                 dict(text_encoder=files["text_encoder"], tokenizer=files["tokenizer"], vae=files["vae"]),
                 sigma.SigmaConfig(**DIT))
    look_at(args.out)
    print(f"score it: python quickstart.py score {args.init} --lora {args.out}  (or look: python sample.py --model "
          f"{args.init} --lora {args.out}:0.5 \"a red circle on a blue background\")")


def evaluate(argv=None):
    """python quickstart.py score runs/quickstart: sample every caption of the dataset from a run's latest (EMA)
    checkpoint as `sample.py --model <run>` does, and print score(): how many samples show the right shape
    and colours."""
    import numpy as np
    import checkpoints
    import cli
    import hub
    import sample
    import train as trainer
    p = cli.ArgumentParser(prog="quickstart.py score", description=evaluate.__doc__)
    p.add_argument("run", help="a quick-start run folder (or one of its step_*/ checkpoints)")
    p.add_argument("--n", type=int, default=2, help="samples per caption (seeds 1000, 1001, ...)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=4.5)
    p.add_argument("--sampler", default="dpm", choices=["dpm", "ancestral"])
    p.add_argument("--batch-size", type=int, default=30, help="images per DiT forward (the same images as one by one, faster)")
    p.add_argument("--grid", help="also save a labelled grid PNG here: GRID_PROMPTS × 6 seeds (the README's figure)")
    p.add_argument("--lora", help="a LoRA run of `quickstart.py lora`: score the outline style at LoRA scales 0, 0.5 "
                                  "and 1 instead (--grid: 6 prompts at each scale)")
    args = p.parse_args(argv)
    if args.n < 1 or not 1 <= args.steps <= 1000 or not args.cfg >= 1:
        raise ValueError(f"need --n >= 1, 1 <= --steps <= 1000 and --cfg >= 1; got --n {args.n}, --steps {args.steps}, "
                         f"--cfg {args.cfg}")
    if not os.path.exists(args.run):
        raise ValueError(f"no such run {args.run!r}: `python quickstart.py train` writes runs/quickstart")
    path, name, _ = hub.resolve_model(args.run, "quickstart.py score")
    files = checkpoints.run_settings(path)
    if files is None:
        raise ValueError(f"{args.run} is not a quick-start run (no sample.json beside it)")
    model = hub.load_model(path, name, None).eval()
    text, tok = weights.load_t5(files["text_encoder"], dtype=torch.float32), Tokenizer(files["tokenizer"])
    vae = weights.load_vae(files["vae"])
    H = model.config.sample_size * vae.factor
    run = lambda prompts, n, seed, dit=model: sample.generate(prompts, dit, text, tok, vae, size=(H, H), n=n, seed=seed,
                                                           steps=args.steps, cfg=args.cfg, sampler=args.sampler,
                                                           binning=False, clip_x0=files["clip_x0"],
                                                           batch_size=args.batch_size)
    if args.lora:
        return evaluate_lora(args, model, run, path)
    result = {}
    for part, held_out in (("seen", False), ("held_out", True)):  # trained-on captions, then the never-shown ones
        prompts = [q for q in ShapesDataset.captions(held_out) for _ in range(args.n)]
        images = run(ShapesDataset.captions(held_out), args.n, 1000)
        x = [torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in images]  # (3, H, W) in [-1, 1]
        r = result[part] = score(x, prompts)
        print(f"{path}: {part.replace('_', '-')} captions, {len(x)} samples ({args.sampler}, {args.steps} steps, "
              f"CFG {args.cfg:g}): right shape {r['shape']:.0%} (circle {r['circle']:.0%}, square {r['square']:.0%}, "
              f"triangle {r['triangle']:.0%}), right colours {r['color']:.0%}, "
              f"distance to the nearest drawing {r['rmse']:.3f} rms")
    if args.grid:
        labels = [p + (" (held out)" if p in ShapesDataset.held_out() else "") for p in GRID_PROMPTS]
        trainer.save_grid(run(GRID_PROMPTS, 6, 0), labels, args.grid)
    return result


def evaluate_lora(args, model, generate, path):
    """score --lora: the base model with the LoRA merged at scales 0, 0.5 and 1 (sample.py's --lora RUN:SCALE), every
    caption sampled --n times at each; score_style of the samples -> {scale: dict(outlined, shape)}."""
    import copy
    import numpy as np
    import lora as lora_lib
    import train as trainer
    adapter, result, rows = lora_lib.read(args.lora), {}, []
    prompts = ShapesDataset.captions()
    for scale in (0.0, 0.5, 1.0):
        merged = lora_lib.merge(copy.deepcopy(model), [dict(adapter, scale=scale)])
        images = generate(prompts, args.n, 1000, merged)
        x = [torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in images]  # (3, H, W) in [-1, 1]
        r = result[scale] = score_style(x, [q for q in prompts for _ in range(args.n)], OUTLINE)
        print(f"{path} + {args.lora} at scale {scale:g}: {len(x)} samples of all {len(prompts)} captions: outlined "
              f"{r['outlined']:.0%}, right shape {r['shape']:.0%}")
        rows += generate(GRID_PROMPTS[:6], 1, 0, merged) if args.grid else []
    if args.grid:
        labels = ["without the LoRA (scale 0)", "LoRA at scale 0.5", "LoRA at scale 1"]
        trainer.save_grid(rows, labels, args.grid)
    return result


# ---------------------------------------------------------------------------------------------- ControlNet demo
class OutlineShapes(ShapesDataset):
    """The quick start's captions, each shape at a random position and size anywhere in the image (the base model only
    drew them centred), with the shape's outline, white on black, as its ControlNet condition: crisp PIL lines 1 or 2 px
    wide, or lines drawn at 4× and averaged down (anti-aliased, 1 to 2 px), so that a ControlNet trained here follows
    outlines drawn by any program. The shape fills its outline's box: PIL draws an outline inside the shape it fills."""

    SIDE = (0.375, 0.94)  # the shape's box side, a fraction of the image side

    def __getitem__(self, i):
        item, rng = super().__getitem__(i), random.Random(f"outline {i}")  # the quick start's caption; its own layout
        _, color, shape, _, _, bg, _ = item["captions"][0].split()
        box = random_box(rng, shape, self.size, self.SIDE, held_out=False)
        C = ShapesDataset.COLORS
        cover = torch.from_numpy(render(shape, self.size, box))[None]  # (1, S, S) in [0, 1]: anti-aliased edges
        image = (torch.tensor(C[bg])[:, None, None] * (1 - cover) + torch.tensor(C[color])[:, None, None] * cover) / 127.5 - 1
        crisp, width = rng.random() < 0.5, rng.choice([1, 1.5, 2])
        line = render(shape, self.size, box, k=1 if crisp else 4, width=round(width) if crisp else width)
        return dict(item, image=image, control=torch.from_numpy(line).expand(3, -1, -1) * 2 - 1)


def random_box(rng, shape, size, side, held_out):
    """A random box (x0, y0, x1, y1), pixels inclusive as PIL takes them, anywhere in the image; square but for
    triangles, whose height varies ±15%. One (position, size) in 7 is held out of training (held_out=False: never
    drawn; True: only those), while every position and every size is still trained on in other combinations."""
    while True:
        w = rng.randint(round(side[0] * size), round(side[1] * size))
        h = w if shape != "triangle" else max(round(side[0] * size), min(size, round(w * rng.uniform(0.85, 1.15))))
        x0, y0 = rng.randint(0, size - w), rng.randint(0, size - h)
        if ((3 * x0 + 5 * y0 + w) % 7 == 0) == held_out:
            return x0, y0, x0 + w - 1, y0 + h - 1


def render(shape, size, box, k=4, width=None):
    """The shape in `box` filled (width None) or outlined `width` px wide, drawn by PIL at k× and averaged down to
    size × size -> (size, size) float array in [0, 1]. Circle: an ellipse; square: a rectangle; triangle: apex up."""
    from PIL import Image, ImageDraw
    img = Image.new("L", (size * k, size * k), 0)
    draw, (x0, y0, x1, y1) = ImageDraw.Draw(img), box
    style = dict(fill=255) if width is None else dict(outline=255, width=round(width * k))
    if shape == "triangle":
        at = lambda x, y: (k * x + (k - 1) / 2, k * y + (k - 1) / 2)  # a pixel's centre at k×
        draw.polygon([at((x0 + x1) / 2, y0), at(x1, y1), at(x0, y1)], **style)
    else:
        (draw.ellipse if shape == "circle" else draw.rectangle)([k * x0, k * y0, k * x1 + k - 1, k * y1 + k - 1], **style)
    return np.asarray(img.resize((size, size), Image.BOX), dtype=np.float32) / 255


def interior(outline, threshold=0.25):
    """(H, W) outline in [0, 1] -> bool (H, W): its lines and what they enclose, i.e. what no 4-connected path from
    the border reaches without crossing a line (PIL's 1-px lines are 8-connected, so such a path cannot slip through)."""
    line, outside = outline > threshold, np.zeros(outline.shape, bool)
    H, W = line.shape
    todo = [(y, x) for y in range(H) for x in (0, W - 1)] + [(y, x) for x in range(W) for y in (0, H - 1)]
    while todo:
        y, x = todo.pop()
        if 0 <= y < H and 0 <= x < W and not outside[y, x] and not line[y, x]:
            outside[y, x] = True
            todo += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
    return ~outside


def control_score(images, outlines, prompts):
    """How well samples follow an outline, judged from pixels alone: each pixel is named by its nearest of the six
    colours; the shape is the pixels of the prompt's shape colour. -> dict(iou=mean IoU of the shape with the
    outline's interior, color=fraction whose interior is mostly the shape's colour and the rest mostly the
    background's). images: (H, W, 3) uint8 arrays; outlines: (H, W) arrays in [0, 1]."""
    names, palette = list(ShapesDataset.COLORS), np.array(list(ShapesDataset.COLORS.values()), np.float32)
    ious, colors = [], []
    for img, outline, prompt in zip(images, outlines, prompts):
        _, color, _, _, _, bg, _ = prompt.split()
        nearest = ((np.asarray(img, np.float32)[:, :, None] - palette) ** 2).sum(-1).argmin(-1)  # (H, W) colour ids
        shape, inside = nearest == names.index(color), interior(outline)
        ious.append((shape & inside).sum() / max(1, (shape | inside).sum()))
        mostly = lambda where: names[np.bincount(nearest[where], minlength=6).argmax()]
        colors.append(mostly(inside) == color and mostly(~inside) == bg)
    return dict(iou=float(np.mean(ious)), color=float(np.mean(colors)))


# train.py flag defaults of the ControlNet demo (explicit flags still win): 2 copies of the 3 blocks, the quick start's
# AdamW settings rather than the official 2e-5 and clip 0.01 (a tiny model in minutes, not XL/2 in days)
CONTROLNET = dict(DEFAULTS, controlnet=2, init="runs/quickstart", out="runs/quickstart_controlnet", steps=2500,
                  caption_dropout=0.1, preview_every=500)


def controlnet(argv=None):
    """python quickstart.py controlnet [train.py flags]: train.main teaches the quick-start model (--init, default
    runs/quickstart; trained first when it has no checkpoint) to place its shapes where an outline says
    (OutlineShapes), then scores it against the model alone on held-out captions and layouts (controlnet_score)."""
    import argparse
    import cli
    import train as trainer
    given = argparse.ArgumentParser(add_help=False)
    given.add_argument("--init", default=CONTROLNET["init"])
    given.add_argument("--out", default=CONTROLNET["out"])
    given.add_argument("--grid", help="controlnet-score's grid: condition | the model alone | with the ControlNet")
    known, rest = given.parse_known_args(argv or [])
    if {"-h", "--help"} & set(rest):  # the flags first: --help trains nothing
        cli.parse_train_args(rest, CONTROLNET, need_data=False, own_components=True)
    if not os.path.exists(known.init):  # the quick-start model first, as `python quickstart.py train` makes it
        print(f"quickstart.py controlnet: no model at --init {known.init}: training the quick start there first")
        train(["--out", known.init])
    files = base_files(known.init)  # the run's tokenizer, T5 and pixel space
    data = OutlineShapes(16)
    prompts = "|".join(data[i]["captions"][0] for i in range(4))  # previews: these captions with their outlines
    args = cli.parse_train_args(rest + ["--init", known.init, "--out", known.out], dict(CONTROLNET, preview_prompts=prompts),
                                need_data=False, own_components=True)
    trainer.main(args, data, {k: files[k] for k in ("text_encoder", "tokenizer", "vae")})
    return controlnet_score([known.out, "--init", known.init] + (["--grid", known.grid] if known.grid else []))


def base_files(run):
    """A quick-start run -> its checkpoint's path and its components (sample.json), or one line saying it is not one."""
    import checkpoints
    import hub
    path = hub.resolve_model(run, "--init")[0]
    files = checkpoints.run_settings(path)
    if files is None or not files["clip_x0"]:
        raise ValueError(f"--init {run} is not a quick-start run (no pixel-space sample.json beside it)")
    return dict(files, path=path)


@torch.no_grad()
def controlnet_score(argv=None):
    """python quickstart.py controlnet-score RUN [--init BASE]: sample every held-out caption on outlines of held-out
    layouts (PIL's own crisp lines, 1 or 2 px, from seeds the training data never used) with the ControlNet and with
    the model alone, as `sample.py --model BASE --controlnet RUN --control outline.png` does, and print
    control_score() of both."""
    import cli
    import hub
    import sample
    import train as trainer
    from PIL import Image
    p = cli.ArgumentParser(prog="quickstart.py controlnet-score", description=controlnet_score.__doc__)
    p.add_argument("run", help="a quickstart.py controlnet run folder")
    p.add_argument("--init", default=CONTROLNET["init"], help="its base model: a quick-start run")
    p.add_argument("--n", type=int, default=4, help="samples per held-out caption, each on its own outline")
    p.add_argument("--grid", help="also save a grid PNG here: condition | the model alone | with the ControlNet")
    args = p.parse_args(argv)
    files = base_files(args.init)
    base = hub.load_model(files["path"]).eval()
    model = weights.load_controlnet(args.run, base).eval()
    text, tok = weights.load_t5(files["text_encoder"], dtype=torch.float32), Tokenizer(files["tokenizer"])
    vae = weights.load_vae(files["vae"])
    prompts, S = sorted(ShapesDataset.held_out()) * args.n, base.config.sample_size * vae.factor
    outlines, found = [], {"ControlNet": [], "model alone": []}
    for k, prompt in enumerate(prompts):
        rng, shape = random.Random(f"held-out outline {k}"), prompt.split()[2]
        outline = render(shape, S, random_box(rng, shape, S, OutlineShapes.SIDE, held_out=True), k=1, width=rng.choice([1, 2]))
        outlines.append(outline)
        condition = Image.fromarray((outline * 255).astype(np.uint8)).convert("RGB")
        for name, m, c in (("ControlNet", model, condition), ("model alone", base, None)):
            found[name] += sample.generate([prompt], m, text, tok, vae, size=(S, S), seed=k, binning=False,
                                           clip_x0=files["clip_x0"], control=c, progress=False)
    result = {}
    for name, images in found.items():
        r = result[name] = control_score([np.asarray(im) for im in images], outlines, prompts)
        print(f"{args.run}: {name}, held-out captions and layouts, {len(prompts)} samples: mean IoU with the outline's "
              f"interior {r['iou']:.2f}, right colours {r['color']:.0%}")
    if args.grid:
        rows = [[Image.fromarray((o * 255).astype(np.uint8)).convert("RGB"), a, c]
                for o, a, c in zip(outlines, found["model alone"], found["ControlNet"])][:8]
        trainer.save_grid([im for row in rows for im in row], prompts[:8], args.grid)  # (held-out captions, held-out layouts)
    return result


COMMANDS = {"train": train, "score": evaluate, "lora": lora, "controlnet": controlnet, "controlnet-score": controlnet_score}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        return print(__doc__)
    if not argv or argv[0] not in COMMANDS:
        said = f"unknown command {argv[0]!r}" if argv else "no command"
        raise ValueError(f"{said}: give one of {', '.join(COMMANDS)} (python quickstart.py train, then score RUN; "
                         "the weak-to-strong experiment is python weak_to_strong.py)")
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    import cli
    if sys.argv[1:2] == ["score"]:  # sampling: Ctrl-C stops it at once (train.py handles its own interruptions)
        cli.stop_on_interrupt("quickstart.py score")
    if sys.argv[1:2] in (["train"], ["score"], ["lora"], ["controlnet"], ["controlnet-score"]):
        pick_threads("quickstart.py")
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad commands, flags or files: one line, exit 2 as sample.py
        print(f"quickstart.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside training (in it, the step under way is saved first)
        print("quickstart.py: interrupted", file=sys.stderr)
        raise SystemExit(130)
