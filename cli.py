"""The command lines of sample.py and train.py: every flag, with its help and default, and every check that needs
no weights and no data. A mistake is one line naming the flag, the problem and the fix, found before anything is
loaded, downloaded, built or trained (tests/test_cli.py); help shows the defaults that exist. (quickstart.py's and
export.py's few flags stay in their files.)"""
import argparse
import math
import os
import pathlib
import signal
import socket
import sys
import threading

import torch

import checkpoints
import data
import diffusion
import hub
import lora
import sigma
import sizes
import weights


# ---------------------------------------------------------------------------------------------- shared
class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block first
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each help text (except unset ones, whose help says what happens, and on/off flags,
    whose default is the other state), the description and examples verbatim."""
    def _get_help_string(self, action):
        unset = action.default is None or action.default is False or action.default == "" or action.nargs == 0
        return action.help if unset else super()._get_help_string(action)


def stop_on_interrupt(prog):
    """Ctrl-C ends the process at once with one line, exit status 130, even inside one long torch operation: Python
    raises KeyboardInterrupt only when the operation returns (a sampling step far above the training size can take
    minutes). Its C-level signal handler writes each signal to a wakeup socket at once; a thread waiting on it exits.
    For sampling only: nothing is lost there but the images not yet written (train.py saves on its own terms)."""
    receive, send = socket.socketpair()
    send.setblocking(False)
    signal.signal(signal.SIGINT, lambda *_: None)  # the thread answers; the main thread carries on until it exits
    signal.set_wakeup_fd(send.fileno())

    def wait(receive, send):  # holds `send` too: were it garbage-collected, its descriptor would close
        while receive.recv(1) != bytes([signal.SIGINT]):
            pass
        print(f"\n{prog}: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        os._exit(130)
    threading.Thread(target=wait, args=(receive, send), daemon=True).start()


def check_ranges(args, rules):
    """rules: (flag, ok, rule) rows, e.g. ("--steps", args.steps >= 1, ">= 1"); the first failing one is refused
    (a NaN fails every comparison, so it is refused too)."""
    for flag, ok, rule in rules:
        if not ok:
            raise ValueError(f"{flag} {getattr(args, flag[2:].replace('-', '_'))}: must be {rule}")


def parse_device(text):
    """--device -> torch.device, refused now when torch does not know it or this machine lacks it."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text}: not a device name; use cpu, cuda or cuda:N (mps on a Mac)") from None
    try:
        torch.empty(0, device=device)
    except Exception as e:  # no CUDA build, no GPU, index out of range
        raise ValueError(f"--device {text}: not available here ({weights.first_line(e)}); use cpu") from None
    return device


# ---------------------------------------------------------------------------------------------- sample.py
DTYPES = dict(auto=None, fp32=torch.float32, float32=torch.float32, bf16=torch.bfloat16, bfloat16=torch.bfloat16,
              fp16=torch.float16, float16=torch.float16, half=torch.float16)  # --dtype, as other tools spell it


