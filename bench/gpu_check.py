"""One command for every CUDA path of sigma: correctness against the references, speed, memory, training.

    python bench/gpu_check.py                            # a CUDA machine: 9 minutes (--budget), random full-size weights
    python bench/gpu_check.py --dry --out /tmp/gpu_dry   # the same code paths on the CPU, tiny configs (~1-2 minutes)
    python bench/gpu_check.py --only train,compile       # some sections (names: --list)

SECTIONS runs in priority order, so that a run cut short has the figures that matter most: the chip, parity with
diffusers, the eager DiT forward against diffusers' (interleaved, repeated: medians and spread), the two forwards'
kernel profiles side by side, regional compilation (sample.py --compile: compile time apart, the compiled forward
and whole image at 1024², where compiling pays off), the compiled training step's MFU, compiled images at 2048²
and 4096² (KV compression, peak memory); then the rest of the earlier check, and CUDA graphs last. A new section
is one function and one line of SECTIONS, placed by its priority.

Nothing is downloaded: every model has random weights (speed does not depend on the values) and the references
(diffusers' PixArtTransformer2DModel / PixArtSigmaPipeline / AutoencoderKL, transformers' T5EncoderModel, PEFT)
get the same tensors. diffusers missing? Ours is timed alone and the table says so.

Every section is guarded: a failure prints its traceback to the log and a FAIL row, and the next section runs.
Each section has an estimate of its cost; a section that would overrun --budget is skipped and named. The table
comes last; --out (default $OUT/gpu_check when $OUT is set: the folder a GPU runner brings back) gets gpu_check.log
(everything printed) and gpu_check.json (every figure, written after each section, so a run cut short still leaves
what it measured). Tests run --dry (tests/test_gpu_check.py).
"""
import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # the product, and the tests' references (test_sample, ...)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing reaches a hub, here or on the GPU machine

import controlnet  # noqa: E402
import diffusion  # noqa: E402
import sample  # noqa: E402
import sigma  # noqa: E402
import t5 as t5lib  # noqa: E402
import vae as vaelib  # noqa: E402
import weights  # noqa: E402
from came import CAME  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

try:
    import diffusers  # noqa: F401
    HAVE_DIFFUSERS = True
except ImportError:
    HAVE_DIFFUSERS = False
DATASHEET_TFLOPS = 989  # H100/H200 SXM dense bf16 (vendor datasheet): the MFU denominator


# ---------------------------------------------------------------------------------------------- the device seam
class Cuda:
    """Every CUDA-specific call the check makes. --dry swaps in Host: the rest of the script is the same code."""
    type, backend = "cuda", "nccl"
    OutOfMemory = torch.cuda.OutOfMemoryError

    def __init__(self):
        self.device = torch.device("cuda")
        self.name = torch.cuda.get_device_name()
        self.total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity checks mean fp32; bf16 is what is timed
        torch.backends.cudnn.allow_tf32 = False

    def sync(self):
        torch.cuda.synchronize()

    def reset_peak(self):
        torch.cuda.reset_peak_memory_stats()

    def allocated(self):
        return torch.cuda.memory_allocated()

    def peak(self):
        return torch.cuda.max_memory_allocated()

    def free(self):
        gc.collect()
        torch.cuda.empty_cache()

    compile_options = {}  # torch.compile's defaults: inductor
    cudagraph_options = dict(mode="reduce-overhead")  # inductor, each block replayed as a CUDA graph

    def compile(self, model, cudagraphs=False):
        """A copy of `model` compiled as sample.py --compile does: each block (regional compilation); the eager
        model stays as it was. diffusers' DiT gets the same treatment, block by block."""
        model, options = copy.deepcopy(model), self.cudagraph_options if cudagraphs else self.compile_options
        if isinstance(model, sigma.PixArtSigma):
            return model.compile_blocks(**options)
        for block in model.transformer_blocks:
            block.compile(**options)
        return model


class Host(Cuda):
    """--dry: the CPU. No memory counters (figures read 0), nothing to synchronise, gloo for the process group,
    torch.compile's graph capture without code generation (tests/test_compile.py runs aot_eager and inductor)."""
    type, backend = "cpu", "gloo"

    def __init__(self):
        self.device, self.name, self.total_gib = torch.device("cpu"), platform.processor() or "CPU", 0.0

    def sync(self):
        pass

    def reset_peak(self):
        pass

    def allocated(self):
        return 0

    def peak(self):
        return 0

    def free(self):
        gc.collect()

    compile_options = cudagraph_options = dict(backend="eager")  # dynamo's graph capture, no code generation (fast)


# ------------------------------------------------------------------------------------------------------- plans
@dataclasses.dataclass
class Plan:
    """What the check runs: the released sizes on a GPU, tiny stand-ins with --dry."""
    dit: dict                  # "1024" / "2K" -> SigmaConfig: the model for a side up to 1536, and above
    t5: t5lib.T5Config
    vae: vaelib.VAEConfig
    sides: tuple               # image sides timed (pixels)
    compiled_sides: tuple      # of those, the ones above the first whose compiled images are timed (compile_sizes)
    train: tuple               # (pixels, batch) of the training steps timed
    max_batch: int             # upper end of the largest-batch search
    rounds: tuple              # interleaved rounds of the forwards at each side; the last: of whole images
    matmul: int                # side of the square bf16 matmul that measures the chip
    parity_side: int           # pixels of the XL/2 parity forward
    kv_grid: int               # token-grid side of the KV-compression parity check
    budget: float              # default --budget, seconds
    scale: float               # section estimates are seconds on an H200; x scale here


FULL = Plan(dit={"1024": sigma.CONFIGS["1024"], "2K": sigma.CONFIGS["2K"]}, t5=t5lib.T5Config(), vae=vaelib.SDXL,
            sides=(1024, 2048, 4096), compiled_sides=(2048, 4096), train=((512, 32), (1024, 8)), max_batch=256,
            rounds=(20, 8, 3), matmul=8192, parity_side=1024, kv_grid=64, budget=540, scale=1.0)
_TINY = dict(depth=4, hidden_size=64, num_heads=4, caption_channels=32)
DRY = Plan(dit={"1024": sigma.SigmaConfig(**_TINY, sample_size=16, pe_interpolation=1.0),
                "2K": sigma.SigmaConfig(**_TINY, sample_size=32, pe_interpolation=2.0)},
           t5=t5lib.T5Config(vocab_size=256, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2),
           vae=vaelib.VAEConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                                tile_latent=16, tile_above=128 * 128),
           sides=(64, 128, 256), compiled_sides=(256,), train=((64, 2), (128, 2)), max_batch=4, rounds=(2, 1, 1),
           matmul=256, parity_side=128, kv_grid=8, budget=300, scale=0.0)


def dit_for(plan, side):
    return plan.dit["1024" if side <= 1536 else "2K"]


def dit_flops(config, T, L=300, kv=False):
    """One forward, one image: 2·weights per token for the linear layers (14·D² per block on image tokens, 2·D²
    on caption tokens), 4·T·T'·D for self-attention (T' = T/4 in KV-compressed blocks), 4·T·L·D for cross-attention."""
    D, flops = config.hidden_size, 0.0
    for i in range(config.depth):
        keys = T // config.kv_compress_ratio**2 if kv and i >= config.depth // 2 else T
        flops += 2 * 14 * D * D * T + 2 * 2 * D * D * L + 4 * T * keys * D + 4 * T * L * D
    return flops


# ------------------------------------------------------------------------------------------------ the runner
class Skip(Exception):
    """A step that does not fit in what is left of the budget; the section stops and says so."""