def sample_parser(doc):
    """sample.py's flags; doc: its docstring (the first paragraph describes, the examples end the help)."""
    p = ArgumentParser(description=doc.split("\n\n")[0], epilog=doc[doc.index("Examples:"):], formatter_class=HelpFormatter)
    p.add_argument("prompt", nargs="*", help="one or more prompts (quote each)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line (added after the prompts above)")
    p.add_argument("--negative", default="", help="negative prompt (default: none, i.e. the null caption T5(\"\"))")
    p.add_argument("--size", help="1024, 2048, 4096, 2K (square) or WxH such as 1344x768 (default: the model's training size)")
    p.add_argument("--force-size", action="store_true", help="sample even when the size's estimated memory exceeds what "
                   "is free, or its estimated time an hour (sample.py estimates both before it starts, and refuses)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (20 suits dpm; ancestral wants ~100)")
    p.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance scale, >= 1 (1 = off)")
    p.add_argument("--seed", type=int, help="seed of the first image, image k uses seed+k (default: random, saved in the PNG)")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=1, help="images per DiT forward (faster if memory allows; same images)")
    p.add_argument("--sampler", choices=["dpm", "ancestral"], default="dpm", help="DPM-Solver++(2M) as diffusers, or IDDPM ancestral")
    p.add_argument("--model", default="auto", help=f"released model ({', '.join(hub.MODELS)}; auto: 1024 up to 1536², "
                   "2K above), a local official .pth, diffusers folder, our .safetensors or train.py run folder (latest, EMA if kept)")
    p.add_argument("--components", help=f"T5, tokenizer and VAE: a local folder laid out as {hub.COMPONENTS_REPO} or a Hub "
                   "repo id (default: that repo, or the model's own diffusers folder when it holds them)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", help="add a LoRA, merged into the "
                   "weights: a PEFT adapter folder or .safetensors, or a train.py --lora-rank run; SCALE default 1; repeatable")
    p.add_argument("--kv-compress", metavar="MODE[:LAYERS]", help="KV token compression (paper §3.2), off by default: MODE "
                   "conv, uniform or avgpool; LAYERS such as 14-27 (default: the deep half); faster at 2K-4K")
    p.add_argument("--dtype", default="auto", help=f"DiT and VAE precision: {', '.join(DTYPES)} (auto: bfloat16 on GPU, "
                   "float32 on CPU); T5 runs in bfloat16 unless float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--out", default="out", help="output folder; files are numbered and never overwritten")
    p.add_argument("--no-binning", action="store_true", help="generate at the exact size instead of the nearest trained aspect-ratio bucket")
    p.add_argument("--low-memory", action="store_true", help="run T5 on the CPU (slower) so that small GPUs suffice")
    p.add_argument("--compile", action="store_true", help="torch.compile each DiT block (regional: one compile serves "
                   "all blocks); the first image pays the compile, later ones run faster")
    return p


def check_sample_args(args):
    """Every check that needs no weights, before anything is loaded or downloaded -> (prompts, torch device)."""
    try:
        lines = pathlib.Path(args.prompts_file).read_text(encoding="utf-8").splitlines() if args.prompts_file else []
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompts-file {args.prompts_file}: cannot read it ({getattr(e, 'strerror', None) or e}); "
                         "give a UTF-8 text file with one prompt per line") from None
    prompts = list(args.prompt) + [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {args.prompts_file} holds no prompt: write one per line" if args.prompts_file
                         else "no prompt: give one (quoted) or --prompts-file")
    check_ranges(args, [("--steps", 1 <= args.steps <= diffusion.NUM_TIMESTEPS, f"from 1 to {diffusion.NUM_TIMESTEPS}"),
                        ("--cfg", 1 <= args.cfg < float("inf"), ">= 1 (1 = no guidance; diffusers too guides only above 1)"),
                        ("--n", args.n >= 1, ">= 1"), ("--batch-size", args.batch_size >= 1, ">= 1")])
    if args.dtype.lower() not in DTYPES:
        raise ValueError(f"--dtype {args.dtype!r} is unknown: use one of {', '.join(DTYPES)}")
    if args.negative and args.cfg == 1:
        raise ValueError("--negative has no effect with --cfg 1 (no guidance): give a --cfg above 1, or leave it out")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file: give a folder (created if missing)")
    if args.kv_compress:  # every released model has 28 blocks; a local one's depth is checked when it loads
        hub.parse_kv_compress(args.kv_compress, None if os.path.exists(args.model) else 28)
    hub.check_components(args.components)
    return prompts, parse_device(args.device)


# ---------------------------------------------------------------------------------------------- train.py
def typed_flags(argv):
    """The flags as typed on the command line ('--lr=1e-3' -> '--lr'); abbreviations are off (allow_abbrev=False)."""
    return {a.split("=")[0] for a in argv if a.startswith("--")}