class Check:
    def __init__(self, dev, plan, out, budget):
        self.dev, self.plan, self.out = dev, plan, out
        self.start, self.budget = time.perf_counter(), budget
        self.rows, self.sections, self.figures = [], {}, {}
        self.section = ""
        self.work = tempfile.mkdtemp(prefix="gpu_check_")  # scratch files, not --out

    def left(self):
        return self.budget - (time.perf_counter() - self.start)

    def need(self, seconds, what):
        """Raise Skip unless `seconds` (H200 estimate) fit in what is left."""
        if seconds * self.plan.scale > self.left():
            raise Skip(f"{what}: needs ~{seconds:.0f} s, {max(0, self.left()):.0f} s left")

    def row(self, what, ours, ref=None, unit="s", goal=None, note=""):
        """One line of the table; for times, ratio = reference/ours (> 1: ours faster)."""
        ratio = None
        if unit == "s" and isinstance(ours, (int, float)) and isinstance(ref, (int, float)) and ours and ref:
            ratio = ref / ours
        r = dict(section=self.section, what=what, ours=ours, ref=ref, unit=unit, ratio=ratio, goal=goal, note=note)
        self.rows.append(r)
        print(f"  {what:<58} ours {_fmt(ours, unit):>11}  ref {_fmt(ref, unit):>11}"
              + (f"  {ratio:5.2f}x" if ratio else "") + (f"  [{goal}]" if goal else "") + (f"  {note}" if note else ""),
              flush=True)

    def interleaved(self, fns, rounds, warmup=1):
        """{label: fn} -> {label: [wall seconds]}: after `warmup` calls of each, `rounds` rounds that call each fn once
        in turn (synchronised around each call), so a clock change or a neighbour's load hits all of them alike."""
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        times = {label: [] for label in fns}
        for _ in range(rounds):
            for label, fn in fns.items():
                self.dev.sync()
                t0 = time.perf_counter()
                fn()
                self.dev.sync()
                times[label].append(time.perf_counter() - t0)
        return times

    def first_call(self, fn):
        """Wall seconds of one call (compiled code: the compilation plus one run)."""
        self.dev.sync()
        t0 = time.perf_counter()
        fn()
        self.dev.sync()
        return time.perf_counter() - t0

    def time(self, fn, warmup=1, repeat=3):
        """Median wall seconds of `repeat` calls after `warmup` (the device synchronised around each)."""
        for _ in range(warmup):
            fn()
        self.dev.sync()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            self.dev.sync()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    @contextlib.contextmanager
    def peak(self, resident=0):
        """Peak bytes allocated inside the block, counted above what was allocated at its start, plus `resident`
        (the weights a user would have on the device in this phase). Read box[0] after the block."""
        self.dev.free()
        self.dev.reset_peak()
        base, box = self.dev.allocated(), []
        yield box
        self.dev.sync()
        box.append((self.dev.peak() - base + resident) / 2**30)

    def save(self):
        with open(os.path.join(self.out, "gpu_check.json"), "w") as f:
            json.dump(dict(device=self.dev.name, torch=torch.__version__, diffusers=HAVE_DIFFUSERS,
                           budget_s=self.budget, elapsed_s=round(time.perf_counter() - self.start, 1),
                           sections=self.sections, rows=self.rows, figures=self.figures), f, indent=1, default=str)

    def run(self, name, fn, estimate):
        self.section = name
        print(f"\n== {name} (estimate {estimate * self.plan.scale:.0f} s, {self.left():.0f} s left)", flush=True)
        t0 = time.perf_counter()
        try:
            self.need(estimate, name)
            fn(self)
            status = "ok"
        except Skip as e:
            status = f"skipped: {e}"
            print(f"  SKIPPED {e}", flush=True)
        except Exception as e:  # noqa: BLE001 -- a broken section must not stop the others
            traceback.print_exc(file=sys.stdout)
            status = f"FAIL: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            self.row(f"{name} raised", status, unit="")
        finally:
            self.dev.free()
        self.sections[name] = dict(status=status, seconds=round(time.perf_counter() - t0, 1))
        self.save()


def _fmt(v, unit):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v[:11]
    if unit == "s":
        return f"{v:.3f} s" if v < 100 else f"{v:.0f} s"
    return f"{v:.3g} {unit}".strip()


def median(times):
    return sorted(times)[len(times) // 2]


def spread(times):
    """'median (min-max, n)' of some wall times, in ms below 10 s."""
    ms = max(times) < 10
    f = (lambda v: f"{v * 1e3:.1f}") if ms else (lambda v: f"{v:.2f}")  # noqa: E731
    return f"{f(median(times))} ({f(min(times))}-{f(max(times))}{' ms' if ms else ' s'}, n={len(times)})"


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------------------------- model building
def random_diffusers_dit(config, device, dtype=torch.float32):
    """diffusers' PixArtTransformer2DModel for `config`, built on `device`, every tensor random at a trained-
    looking scale (its zero-inits would hide mistakes): weights at fan_in^-½, vectors and tables at 0.02."""
    from diffusers import PixArtTransformer2DModel
    kwargs = {k: v for k, v in weights.diffusers_config(config).items() if not k.startswith("_")}
    with torch.device(device):
        ref = PixArtTransformer2DModel(**kwargs).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, p[0].numel() ** -0.5 if p.dim() > 1 else 0.02)
    return ref.to(dtype)


def random_dit(config, device, dtype):
    """Our DiT with random weights (speed only; no reference needed)."""
    with torch.device(device):
        model = sigma.PixArtSigma(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, p[0].numel() ** -0.5 if p.dim() > 1 else 0.02)
    return model.to(dtype).eval()


def three_dits(config, device, dtype):
    """diffusers' DiT (None without diffusers), ours with the same weights, ours with KV compression in the deep half."""
    ref = random_diffusers_dit(config, device, dtype) if HAVE_DIFFUSERS else None
    ours = (weights.load_checkpoint(ref.state_dict(), config) if ref is not None
            else random_dit(config, device, torch.float32)).to(dtype)
    kv_config = dataclasses.replace(config, kv_compress_layers=sigma.deep_half(config.depth))
    return ref, ours, weights.load_checkpoint(ours.state_dict(), kv_config).to(dtype)


def dit_inputs(config, side, N, device, dtype, used=40):
    h = side // 8
    x = torch.randn(N, config.in_channels, h, h, device=device, dtype=dtype)
    t = torch.full((N,), 999, device=device)
    y = torch.randn(N, 300, config.caption_channels, device=device, dtype=dtype)
    mask = torch.zeros(N, 300, device=device)
    mask[:, :used] = 1
    return x, t, y, mask


def weight_bytes(*modules):
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


# ---------------------------------------------------------------------------------------------- correctness
def check_dit(c):
    """The XL/2 DiT against diffusers' on the same random weights: fp32 (≈ exact) and bf16 (each against the
    fp32 reference: ours must round no worse than diffusers)."""
    dev, config = c.dev, c.plan.dit["1024"]
    if not HAVE_DIFFUSERS:
        raise Skip("diffusers not installed")
    ref = random_diffusers_dit(config, dev.device)
    ours = weights.load_checkpoint({k: v.clone() for k, v in ref.state_dict().items()}, config)
    x, t, y, mask = dit_inputs(config, c.plan.parity_side, 2, dev.device, torch.float32)
    t = torch.tensor([999, 250], device=dev.device)
    fwd = lambda m, dt: m(x.to(dt), t, y.to(dt), mask).float()  # noqa: E731
    ref_fwd = lambda m, dt: m(x.to(dt), encoder_hidden_states=y.to(dt), timestep=t,  # noqa: E731
                              encoder_attention_mask=mask).sample.float()
    with torch.no_grad():
        expected = ref_fwd(ref, torch.float32)
        e32 = rel_err(fwd(ours, torch.float32), expected)
        ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
        e16, r16 = rel_err(fwd(ours, torch.bfloat16), expected), rel_err(ref_fwd(ref, torch.bfloat16), expected)
    c.figures["dit_rel_err"] = dict(fp32=e32, bf16_ours=e16, bf16_diffusers=r16)
    c.row(f"XL/2 fp32 vs diffusers fp32, rel. error", e32, unit="", goal="≤ 1e-5: " + _yes(e32 <= 1e-5))
    c.row(f"XL/2 bf16 vs diffusers fp32, rel. error (ref: diffusers bf16)", e16, r16, unit="",
          goal="≤ 1.25× diffusers': " + _yes(e16 <= 1.25 * r16 + 1e-4))


def _yes(ok):
    return "ok" if ok else "NO"


def check_kv(c):
    """KV-compressed self-attention (SDPA kernels on this device) vs attention written out over keys and values
    compressed by hand: the official conv + LayerNorm, strided 'uniform' and 2×2 'avgpool'."""
    from test_sigma import official_kv_attention, reference_kv_attention
    config, g = c.plan.dit["2K"], c.plan.kv_grid
    D, S = config.hidden_size, config.num_heads
    x = torch.randn(2, g * g, D, device=c.dev.device)
    for mode in ("conv", "uniform", "avgpool"):
        with torch.device(c.dev.device):
            attn = sigma.SelfAttention(D, S, kv_compress=mode)
        with torch.no_grad():
            for p in attn.parameters():
                p.normal_(0, 0.3 if p.dim() != 2 else D**-0.5)  # a trained-looking conv and norm, not the init
            expected = (official_kv_attention(attn, x, g, g) if mode == "conv"
                        else reference_kv_attention(attn, x, g, g, mode))
            e32 = rel_err(attn(x, (g, g)), expected)
            e16 = rel_err(attn.to(torch.bfloat16)(x.bfloat16(), (g, g)), expected)
        c.row(f"KV '{mode}' attention, {g}×{g} tokens, fp32 / bf16 rel. error", e32, e16, unit="",
              goal="fp32 ≤ 1e-5: " + _yes(e32 <= 1e-5), note="(ref column: our bf16)")


def check_lora(c):
    """A PEFT LoRA (every official target, random A and B) on diffusers' XL/2, merged into our weights by
    lora.merge, vs PEFT's unmerged forward, fp32."""
    if not HAVE_DIFFUSERS:
        raise Skip("diffusers not installed")
    import lora
    from test_lora import peft_forward, peft_lora
    config = c.plan.dit["1024"]
    ref = random_diffusers_dit(config, c.dev.device)
    x, t, y, mask = dit_inputs(config, 256, 2, c.dev.device, torch.float32)
    with tempfile.TemporaryDirectory() as folder:
        model = peft_lora(ref, folder, std=0.02, r=16, lora_alpha=8)
        expected = peft_forward(model, x, t, y, mask)
        ours = weights.load_checkpoint({k: v.clone() for k, v in ref.state_dict().items()}, config)
        with torch.no_grad():
            err = rel_err(lora.merge(ours, [lora.read(folder)])(x, t, y, mask), expected)
            base = rel_err(ref(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask).sample, expected)
    c.row("LoRA r16 merged here vs PEFT, rel. error (ref: base vs PEFT)", err, base, unit="",
          goal="≤ 1e-4 and ≪ ref: " + _yes(err <= 1e-4 and base > 100 * err))


def check_pipeline(c):
    """The tiny random pipeline of tests/test_sample.py on this device, fp32: sample.generate vs diffusers'
    PixArtSigmaPipeline, same files, same seed, 20 steps: max pixel difference in 1/255."""
    if not HAVE_DIFFUSERS:
        raise Skip("diffusers not installed")
    from test_sample import diffusers_pipeline, write_components
    d = c.dev.device
    with tempfile.TemporaryDirectory() as tmp:
        root = write_components(os.path.join(tmp, "pipeline"))
        pipe = diffusers_pipeline(root).to(d)
        pipe.set_progress_bar_config(disable=True)
        model = weights.load_checkpoint(f"{root}/transformer").to(d)
        text = weights.load_t5(f"{root}/text_encoder", torch.float32, d)
        vae = weights.load_vae(f"{root}/vae", device=d)
        prompt = "a small cactus with a happy face in the sahara desert"
        ours = sample.generate([prompt], model, text, Tokenizer(f"{root}/tokenizer"), vae, size=(256, 256), steps=20,
                               seed=3, progress=False, output_type="np")[0]
        ref = pipe(prompt, height=256, width=256, num_inference_steps=20, clean_caption=False, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(3)).images[0]
    diff = float(abs(ours - ref).max() * 255)
    c.row("tiny pipeline 256², 20 steps, fp32: max |Δ| (1/255)", diff, unit="", goal="≤ 1: " + _yes(diff <= 1))


def check_ddp(c):
    """python -m torch.distributed.run --nproc_per_node 1 quickstart.py train … --bf16 --grad-checkpoint: train.main
    through the process group (NCCL on a GPU), 3 steps, a checkpoint, finite losses."""
    with tempfile.TemporaryDirectory() as tmp:
        with __import__("socket").socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", port,
               os.path.join(ROOT, "quickstart.py"), "train", "--out", tmp, "--steps", "3", "--save-every", "3",
               "--log-every", "1", "--bf16", "--grad-checkpoint", "--preview-every", "0", "--device", c.dev.type]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60, c.left()), cwd=ROOT,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        seconds = time.perf_counter() - t0
        print(res.stdout[-1500:] + res.stderr[-3000:], flush=True)
        losses = []
        if os.path.isfile(os.path.join(tmp, "log.jsonl")):
            losses = [json.loads(line)["loss"] for line in open(os.path.join(tmp, "log.jsonl")) if '"loss"' in line]
        ok = res.returncode == 0 and len(losses) >= 3 and all(math.isfinite(v) for v in losses)
    c.row(f"torchrun 1 rank ({c.dev.backend}), bf16 + grad ckpt, 3 steps: exit {res.returncode}", seconds,
          goal="finite losses, checkpoint: " + _yes(ok), note=f"losses {[round(v, 4) for v in losses]}")
    if not ok:
        raise RuntimeError(f"training through torchrun failed (exit {res.returncode})")