def parse_train_args(argv=None, defaults=None, need_data=True, own_components=False, doc=None):
    """train.py's flags -> args, checked (check_train_args); defaults: a caller's own (shown by --help, explicit flags
    win); need_data: --data is required (False: the caller brings the dataset, and --data is refused);
    own_components: the caller brings T5 and the VAE (--components is refused); doc: the help's description."""
    # Which default wins, lowest first: train_parser's own, the caller's `defaults` (the quick start's), LoRA's
    # (lora.TRAIN_DEFAULTS, with --lora-rank), the flags recorded in the run --resume continues; a flag typed on the
    # command line beats them all. argv is parsed once; each later layer fills the flags that were not typed.
    argv = sys.argv[1:] if argv is None else argv
    p = train_parser(defaults, need_data, doc)
    args = p.parse_args(argv)
    typed = {action.dest for action in p._actions if typed_flags(argv) & set(action.option_strings)}  # names in args
    recorded = checkpoints.recorded_flags(weights.latest_checkpoint(args.out)) if args.resume else None
    for layer in (lora.TRAIN_DEFAULTS if args.lora_rank else {}, recorded or {}):
        for name, value in layer.items():
            if name not in typed:
                setattr(args, name, value)
    if need_data and not args.data:
        p.error("--data is required (the no-download CPU demo: python quickstart.py train)")
    if not need_data and args.data:
        p.error("--data: this entry point trains on its own dataset; use train.py for your images")
    if not need_data and args.cache:
        raise ValueError("--cache builds from --data's images; this entry point brings its own dataset")
    check_train_args(args, argv, own_components)
    return args


def train_parser(defaults=None, need_data=True, doc=None):
    """train.py's flags, in the groups --help shows them: data, model, then add_loop_flags' optimisation, run, faults."""
    # no abbreviated flags: check_train_args must see every flag given, as typed
    p = ArgumentParser(description=doc, formatter_class=HelpFormatter, allow_abbrev=False)
    hidden = lambda text: text if need_data else argparse.SUPPRESS  # refused when the caller brings the dataset
    a = p.add_argument_group("data").add_argument
    a("--data", help=hidden("folder of images + same-name .txt captions, or a .jsonl manifest"))
    a("--caption-keys", default="caption", help="jsonl caption fields with mixing weights, e.g. 'caption:0.5,vlm:0.5'")
    a("--image-size", type=int, default=1024, help="training resolution: picks the bucket table (256/512/1024/2048)")
    a("--no-buckets", action="store_true", help="one square bucket of --image-size instead of the 40 aspect ratios")
    a("--cache", help=hidden("feature cache folder: encode once with T5 + VAE, then train without them"))
    a("--components", default=None, help="folder or Hub repo with text_encoder/, tokenizer/, vae/ (default: PixArt-Σ's)")
    a("--vae", help="VAE to encode with instead of the components' (e.g. SD's for a PixArt-α run)")
    a("--workers", type=int, default=4, help="data-loading processes per rank")
    a = p.add_argument_group("model").add_argument
    a("--init", default="scratch", help="'scratch', a released name (256, 512, 1024, 2K), an official .pth, "
                                        "a diffusers folder, our .safetensors or a train.py run (latest; EMA weights if kept)")
    a("--config", default="1024", choices=list(sigma.CONFIGS), help="architecture for --init scratch: a released config name")
    a("--caption-tokens", type=int, default=300, help="T5 tokens per caption (PixArt-α used 120, Σ 300)")
    a("--pe-interpolation", type=float, help="position-embedding scale (default: the init's, × new/old size when --image-size changes it)")
    a("--kv-compress-layers", default="", help="add KV compression: 'deep' (paper), '14-27', '3,5'")
    a("--kv-compress-ratio", type=int, help="keys/values merged ratio×ratio (default 2)")
    a("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank on the frozen --init model (0: all weights);"
                                               " defaults then: AdamW, lr 1e-4 unscaled, clip 1, warmup 100")
    a("--lora-alpha", type=float, help="LoRA scale: ΔW = (alpha/rank)·B·A (default: alpha = rank)")
    a("--lora-targets", default="blocks", help="'blocks' (attention + MLP Linears of every block), 'all' (also the "
                                               "embedders, adaLN and output, as the official LoRA script) or a list")
    add_loop_flags(p)
    p.set_defaults(**(defaults or {}))
    return p