# ------------------------------------------------------------------------------------------------- speed
def speed_forward(c):
    """DiT forward, the CFG batch of 2, bf16, eager: diffusers' and ours on the same latents, timesteps and captions
    (40 of 300 tokens used), called in turn over repeated rounds: medians and their spread. Ours gets the caption cut
    to its used tokens, as sample.py gives it (diffusion.drop_padding); at the first size also all 300, as diffusers
    gets them. And ours with KV compression in the deep half."""
    dev, dtype = c.dev, torch.bfloat16
    for side, rounds in zip(c.plan.sides, c.plan.rounds):
        config = dit_for(c.plan, side)
        c.need({1024: 10, 2048: 20, 4096: 60}.get(side, 1), f"DiT forward {side}²")
        T = (side // 16) ** 2
        x, t, y, mask = dit_inputs(config, side, 2, dev.device, dtype)
        y_cut, mask_cut = diffusion.drop_padding(y, mask)
        ref, ours, kv = three_dits(config, dev.device, dtype)
        runs = {}  # label: (forward, FLOPs of one forward of 2 rows)
        if ref is not None:
            runs["diffusers"] = (lambda: ref(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask), None)
        runs["ours"] = (lambda: ours(x, t, y_cut, mask_cut), 2 * dit_flops(config, T, L=y_cut.shape[1]))
        if side == c.plan.sides[0]:
            runs["ours, all 300 tokens"] = (lambda: ours(x, t, y, mask), 2 * dit_flops(config, T))
        runs["ours + KV deep half"] = (lambda: kv(x, t, y_cut, mask_cut), 2 * dit_flops(config, T, y_cut.shape[1], True))
        with torch.no_grad():
            times = c.interleaved({label: fn for label, (fn, _) in runs.items()}, rounds)
        ref_times = times.pop("diffusers", None)
        t_ref = ref_times and median(ref_times)
        for label, ts in times.items():
            secs, tflops = median(ts), runs[label][1] / median(ts) / 1e12
            c.figures[f"forward_{side}_{label}"] = dict(seconds=ts, ref=ref_times, tflops=tflops)
            c.row(f"DiT forward {side}², 2 rows, bf16, {label} ({tflops:.0f} TFLOP/s)", secs, t_ref,
                  goal="≥ 1×: " + _yes(t_ref >= secs) if t_ref else None,
                  note=f"ours {spread(ts)}" + (f"; diffusers {spread(ref_times)}" if ref_times else ""))
        del ref, ours, kv, runs
        dev.free()


def speed_controlnet(c):
    """ControlNet (PixArt-δ: copies of XL/2's first 13 blocks) at 1024², CFG batch of 2, bf16: forward time and peak
    memory beside the plain DiT's on the same weights; control_scale 0 must give the plain DiT's output exactly."""
    dev, dtype, side = c.dev, torch.bfloat16, c.plan.sides[0]
    config = dit_for(c.plan, side)
    c.need(15, f"ControlNet forward {side}²")
    base = random_dit(config, dev.device, dtype)
    model = controlnet.ControlPixArt(base, controlnet.default_copies(config.depth)).eval()
    with torch.no_grad():
        for p in model.controlnet.parameters():  # the zero-initialised projections too: a trained-looking ControlNet
            p.normal_(0, p[0].numel() ** -0.5 if p.dim() > 1 else 0.02)
    x, t, y, mask = dit_inputs(config, side, 2, dev.device, dtype)
    control = torch.randn_like(x)
    with torch.no_grad():
        exact = torch.equal(model(x, t, y, mask, control=control, control_scale=0.0), base(x, t, y, mask))
        t_base = c.time(lambda: base(x, t, y, mask))
        t_cn = c.time(lambda: model(x, t, y, mask, control=control))
        resident = weight_bytes(model)
        with c.peak(resident) as peak_cn:
            model(x, t, y, mask, control=control)
        with c.peak(weight_bytes(base)) as peak_base:
            base(x, t, y, mask)
    copies = len(model.controlnet)
    c.figures[f"controlnet_{side}"] = dict(seconds=t_cn, base_seconds=t_base, copies=copies, peak_gib=peak_cn[0],
                                           base_peak_gib=peak_base[0], weights_gib=resident / 2**30, scale0_exact=exact)
    c.row(f"ControlNet forward {side}², batch 2, bf16, {copies} copies (ref: DiT alone)", t_cn, t_base,
          goal="scale 0 = the DiT exactly: " + _yes(exact))
    c.row(f"ControlNet peak memory {side}², weights incl. (ref: DiT alone)", peak_cn[0], peak_base[0], unit="GiB")


# kernel name -> kind, the first that matches (attention first: "fmha_cutlassF" is attention); the rest is "other":
# elementwise, norms, copies
KERNEL_KINDS = {"attention": ("flash", "fmha", "attention", "sdpa", "softmax"),
                "matmul": ("gemm", "cutlass", "nvjet", "xmma", "cublas", "addmm", "aten::mm", "aten::bmm", "linear")}


def kernel_kind(name):
    return next((kind for kind, words in KERNEL_KINDS.items() if any(w in name.lower() for w in words)), "other")


def kernels(c, fn, reps=5):
    """{kernel name: (ms per call, launches per call)} of fn, by the torch profiler: the device's kernels on CUDA (the
    operators that launch them are left out, or their time would count twice), the operators' self time on the CPU."""
    fn(), fn()
    c.dev.sync()
    cuda = c.dev.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(reps):
            fn()
        c.dev.sync()
    events = prof.key_averages()
    if cuda:  # kernels; were none recorded as such, the operators' self device time (said in the log)
        kernel_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        if not kernel_events:
            print("  note: no kernel events; listing operators by self device time", flush=True)
        events = kernel_events or events
    out = {}
    for e in events:
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0:
            out[e.key] = (us / reps / 1e3, e.count / reps)
    return dict(sorted(out.items(), key=lambda kv: -kv[1][0]))


def profile_forwards(c):
    """The two eager forwards of `forward` at the first size, profiled side by side: the top kernels of each with their
    time per forward, then the totals per kind (matrix products, attention, the rest: elementwise, norms, copies)
    and the number of kernel launches. Ours runs the caption cut to its used tokens (as sample.py), diffusers all
    300 (as its pipeline)."""
    dev, dtype, side = c.dev, torch.bfloat16, c.plan.sides[0]
    config = dit_for(c.plan, side)
    x, t, y, mask = dit_inputs(config, side, 2, dev.device, dtype)
    y_cut, mask_cut = diffusion.drop_padding(y, mask)
    ref, ours, _ = three_dits(config, dev.device, dtype)
    runs = {"ours": lambda: ours(x, t, y_cut, mask_cut)}
    if ref is not None:
        runs["diffusers"] = lambda: ref(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask)
    with torch.no_grad():
        prof = {label: kernels(c, fn) for label, fn in runs.items()}
    top = {label: list(k.items())[:15] for label, k in prof.items()}
    width = 62
    print("  " + " | ".join(f"{label + ': kernel':<{width}} {'ms':>7} {'n':>4}" for label in top), flush=True)
    for i in range(max(len(v) for v in top.values())):
        cells = []
        for v in top.values():
            name, (ms, n) = v[i] if i < len(v) else ("", (None, None))
            cells.append(f"{name[:width]:<{width}} {ms:7.3f} {n:4.0f}" if ms is not None else " " * (width + 13))
        print("  " + " | ".join(cells), flush=True)
    totals = {label: {kind: sum(ms for name, (ms, _) in k.items() if kernel_kind(name) == kind)
                      for kind in (*KERNEL_KINDS, "other")} for label, k in prof.items()}
    c.figures[f"profile_forward_{side}"] = dict(top={label: list(k.items())[:30] for label, k in prof.items()},
                                                totals_ms=totals)
    ref_tot = totals.get("diffusers", {})
    busy = {label: sum(v.values()) for label, v in totals.items()}
    c.row(f"profiled forward {side}²: device busy time", busy["ours"] / 1e3, busy.get("diffusers", 0) / 1e3 or None)
    for kind, ms in totals["ours"].items():
        ref_ms = ref_tot.get(kind)
        c.row(f"  {kind} ({ms / busy['ours']:.0%} of ours"
              + (f", {ref_ms / busy['diffusers']:.0%} of diffusers)" if ref_ms is not None else ")"),
              ms / 1e3, ref_ms / 1e3 if ref_ms else None)
    launches = {label: sum(n for _, n in k.values()) for label, k in prof.items()}
    c.row("  kernel launches per forward", launches["ours"], launches.get("diffusers"), unit="")
    del ref, ours
    dev.free()


def compiled_graphs():
    """Graphs torch.compile has built so far in this process (a first call that builds none paid no compilation)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def diffusers_pipeline(c, text, ae, ref, spiece, side):
    """diffusers' PixArtSigmaPipeline around the same T5, VAE and DiT tensors."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline
    from transformers import T5Tokenizer
    from benchmark import hf_t5
    pipe = PixArtSigmaPipeline(tokenizer=T5Tokenizer.from_pretrained(os.path.dirname(spiece)), text_encoder=hf_t5(text),
                               vae=diffusers_vae(ae), transformer=ref, scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    if side * side > c.plan.vae.tile_above:
        pipe.vae.enable_tiling()  # untiled, its mid-block attention over 262k pixels does not fit
    return pipe


PROMPT = "a small cactus with a happy face in the sahara desert"


def image_fns(c, side, text, tok, ae, spiece, models):
    """{label: one 20-step CFG image at side², bf16} for our models ({label: DiT}) and diffusers' pipeline (label
    'diffusers', a DiT of theirs or None)."""
    fns = {}
    for label, m in models.items():
        if label == "diffusers":
            if m is not None:
                pipe = diffusers_pipeline(c, text, ae, m, spiece, side)
                fns[label] = lambda pipe=pipe: pipe(PROMPT, height=side, width=side, num_inference_steps=20,
                                                    use_resolution_binning=False, clean_caption=False,
                                                    generator=torch.Generator("cpu").manual_seed(0))
        else:
            fns[label] = lambda m=m: sample.generate([PROMPT], m, text, tok, ae, size=(side, side), binning=False,
                                                     progress=False, output_type="np")
    return fns


def speed_compile(c):
    """Regional compilation as sample.py --compile runs it (model.compile_blocks: each block compiled, one graph for
    all), at the first size, bf16. The whole 20-step CFG image compiled vs eager and vs diffusers' eager pipeline,
    interleaved; the compile time apart (first image minus a compiled image) and after how many images compiling
    pays off. Then the DiT forward: ours compiled (plain, KV) and diffusers' blocks compiled alike, against both
    eager; compiled = eager within bf16 noise (both against our fp32 forward)."""
    from benchmark import random_t5
    dev, plan, dtype, side = c.dev, c.plan, torch.bfloat16, c.plan.sides[0]
    config = dit_for(plan, side)
    spiece = tiny_spiece(c.work)
    text, tok, ae = random_t5(plan.t5, dtype, dev.device), Tokenizer(spiece), random_vae(plan.vae, dev.device, dtype)
    ref, ours, kv = three_dits(config, dev.device, dtype)
    compiled = dev.compile(ours)
    fns = image_fns(c, side, text, tok, ae, spiece, {"ours compiled": compiled, "ours eager": ours, "diffusers": ref})
    graphs, lengths = compiled_graphs(), []
    hook = compiled.register_forward_pre_hook(lambda m, args: lengths.append(args[2].shape[1]))  # the caption's L
    first = c.first_call(fns["ours compiled"])
    hook.remove()
    c.row(f"first {side}² image compiled (compiles {compiled_graphs() - graphs} graphs)", first)
    with torch.no_grad():
        times = c.interleaved(fns, rounds=plan.rounds[-1])
    secs, eager = median(times["ours compiled"]), median(times["ours eager"])
    t_ref = median(times["diffusers"]) if "diffusers" in times else None
    compile_s = first - secs
    pays = math.ceil(compile_s / (eager - secs)) if eager > secs else None
    c.figures[f"compiled_image_{side}"] = dict(seconds=times, first=first, compile_s=compile_s, pays_off_after=pays)
    for label, ts in times.items():
        if label != "diffusers":
            c.row(f"image {side}², 20 steps + CFG, bf16, {label}", median(ts), t_ref,
                  goal=("≤ 0.6 s: " + _yes(median(ts) <= 0.6)) if label == "ours compiled" and side == 1024 else None,
                  note=f"{spread(ts)}" + (f"; diffusers {spread(times['diffusers'])}" if t_ref else ""))
    c.row(f"  compile time (first image - compiled image)", compile_s, goal="≤ 60 s: " + _yes(compile_s <= 60),
          note=f"pays off from image {pays + 1}" if pays else "compiled is not faster: never pays off")

    # the forward, with the image's caption length (a new one would recompile once); diffusers' blocks compiled alike
    x, t, y, mask = dit_inputs(config, side, 2, dev.device, dtype, used=lengths[0])
    y_cut, mask_cut = diffusion.drop_padding(y, mask)
    models = {"ours compiled": compiled, "ours + KV compiled": dev.compile(kv), "ours eager": ours}
    if ref is not None:
        models.update({"diffusers eager": ref})
        if c.left() > 150 * plan.scale:
            models["diffusers compiled"] = dev.compile(ref)
    fwd = {label: (lambda m=m: m(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask)) if "diffusers"
           in label else (lambda m=m: m(x, t, y_cut, mask_cut)) for label, m in models.items()}
    with torch.no_grad():
        for label in [k for k in fwd if "compiled" in k]:
            graphs = compiled_graphs()
            first = c.first_call(fwd[label])
            c.row(f"  first forward {label} ({compiled_graphs() - graphs} graphs built)", first)
        times = c.interleaved(fwd, rounds=plan.rounds[0])
        e32 = copy.deepcopy(ours).float()(x.float(), t, y_cut.float(), mask_cut)
        err_eager, err_compiled = rel_err(fwd["ours eager"](), e32), rel_err(fwd["ours compiled"](), e32)
    t_ref = median(times["diffusers eager"]) if "diffusers eager" in times else None
    c.figures[f"compiled_forward_{side}"] = dict(seconds=times, rel_err_fp32=dict(eager=err_eager, compiled=err_compiled))
    for label, ts in times.items():
        c.row(f"DiT forward {side}², 2 rows, bf16, {label}", median(ts), t_ref, note=spread(ts))
    c.row("compiled vs fp32, rel. error (ref: eager bf16 vs fp32)", err_compiled, err_eager, unit="",
          goal="≤ 1.25× eager's: " + _yes(err_compiled <= 1.25 * err_eager + 1e-4))
    del ref, ours, kv, compiled, models, fwd, fns
    dev.free()


def speed_cudagraphs(c):
    """CUDA graphs at the first size: each compiled block replayed as one graph (torch.compile mode="reduce-overhead",
    regional) against ours eager and compiled without them: the DiT forward and the whole image, interleaved."""
    from benchmark import random_t5
    dev, plan, dtype, side = c.dev, c.plan, torch.bfloat16, c.plan.sides[0]
    config = dit_for(plan, side)
    _, ours, _ = three_dits(config, dev.device, dtype)
    models = {"ours eager": ours, "ours compiled": dev.compile(ours), "ours CUDA graphs": dev.compile(ours, True)}
    x, t, y, mask = dit_inputs(config, side, 2, dev.device, dtype)
    y_cut, mask_cut = diffusion.drop_padding(y, mask)
    with torch.no_grad():
        for label in ("ours compiled", "ours CUDA graphs"):
            c.row(f"first forward {side}², {label}", c.first_call(lambda: models[label](x, t, y_cut, mask_cut)))
        times = c.interleaved({k: (lambda m=m: m(x, t, y_cut, mask_cut)) for k, m in models.items()}, plan.rounds[0])
    for label, ts in times.items():
        c.row(f"DiT forward {side}², 2 rows, bf16, {label}", median(ts), median(times["ours eager"]), note=spread(ts))
    spiece = tiny_spiece(c.work)
    text, tok, ae = random_t5(plan.t5, dtype, dev.device), Tokenizer(spiece), random_vae(plan.vae, dev.device, dtype)
    fns = image_fns(c, side, text, tok, ae, spiece, models)
    c.first_call(fns["ours CUDA graphs"])  # a new caption length: one more capture
    times = c.interleaved(fns, plan.rounds[-1])
    c.figures[f"cudagraphs_{side}"] = times
    for label, ts in times.items():
        c.row(f"image {side}², 20 steps + CFG, bf16, {label}", median(ts), median(times["ours eager"]), note=spread(ts))
    del models, fns
    dev.free()


def compile_sizes(c):
    """Compiled whole images above the first size (2048², 4096²: the 2K config), bf16, one image each: ours with KV
    compression in the deep half, plain, and diffusers' eager pipeline, in that order (the budget may stop it);
    peak memory of each phase, and at the largest size the --low-memory peak against the 16 GB goal. A first image
    that builds graphs (the first size's were static: one recompile with dynamic shapes) is timed again."""
    from benchmark import random_t5
    dev, plan, dtype = c.dev, c.plan, torch.bfloat16
    spiece = tiny_spiece(c.work)
    text, tok, ae = random_t5(plan.t5, dtype, dev.device), Tokenizer(spiece), random_vae(plan.vae, dev.device, dtype)
    goals = {2048: 4, 4096: 35}
    for side in [s for s in plan.sides[1:] if s in plan.compiled_sides]:
        config = dit_for(plan, side)
        ref, ours, kv = three_dits(config, dev.device, dtype)
        models = {"ours + KV compiled": dev.compile(kv), "ours compiled": dev.compile(ours), "diffusers": ref}
        fns = image_fns(c, side, text, tok, ae, spiece, models)
        secs = {}
        for label, fn in fns.items():
            c.need({2048: 30, 4096: 120}.get(side, 1), f"{side}² {label}")
            m = models[label]
            with Phases(c, text, m, ae.decoder) if label != "diffusers" else contextlib.nullcontext() as ph:
                graphs = compiled_graphs()
                secs[label] = c.first_call(fn)
                if built := compiled_graphs() - graphs:
                    c.row(f"first {side}² image, {label} (builds {built} graphs)", secs[label])
                    c.need({2048: 10, 4096: 60}.get(side, 1), f"{side}² {label}, timed")
                    secs[label] = c.first_call(fn)
            c.figures[f"image_{side}_{label}"] = dict(seconds=secs[label], peaks_gib=ph and ph.peaks)
            print(f"  {side}² {label}: {secs[label]:.2f} s", flush=True)
            if ph:
                low = max(ph.peaks.get("dit", 0), ph.peaks.get("vae", 0))
                c.row(f"  {label} {side}² peak GiB: T5 {ph.peaks.get('t5', 0):.1f} / DiT {ph.peaks.get('dit', 0):.1f} / "
                      f"VAE {ph.peaks.get('vae', 0):.1f}; --low-memory", low, unit="GiB",
                      goal="≤ 16 GB: " + _yes(low * 2**30 <= 16e9) if side == max(plan.sides) else None)
            c.save()  # a run cut short inside this long section keeps what it measured
        t_ref = secs.pop("diffusers", None)
        for label, s in secs.items():
            c.row(f"image {side}², 20 steps + CFG, bf16, {label}", s, t_ref,
                  goal=f"≤ {goals[side]} s: " + _yes(s <= goals[side]) if "KV" in label and side in goals else None)
        del ref, ours, kv, models, fns
        dev.free()


class Phases:
    """Peak memory and seconds of each phase of sample.generate (or diffusers' pipeline), from forward pre-hooks on the three
    models: T5, DiT (from its first forward), VAE (from the decoder's first forward); over repeated runs, the
    largest. Each counts what is allocated above the start plus the weights a user has on the device in that
    phase: sample.py frees T5 before the DiT arrives, and the VAE comes with the DiT."""

    def __init__(self, c, text, dit, decoder):
        self.c, self.peaks, self.seconds, self.phase = c, {}, {}, None
        self.weights = dict(t5=weight_bytes(text), dit=weight_bytes(dit, decoder), vae=weight_bytes(dit, decoder))
        self.handles = [m.register_forward_pre_hook(lambda *a, name=name: self.enter(name))
                        for name, m in (("t5", text), ("dit", dit), ("vae", decoder))]

    def __enter__(self):
        self.c.dev.free()
        self.base = self.c.dev.allocated()
        return self

    def enter(self, phase):
        if phase != self.phase:
            self.close()
            self.phase = phase
            self.c.dev.reset_peak()
            self.t0 = time.perf_counter()

    def close(self):
        if self.phase:
            self.c.dev.sync()
            peak = (self.c.dev.peak() - self.base + self.weights[self.phase]) / 2**30
            self.peaks[self.phase] = max(peak, self.peaks.get(self.phase, 0.0))
            self.seconds[self.phase] = time.perf_counter() - self.t0  # the last run's

    def __exit__(self, *exc):
        self.close()
        for h in self.handles:
            h.remove()


def speed_pipeline(c):
    """Whole sample.generate (T5-XXL, 20 DPM-Solver++ steps with CFG, VAE decode), one image, exact size, bf16:
    ours eager and with KV compression vs diffusers' PixArtSigmaPipeline on the same weights; peak GPU memory of
    each phase (T5 / DiT / VAE) and the --low-memory total (T5 on the CPU: the DiT and VAE phases only)."""
    from benchmark import random_t5
    dev, dtype, plan = c.dev, torch.bfloat16, c.plan
    c.need(20, "T5-XXL and the VAE")
    spiece = tiny_spiece(c.work)
    text, tok = random_t5(plan.t5, dtype, dev.device), Tokenizer(spiece)
    ae = random_vae(plan.vae, dev.device, dtype)
    prompt = PROMPT
    for side in plan.sides:
        config = dit_for(plan, side)
        c.need({1024: 15, 2048: 45, 4096: 150}.get(side, 1), f"pipeline {side}²")
        ref, ours, kv = three_dits(config, dev.device, dtype)
        warm, reps = (1, 2) if side <= 1024 else (0, 1)  # a 4096² image takes most of a minute: once is enough
        t_ref = ref_peak = ref_phases = None
        if ref is not None:
            pipe = diffusers_pipeline(c, text, ae, ref, spiece, side)
            with Phases(c, pipe.text_encoder, ref, pipe.vae.decoder) as ph_ref:
                t_ref = c.time(lambda: pipe(prompt, height=side, width=side, num_inference_steps=20,
                                            use_resolution_binning=False, clean_caption=False,
                                            generator=torch.Generator("cpu").manual_seed(0)), warm, reps)
            ref_peak = max(ph_ref.peaks.values())
            ref_phases = ph_ref.seconds
            del pipe
        for label, m in {"": ours, " + KV deep half": kv}.items():
            with Phases(c, text, m, ae.decoder) as ph:
                secs = c.time(lambda: sample.generate([prompt], m, text, tok, ae, size=(side, side), binning=False,
                                                      progress=False), warm, reps)
            c.figures[f"pipeline_{side}{label.replace(' ', '_')}"] = dict(
                seconds=secs, ref=t_ref, peaks_gib=ph.peaks, ref_peak_gib=ref_peak, phase_seconds=ph.seconds,
                ref_phase_seconds=ref_phases)
            print(f"  phases (s): ours {_phases(ph.seconds)}; diffusers {_phases(ref_phases or {})}", flush=True)
            c.row(f"pipeline {side}², 20 steps + CFG, bf16{label}", secs, t_ref,
                  goal="≥ 1.5×: " + _yes(t_ref / secs >= 1.5) if t_ref else None)
            low = max(ph.peaks.get("dit", 0), ph.peaks.get("vae", 0))
            c.row(f"  peak GiB: T5 {ph.peaks.get('t5', 0):.1f} / DiT {ph.peaks.get('dit', 0):.1f} / "
                  f"VAE {ph.peaks.get('vae', 0):.1f}", max(ph.peaks.values()), ref_peak, unit="GiB")
            c.row(f"  peak GiB with --low-memory (T5 on the CPU)", low, unit="GiB",
                  goal="≤ 16 GB: " + _yes(low * 2**30 <= 16e9) if side == max(plan.sides) else None)
        del ref, ours, kv
        dev.free()


def _phases(seconds):
    return " / ".join(f"{k} {v:.3f}" for k, v in seconds.items())


def profile(c):
    """Where a 1024² sample.generate spends its time: the torch profiler's top operators by device time (each
    kernel is listed under its operator and alone: the totals line below the table is the device's busy time)."""
    from benchmark import random_t5
    dev, plan, dtype = c.dev, c.plan, torch.bfloat16
    side = plan.sides[0]
    config = dit_for(plan, side)
    text, tok = random_t5(plan.t5, dtype, dev.device), Tokenizer(tiny_spiece(c.work))
    ae, dit = random_vae(plan.vae, dev.device, dtype), random_dit(config, dev.device, dtype)
    run = lambda: sample.generate(["a cactus"], dit, text, tok, ae, size=(side, side), binning=False,  # noqa: E731
                                  progress=False)
    run()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if dev.type == "cuda" else [])
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        run()
        dev.sync()
    wall = time.perf_counter() - t0
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15), flush=True)  # its last lines: the totals
    c.figures["profile_1024"] = dict(wall=wall)
    c.row(f"profiled {side}² generate (the table above: where the time goes)", wall)