def add_loop_flags(p):
    """train.py's flags of the training loop: optimisation, run, faults."""
    a = p.add_argument_group("optimisation").add_argument
    a("--steps", type=int, default=1000, help="optimizer steps in total")
    a("--batch-size", type=int, default=4, help="images per rank per micro-batch")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--optimizer", default="came", choices=["came", "adamw"], help="CAME as the official configs, or AdamW")
    a("--lr", type=float, default=2e-5, help="base learning rate at a total batch of 256")
    a("--no-lr-scaling", dest="lr_scaling", action="store_false", help="use --lr as is, not × √(batch/256)")
    a("--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    a("--warmup", type=int, default=1000, help="linear warmup steps (official: 1000; 500 for the KV stage)")
    a("--clip", type=float, default=0.01, help="gradient-norm clip (official 0.01)")
    a("--caption-dropout", type=float, default=0.1, help="probability of the null caption (for CFG)")
    a("--ema", type=float, default=0.0, help="EMA decay, e.g. 0.9999 (0 = off, as the official Sigma trainer)")
    a("--bf16", action="store_true", help="bf16 autocast (weights and optimizer stay fp32)")
    a("--grad-checkpoint", action="store_true", help="recompute block activations in the backward pass")
    a("--compile", action="store_true", help="torch.compile each DiT block (regional; checkpoints keep their keys)")
    a("--seed", type=int, default=0, help="seed of the data order and of the noise")
    a = p.add_argument_group("run").add_argument
    a("--out", default="runs/train", help="run folder: checkpoints, log.jsonl")
    a("--resume", action="store_true", help="continue from --out/latest with the flags recorded there (a flag "
                                              "given again changes that one: --steps, --lr, ...)")
    a("--save-every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    a("--keep", type=int, default=3, help="keep the last N checkpoints (0 = all)")
    a("--log-every", type=int, default=10, help="log every N steps")
    a("--preview-every", type=int, default=0, help="save a sample grid every N steps, a multiple of --save-every (0 = off)")
    a("--preview-prompts", default="a photo of a cat on a sofa|a watercolor painting of a lighthouse at dawn",
      help="'|'-separated preview prompts")
    a("--preview-sampler", default="dpm", choices=["dpm", "ancestral"], help="20-step DPM-Solver++ or 100-step IDDPM")
    a("--clip-x0", type=float, help="sampling (previews, and sample.py on this run) clips x̂0 to [-B, B] (default: "
                                     "off, as PixArt-Σ; where the latents' range is known, such as pixels × 4)")
    a("--device", help="cuda or cpu (default: cuda when available)")
    a = p.add_argument_group("faults").add_argument
    a("--max-nonfinite", type=int, default=5, help="stop after N steps in a row whose loss or gradient norm is not "
                                                    "finite (each one is skipped: nothing is updated)")
    a("--ddp-timeout", type=int, default=600, help="seconds a rank waits for the others in a collective before it "
                                                   "stops (one died or hangs); longer than any save or preview")


def check_train_args(args, argv, own_components=False):
    """Every check that needs no weights and no data, before anything is built, downloaded or trained. argv: the flags
    as typed (a flag given but without effect is refused, not dropped); own_components: the caller brings T5 and VAE."""
    lora.check_train_args(args)  # the LoRA flags first
    given = typed_flags(argv)
    value = lambda flag: getattr(args, flag[2:].replace("-", "_"))
    check_ranges(args, [(f, value(f) >= 1, ">= 1") for f in ("--steps", "--batch-size", "--grad-accum", "--save-every",
                                                             "--log-every", "--image-size", "--caption-tokens",
                                                             "--max-nonfinite", "--ddp-timeout")]
                 + [(f, value(f) >= 0, ">= 0") for f in ("--warmup", "--keep", "--workers", "--preview-every", "--seed",
                                                         "--weight-decay")]
                 + [("--lr", args.lr > 0, "> 0"), ("--clip", args.clip > 0, "> 0"),
                    ("--clip-x0", args.clip_x0 is None or args.clip_x0 > 0, "> 0"),
                    ("--caption-dropout", 0 <= args.caption_dropout <= 1, "in [0, 1]"), ("--ema", 0 <= args.ema < 1, "in [0, 1)"),
                    ("--pe-interpolation", args.pe_interpolation is None or args.pe_interpolation > 0, "> 0"),
                    ("--kv-compress-ratio", args.kv_compress_ratio is None or args.kv_compress_ratio >= 2, ">= 2")])
    no_effect = {"--kv-compress-ratio": (not args.kv_compress_layers, "needs --kv-compress-layers"),  # flag: (useless?, why)
                 "--preview-prompts": (not args.preview_every, "needs --preview-every N"),
                 "--preview-sampler": (not args.preview_every, "needs --preview-every N"),
                 "--config": (args.init != "scratch", "applies to --init scratch only"),
                 "--components": (own_components, "is set by this entry point")}
    for flag, (useless, why) in no_effect.items():
        if flag in given and useless:
            raise ValueError(f"{flag} {why}: it would have no effect; leave it out")
    if args.preview_every % args.save_every and args.preview_every < args.steps:  # previews are drawn with checkpoints
        if "--preview-every" in given:
            raise ValueError(f"--preview-every {args.preview_every}: previews are drawn at checkpoints; give a multiple "
                             f"of --save-every {args.save_every}")
        if os.environ.get("RANK", "0") == "0":  # a caller's default cadence, said rather than silently thinned
            print(f"{checkpoints.program()}: previews every {math.lcm(args.preview_every, args.save_every)} steps and at the end, "
                  f"with the checkpoints (--preview-every {args.preview_every}, --save-every {args.save_every})")
    data.caption_keys(args.caption_keys, (args.data or "").endswith(".jsonl"))
    if args.kv_compress_layers:  # the syntax now; the blocks against the model's depth once it is known
        hub.parse_layers(args.kv_compress_layers)
    if not any(q.strip() for q in args.preview_prompts.split("|")):
        raise ValueError("--preview-prompts: give one or more prompts separated by '|'")
    for flag, path in (("--out", args.out), ("--cache", args.cache)):
        if path and os.path.isfile(path):
            raise ValueError(f"{flag} {path} is a file: give a folder (created if missing)")
    for flag, path in (("--data", args.data), ("--vae", args.vae)):
        if path and not os.path.exists(path):
            raise ValueError(f"{flag} {path} does not exist" + (" (a folder of images + .txt captions or a .jsonl manifest)"
                             if flag == "--data" else " (a diffusers VAE folder or a single-file .safetensors)"))
    continued = args.resume and not args.lora_rank and weights.latest_checkpoint(args.out)  # its own model, not --init's
    if args.init != "scratch" and not continued and (os.path.exists(args.init) or not hub.model_name(args.init)):
        hub.resolve_model(args.init, "--init")  # a local path: what it holds is checked, nothing is loaded
    hub.check_components(args.components)
    if not own_components:  # a caller's own VAE: train.main checks the size against it
        check_image_size(args.image_size, weights.vae_factor(run_vae(args)))
    if not args.no_buckets:
        sizes.bucket_table(args.image_size)  # its message names --no-buckets
    if args.device:
        parse_device(args.device)
    resume = weights.latest_checkpoint(args.out)  # --out's latest checkpoint: continued only with --resume
    checkpoints.check_resume(args, resume, master=os.environ.get("RANK", "0") == "0")


def run_vae(args, components=None):
    """The VAE a run encodes with: --vae, else its components' (a caller's, or a local --components folder's); None:
    the released SDXL VAE of a Hub repo, not fetched yet."""
    return args.vae or (components or hub.check_components(args.components) or {}).get("vae")


def check_image_size(size, vae_factor):
    """--image-size: whole 2x2 patches of latents, vae_factor pixels each (the VAE's pixels per latent)."""
    if size % (2 * vae_factor):
        raise ValueError(f"--image-size {size}: must be a multiple of {2 * vae_factor} (the DiT's 2x2 patches of "
                         f"latents, {vae_factor} px each)")