def tiny_spiece(folder):
    """A small sentencepiece model with T5's special ids. The tokenizer does not change the cost (every prompt is
    padded to 300 tokens), so the released 32k-piece one is not needed."""
    import sentencepiece
    path = os.path.join(folder, "tokenizer", "spiece.model")
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        words = "a small cactus with happy face in the sahara desert red fox snow lighthouse on cliff at dawn".split()
        corpus = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(200)]
        sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=path[:-6],
                                                 vocab_size=40, model_type="word", pad_id=0, eos_id=1, unk_id=2,
                                                 bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    return path


def random_vae(config, device, dtype):
    with torch.device(device):
        return vaelib.AutoencoderKL(config).to(dtype).eval()  # default init: random, fine for timing


def diffusers_vae(ours):
    from diffusers import AutoencoderKL
    cfg = ours.config
    with torch.device(ours.post_quant_conv.weight.device):
        ref = AutoencoderKL(block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                            latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
                            down_block_types=("DownEncoderBlock2D",) * len(cfg.block_out_channels),
                            up_block_types=("UpDecoderBlock2D",) * len(cfg.block_out_channels),
                            scaling_factor=cfg.scaling_factor, sample_size=cfg.tile_latent * 8)
    ref.load_state_dict(ours.state_dict())
    return ref.to(ours.post_quant_conv.weight.dtype).eval()


def speed_t5(c):
    """T5-XXL encode, bf16, 300 tokens: the CFG pair (prompt + negative) and a training batch of 32; ours vs
    transformers' T5EncoderModel sharing the same tensors; peak memory with the weights."""
    from benchmark import hf_t5, padded_ids, random_t5
    dev = c.dev
    model = random_t5(c.plan.t5, torch.bfloat16, dev.device)
    ref = hf_t5(model)
    for N in (2, 32):
        ids, mask = padded_ids(model.config, N, device=dev.device)
        with torch.no_grad():
            t_ref = c.time(lambda: ref(input_ids=ids, attention_mask=mask))
            with c.peak(weight_bytes(model)) as box:
                secs = c.time(lambda: model(ids, mask))
        c.figures[f"t5_{N}"] = dict(seconds=secs, ref=t_ref, peak_gib=box[0])
        c.row(f"T5-XXL encode {N}×300 tokens, bf16 (peak {box[0]:.1f} GiB)", secs, t_ref)


def speed_vae(c):
    """VAE decode, bf16: 1024² whole and 4096² tiled (ours tiles by itself above 2048²; diffusers' tiling on);
    time and peak memory with the weights."""
    dev, dtype = c.dev, torch.bfloat16
    ours = random_vae(c.plan.vae, dev.device, dtype)
    ref = diffusers_vae(ours) if HAVE_DIFFUSERS else None
    for side in (c.plan.sides[0], c.plan.sides[-1]):
        tiled = side * side > c.plan.vae.tile_above
        reps = (1, 2) if side == c.plan.sides[0] else (0, 1)  # (warm-up, timed)
        z = torch.randn(1, 4, side // 8, side // 8, device=dev.device, dtype=dtype)
        with torch.no_grad():
            t_ref = ref_peak = None
            if ref is not None:
                ref.enable_tiling() if tiled else ref.disable_tiling()
                with c.peak(weight_bytes(ref)) as rbox:
                    t_ref = c.time(lambda: ref.decode(z / ours.scaling_factor), *reps)
                ref_peak = rbox[0]
            with c.peak(weight_bytes(ours)) as box:
                secs = c.time(lambda: ours.decode(z), *reps)
        c.figures[f"vae_{side}"] = dict(seconds=secs, ref=t_ref, peak_gib=box[0], ref_peak_gib=ref_peak)
        c.row(f"VAE decode {side}²{' tiled' if tiled else ''}, bf16", secs, t_ref)
        c.row(f"  peak GiB", box[0], ref_peak, unit="GiB")


# ------------------------------------------------------------------------------------------------- training
def train_step_fn(model, opt, x0, y, mask):
    def step():
        t = torch.randint(0, 1000, (x0.shape[0],), device=x0.device)
        with torch.autocast(x0.device.type, dtype=torch.bfloat16):
            loss = diffusion.training_losses(model, x0, t, y, mask)["loss"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def train_batch(config, px, N, device):
    """Latents, and captions of 60 used tokens: (N, 300, ·) for diffusers, cut to 60 for ours as train.py cuts them."""
    side = px // 8
    x0 = torch.randn(N, config.in_channels, side, side, device=device)
    y = torch.randn(N, 300, config.caption_channels, device=device)
    mask = torch.zeros(N, 300, device=device)
    mask[:, :60] = 1
    return x0, y, mask


def mfu(config, px, N, secs, measured):
    flops = 3 * N * dit_flops(config, (px // 16) ** 2, L=60)  # forward + backward ≈ 3 forwards
    return flops / secs / 1e12, flops / secs / (DATASHEET_TFLOPS * 1e12), flops / secs / (measured * 1e12)


def train_row(c, label, px, N, secs, t_ref=None, note=""):
    measured = c.figures.get("matmul_tflops") or DATASHEET_TFLOPS
    tf, m_sheet, m_meas = mfu(c.plan.dit["1024"], px, N, secs, measured)
    c.figures[label] = dict(seconds=secs, ref=t_ref, images_per_s=N / secs, tflops=tf, mfu=m_sheet,
                            mfu_of_measured=m_meas)
    c.row(f"{label}: {N / secs:.1f} img/s, MFU {m_sheet:.0%} ({m_meas:.0%} of measured)", secs,
          t_ref if isinstance(t_ref, float) else None, goal="MFU ≥ 35%: " + _yes(m_sheet >= 0.35),
          note="ref OOM" if t_ref == "OOM" else note)


def speed_train(c):
    """One training step (IDDPM loss, backward, CAME) in bf16 autocast, fp32 weights: ours ± gradient
    checkpointing vs diffusers' model under the same loss; images/s and MFU (FLOPs as dit_flops, fwd+bwd = 3×)."""
    dev, plan = c.dev, c.plan
    config = plan.dit["1024"]
    ours = random_dit(config, dev.device, torch.float32).train()
    ref = random_diffusers_dit(config, dev.device).train() if HAVE_DIFFUSERS else None
    ref_fn = ref and (lambda x, t, y, mask: ref(x, encoder_hidden_states=y, timestep=t,
                                                 encoder_attention_mask=mask).sample)
    for px, N in plan.train:
        c.need(30, f"training {px}² batch {N}")
        x0, y, mask = train_batch(config, px, N, dev.device)
        opt = CAME(ours.parameters(), lr=2e-5)
        for ckpt in (False, True):
            ours.gradient_checkpointing = ckpt
            t_ref = None
            if ref is not None:
                ref_opt = CAME(ref.parameters(), lr=2e-5)
                ref.enable_gradient_checkpointing() if ckpt else ref.disable_gradient_checkpointing()
                try:
                    t_ref = c.time(train_step_fn(ref_fn, ref_opt, x0, y, mask))
                except dev.OutOfMemory:
                    t_ref = "OOM"
                del ref_opt
                dev.free()
            try:
                secs = c.time(train_step_fn(ours, opt, x0, *diffusion.drop_padding(y, mask)))
            except dev.OutOfMemory:
                c.row(f"train {px}² batch {N}{' +ckpt' if ckpt else ''}", "OOM", t_ref)
                dev.free()
                continue
            train_row(c, f"train {px}² b{N} bf16 CAME{' +ckpt' if ckpt else ''}", px, N, secs, t_ref)
        del opt
        dev.free()


def speed_train_compiled(c):
    """The training step of `train` at the largest training size with regional compilation (train.py --compile:
    model.compile_blocks), without and with gradient checkpointing, interleaved with ours eager: the compile time
    apart (first step minus a compiled step), images/s and MFU of each."""
    dev, plan = c.dev, c.plan
    config, (px, N) = plan.dit["1024"], plan.train[-1]
    ours = random_dit(config, dev.device, torch.float32).train()
    compiled = dev.compile(ours)
    x0, y, mask = train_batch(config, px, N, dev.device)
    y, mask = diffusion.drop_padding(y, mask)
    for ckpt in (False, True):
        c.need(90, f"compiled training {px}² batch {N}{' +ckpt' if ckpt else ''}")
        ours.gradient_checkpointing = compiled.gradient_checkpointing = ckpt
        opts = CAME(ours.parameters(), lr=2e-5), CAME(compiled.parameters(), lr=2e-5)
        steps = {"eager": train_step_fn(ours, opts[0], x0, y, mask), "compiled": train_step_fn(compiled, opts[1], x0, y, mask)}
        graphs = compiled_graphs()
        first = c.first_call(steps["compiled"])
        built = compiled_graphs() - graphs
        times = c.interleaved(steps, rounds=plan.rounds[-1])
        suffix = f" +ckpt" if ckpt else ""
        c.figures[f"train_compiled_{px}_{N}{suffix}"] = dict(seconds=times, first=first, graphs=built)
        c.row(f"  first compiled step{suffix} ({built} graphs built): compile ≈ first - step", first - median(times["compiled"]))
        for label, ts in times.items():
            train_row(c, f"train {px}² b{N} bf16 CAME{suffix} {label}", px, N, median(ts), note=spread(ts))
        del opts, steps
        dev.free()


def max_batch(c):
    """The largest training batch at the largest training size that fits with gradient checkpointing (doubling
    until out of memory, then the midpoints), and its images/s."""
    dev, plan = c.dev, c.plan
    config = plan.dit["1024"]
    px = plan.train[-1][0]
    model = random_dit(config, dev.device, torch.float32).train()
    model.gradient_checkpointing = True
    opt = CAME(model.parameters(), lr=2e-5)
    fits, too_big, N, speed = 0, None, plan.train[-1][1], {}
    while N <= plan.max_batch and (too_big is None or too_big - fits > max(1, fits // 4)):
        c.need(N * 0.1, f"batch {N}")  # ~15 images/s at 1024² with checkpointing
        try:
            x0, y, mask = train_batch(config, px, N, dev.device)
            speed[N] = N / c.time(train_step_fn(model, opt, x0, y, mask), warmup=0, repeat=1)
            fits = N
            print(f"  batch {N}: fits, {speed[N]:.1f} img/s", flush=True)
        except dev.OutOfMemory:
            too_big = N
            print(f"  batch {N}: out of memory", flush=True)
        x0 = y = mask = None
        opt.zero_grad(set_to_none=True)
        dev.free()
        N = N * 2 if too_big is None else (fits + too_big) // 2
    c.figures["max_batch"] = dict(pixels=px, batch=fits, images_per_s=speed.get(fits), first_oom=too_big)
    c.row(f"largest batch {px}² +ckpt (first OOM: {too_big or f'none ≤ {plan.max_batch}'})", fits, unit="images",
          note=f"{speed.get(fits, 0):.1f} img/s")


def env(c):
    """The chip: name, memory, a large bf16 matmul's TFLOP/s (the MFU denominator beside the datasheet's)."""
    n = c.plan.matmul
    a = torch.randn(n, n, device=c.dev.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=c.dev.device, dtype=torch.bfloat16)
    secs = c.time(lambda: a @ b, warmup=3, repeat=10)
    c.figures["matmul_tflops"] = 2 * n**3 / secs / 1e12
    c.figures["device"] = dict(name=c.dev.name, memory_gib=c.dev.total_gib, torch=torch.__version__,
                               cuda=torch.version.cuda, diffusers=HAVE_DIFFUSERS)
    c.row(f"{c.dev.name}, {c.dev.total_gib:.0f} GiB, torch {torch.__version__}: bf16 matmul {n}³",
          c.figures["matmul_tflops"], unit="TFLOP/s")


# (name, function, estimate in H200 seconds) in priority order, the order they run: a run cut short (the device time of
# one call is ~10 minutes) has the figures that matter most. A new section: its function and one line, by its priority.
SECTIONS = [
    ("env", env, 5),                              # the chip, the measured matmul rate (MFU's second denominator)
    ("dit", check_dit, 20),                       # ours = diffusers on the same weights: the comparisons below are fair
    ("forward", speed_forward, 60),               # eager DiT forward vs diffusers', interleaved: medians and spread
    ("profile_forward", profile_forwards, 20),    # the two forwards' top kernels side by side
    ("compile", speed_compile, 150),              # regional compile at 1024²: image, compile time, forward, compiled = eager
    ("train_compiled", speed_train_compiled, 150),  # compiled training step ± checkpointing: MFU
    ("compile_sizes", compile_sizes, 60),         # compiled 2048² / 4096² images, KV compression, peak memory
    ("kv", check_kv, 5), ("pipeline", check_pipeline, 20),
    ("sample", speed_pipeline, 220),              # eager whole images at every size vs diffusers, memory per phase
    ("controlnet", speed_controlnet, 15),         # ControlNet, 13 copies: forward time and memory at 1024² beside the DiT
    ("t5", speed_t5, 20), ("vae", speed_vae, 30), ("lora", check_lora, 20), ("ddp", check_ddp, 40),
    ("train", speed_train, 60), ("max_batch", max_batch, 60), ("profile", profile, 15),
    ("cudagraphs", speed_cudagraphs, 90)]         # regional compile with CUDA graphs (mode="reduce-overhead")


def table(c):
    print(f"\n{'=' * 120}\nsigma GPU check: {c.dev.name}, torch {torch.__version__}, diffusers "
          f"{'yes' if HAVE_DIFFUSERS else 'NOT INSTALLED (ours alone)'}, {time.perf_counter() - c.start:.0f} s\n"
          f"{'section':<10} {'what':<66} {'ours':>11} {'reference':>11} {'ratio':>6}  goal")
    for r in c.rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else ""
        print(f"{r['section']:<10} {r['what'][:66]:<66} {_fmt(r['ours'], r['unit']):>11} {_fmt(r['ref'], r['unit']):>11}"
              f" {ratio:>6}  {r['goal'] or ''}")
    for name, s in c.sections.items():
        if s["status"] != "ok":
            print(f"{name:<10} {s['status']}")
    print("ratio: reference time / ours (> 1: ours faster); error rows: ours and the reference's own figure")


class Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
            s.flush()  # a run cut short keeps its log

    def flush(self):
        for s in self.streams:
            s.flush()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", ""), "gpu_check"),
                   help="folder for gpu_check.log and gpu_check.json (default: $OUT/gpu_check, or ./gpu_check)")
    p.add_argument("--dry", action="store_true", help="tiny configs on the CPU: the same code paths, < 1 minute")
    p.add_argument("--only", help="comma-separated sections (default: all, in order)")
    p.add_argument("--budget", type=float, help="seconds for the whole check (default: 540 on a GPU, 300 dry)")
    p.add_argument("--sides", help="comma-separated image sides to time instead of the plan's (e.g. 1024)")
    p.add_argument("--list", action="store_true", help="print the sections and exit")
    args = p.parse_args(argv)
    names = [n for n, _, _ in SECTIONS]
    if args.list:
        print("\n".join(f"{n:<15} {fn.__doc__.split(chr(10))[0]}" for n, fn, _ in SECTIONS))
        return 0
    only = args.only.split(",") if args.only else names
    if bad := [n for n in only if n not in names]:
        p.error(f"--only: unknown section(s) {', '.join(bad)}; choose from {', '.join(names)}")
    if not args.dry and not torch.cuda.is_available():
        p.error("no CUDA device here: run it on a GPU machine, or --dry for the CPU rehearsal")
    plan, dev = (DRY, Host()) if args.dry else (FULL, Cuda())
    if args.sides:
        plan = dataclasses.replace(plan, sides=tuple(int(v) for v in args.sides.split(",")))
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "gpu_check.log"), "w")
    stdout = sys.stdout
    sys.stdout = Tee(stdout, log)
    try:
        c = Check(dev, plan, args.out, args.budget or plan.budget)
        torch.manual_seed(0)
        for name, fn, estimate in SECTIONS:
            if name in only:
                c.run(name, fn, estimate)
        table(c)
        c.save()
    finally:
        sys.stdout = stdout
        log.close()
    return 1 if any(s["status"].startswith("FAIL") for s in c.sections.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
