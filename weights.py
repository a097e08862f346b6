"""Weight files in and out: every file layout read or written for the DiT (sigma.py), T5 (t5.py) and the VAE (vae.py).

The model files name their modules after the checkpoint keys, so reading a released file is mostly the identity,
and another naming is one pure function beside its model (sigma.convert_diffusers, vae.convert_ldm). This file
knows the rest: which files a layout has, where its config is, how to tell the layouts apart, and how to write:

    layout                                                        read                write
    official PixArt-Σ / -α .pth (torch zip, {"state_dict": ...})  load_checkpoint     -
    official PixArt-α ControlNet .pth (base_model.*, controlnet.*)  load_checkpoint     -
    a ControlNet alone: ours (.safetensors), diffusers' adapter     load_controlnet     save_controlnet(_diffusers)
    diffusers transformer/ (config.json + safetensors, sharded)   load_checkpoint     save_diffusers
    ours: one .safetensors, the SigmaConfig in its metadata       load_checkpoint     save_checkpoint
    a train.py run: latest -> step_N/{model,ema}.safetensors      latest_checkpoint   (checkpoints.save_state)
    T5 text_encoder/ (index + fp32 shards, or one file)           load_t5             -
    VAE: diffusers vae/ folder, or one LDM file (sdxl_vae)        load_vae            -

Three rules hold for all of them. Torch files are read with weights_only=True: a checkpoint is data and never runs
code. A file that does not fit its model is ONE error naming every missing, unexpected and misshaped key
(check_keys). Every write goes to a temporary name and is renamed into place (atomic): a run killed at any moment
leaves the old file or the new one, never half of one.

    model = load_checkpoint("PixArt-Sigma-XL-2-1024-MS.pth")    # or a diffusers folder, or our .safetensors
    save_checkpoint(model, "mine.safetensors")                   # loads again with no flags
    text_encoder = load_t5("…/text_encoder", dtype=torch.bfloat16); vae = load_vae("…/vae")
"""
import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import controlnet
import sigma
import t5
import vae as vaelib


# ---------------------------------------------------------------------------------------------- shared
@contextlib.contextmanager
def atomic(path):
    """Write `path`, a file or a folder, under a temporary name beside it (yielded), renamed onto `path` when the block
    ends without error. The temporary name is fixed (.NAME.tmp, hidden from listings of step_* or shard_* names), so
    the leftover of a killed write is cleared by the next write of the same path. A write that the file system refuses
    (disk full, read-only, quota) raises an OSError naming the file and its errno, whichever library wrote it."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    _remove(tmp)
    try:
        yield tmp
        os.replace(tmp, path)  # atomic on one file system: readers see the old path or the new one
    except Exception as e:
        code = _os_errno(e)
        if code is None or isinstance(e, OSError) and e.filename:
            raise
        raise OSError(code, os.strerror(code), path) from e
    finally:
        _remove(tmp)  # only after an error: what was written aside goes


def _os_errno(e):
    """The errno behind a failed write, or None: an OSError's, one that torch.save's RuntimeError was raised over, or
    the number in safetensors' message ('I/O error: No space left on device (os error 28)')."""
    while e is not None:
        if isinstance(e, OSError) and e.errno:
            return e.errno
        if found := re.search(r"\(os error (\d+)\)", str(e)):
            return int(found[1])
        e = e.__cause__ or e.__context__
    return None


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def check_keys(found, expected, source, model, hint=""):
    """The one mismatch report: raise a ValueError naming the missing, unexpected and misshaped keys of a state dict
    `found` against the model's `expected` (both {key: tensor or shape}); nothing when they fit."""
    shape = lambda v: tuple(v.shape) if hasattr(v, "shape") else tuple(v)
    missing = [f"{k} {shape(v)}" for k, v in expected.items() if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [f"{k}: checkpoint {shape(found[k])} vs model {shape(v)}"
                 for k, v in expected.items() if k in found and shape(found[k]) != shape(v)]
    if missing or unexpected or misshaped:
        show = lambda xs: ", ".join(xs[:8]) + (f" … (+{len(xs) - 8})" if len(xs) > 8 else "")
        raise ValueError(f"{source} does not fit {model}:" + (f"\n  missing keys: {show(missing)}" if missing else "")
                         + (f"\n  unexpected keys: {show(unexpected)}" if unexpected else "")
                         + (f"\n  shape mismatches: {show(misshaped)}" if misshaped else "") + (f"\n{hint}" if hint else ""))


def first_line(error):
    """An exception as one line for a message: 'TypeName: the first line of its text'."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def read_safetensors(path):
    """A .safetensors file -> (its tensors, its metadata); a damaged one -> one ValueError that says what to do."""
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except Exception as e:  # truncated download, wrong file
        raise ValueError(f"could not read {path} as safetensors ({e}); delete it and download it again") from None


def read_torch(path):
    """A torch checkpoint (.pth, .bin, .ckpt) -> its state dict, read as weights only: no pickled code ever runs."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read {path} as a torch checkpoint ({first_line(e)}; "
                         "read weights only, no pickled code runs): is the file complete? download it again") from None
    return sd.get("state_dict", sd)  # the official .pth and LDM .ckpt files wrap it


def shard_files(index, check=True):
    """A sharded checkpoint's *.safetensors.index.json (weight_map: key -> shard file) -> the shard paths beside it,
    sorted; check: each must be there, else one error naming the first missing shard."""
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    files = [os.path.join(os.path.dirname(index), name) for name in sorted(set(weight_map.values()))]
    for file in files if check else []:
        if not os.path.isfile(file):
            keys = [k for k, v in weight_map.items() if v == os.path.basename(file)]
            raise FileNotFoundError(f"{index} expects shard {os.path.basename(file)} ({len(keys)} tensors, e.g. "
                                    f"{keys[0]}) but {file} does not exist; download every shard the index lists")
    return files


def _read_json(path):
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------- train.py runs
def latest_checkpoint(run):
    """A train.py run folder -> the step_N folder its `latest` pointer names, or None before the first checkpoint.
    (Whether that folder holds what the caller needs is the caller's to check and say.)"""
    pointer = os.path.join(run, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(run, f.read().strip())


def step_weights(step):
    """A train.py step_N folder -> the DiT to use: ema.safetensors when the run kept an EMA, else model.safetensors."""
    ema = os.path.join(step, "ema.safetensors")
    return ema if os.path.isfile(ema) else os.path.join(step, "model.safetensors")


def find_checkpoint(path, flag="--model"):
    """A local --model/--init path -> the checkpoint it stands for, checked without loading it: a diffusers pipeline or
    transformer folder, a train.py run (its latest checkpoint) or step folder (EMA weights if kept), a .safetensors
    file holding a DiT, or a torch .pth (a zip archive, or the older pickle format: read weights-only later)."""
    accepted = ("give an official .pth, a diffusers pipeline or transformer folder, our .safetensors, or a train.py "
                "run or step_N folder")
    given = path
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "transformer")):  # a whole diffusers pipeline folder
            path = os.path.join(path, "transformer")
        elif latest := latest_checkpoint(path):  # a train.py run folder: its latest checkpoint
            path = latest
            if not os.path.isdir(path):
                raise ValueError(f"{flag} {given}: its 'latest' names {os.path.basename(path)}, which is missing; "
                                 "pass one of its step_N folders")
        if os.path.isfile(os.path.join(path, "model.safetensors")):  # a train.py checkpoint
            path = step_weights(path)
        elif any(os.path.isfile(os.path.join(path, f"diffusion_pytorch_model.safetensors{i}")) for i in ("", ".index.json")):
            return path  # a diffusers transformer folder
        elif any(os.path.exists(os.path.join(path, f)) for f in ("log.jsonl", "sample.json")):
            raise ValueError(f"{flag} {given} is a train.py run with no checkpoint yet (no 'latest'): the first one is "
                             "written after --save-every steps; wait for it, or pass another model")
        else:
            raise ValueError(f"{flag} {given} is {'an empty folder' if not os.listdir(path) else 'a folder without a checkpoint'}: "
                             + accepted)
    with open(path, "rb") as f:
        head = f.read(8)
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, "pt") as f:  # reads the header only
                keys = list(f.keys())
        except Exception as e:
            raise ValueError(f"{flag} {given}: not a readable .safetensors file ({type(e).__name__}: {e}); "
                             "if it was downloaded, download it again") from None
        if not {"x_embedder.proj.weight", "pos_embed.proj.weight"} & set(keys):
            raise ValueError(f"{flag} {given}: this .safetensors file holds no PixArt DiT (no x_embedder.proj.weight "
                             f"or pos_embed.proj.weight; first keys: {keys[:3]}): {accepted}")
    elif head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save's zip archive, or its legacy pickle
        raise ValueError(f"{flag} {given} is not a checkpoint (neither a torch .pth nor a .safetensors file): {accepted}")
    return path


# ---------------------------------------------------------------------------------------------- the DiT
def diffusers_config(config):
    """diffusers' PixArtTransformer2DModel config.json for a SigmaConfig."""
    c = config
    return {"_class_name": "PixArtTransformer2DModel", "activation_fn": "gelu-approximate", "attention_bias": True,
            "attention_head_dim": c.hidden_size // c.num_heads, "attention_type": "default",
            "caption_channels": c.caption_channels, "cross_attention_dim": c.hidden_size, "dropout": 0.0,
            "in_channels": c.in_channels, "interpolation_scale": c.pe_interpolation, "norm_elementwise_affine": False,
            "norm_eps": 1e-6, "norm_num_groups": 32, "norm_type": "ada_norm_single", "num_attention_heads": c.num_heads,
            "num_embeds_ada_norm": 1000, "num_layers": c.depth, "out_channels": c.out_channels,
            "patch_size": c.patch_size, "sample_size": c.sample_size, "upcast_attention": False,
            "use_additional_conditions": False}  # must be explicit: unset, diffusers turns it on at sample_size 128


def config_from_diffusers(d):
    """diffusers' config.json (a dict) -> SigmaConfig; diffusers does not record the caption length (300 assumed)."""
    heads = d.get("num_attention_heads", 16)
    interp = d.get("interpolation_scale") or max(d.get("sample_size", 128) // 64, 1)
    return sigma.SigmaConfig(depth=d.get("num_layers", 28), hidden_size=heads * d.get("attention_head_dim", 72),
                             num_heads=heads, patch_size=d.get("patch_size", 2), in_channels=d.get("in_channels", 4),
                             out_channels=d.get("out_channels") or d.get("in_channels", 4),
                             caption_channels=d.get("caption_channels") or 4096, sample_size=d.get("sample_size", 128),
                             pe_interpolation=float(interp))


def config_from_official(sd):
    """Infer the config of an official state dict from its shapes (head width 72 as every PixArt model; the
    released models' pe convention, training size / 512)."""
    w = sd["x_embedder.proj.weight"]  # (D, C, p, p)
    D, p = w.shape[0], w.shape[2]
    kv = sorted(int(k.split(".")[1]) for k in sd if k.endswith("attn.sr.weight"))
    cfg = dict(depth=len([k for k in sd if k.endswith(".scale_shift_table") and k.startswith("blocks.")]),
               hidden_size=D, num_heads=max(D // 72, 1), patch_size=p, in_channels=w.shape[1],
               out_channels=sd["final_layer.linear.weight"].shape[0] // (p * p),
               caption_channels=sd["y_embedder.y_proj.fc1.weight"].shape[1], kv_compress_layers=tuple(kv))
    if "y_embedder.y_embedding" in sd:
        cfg["caption_tokens"] = sd["y_embedder.y_embedding"].shape[0]
    if kv:
        cfg["kv_compress_ratio"] = sd[f"blocks.{kv[0]}.attn.sr.weight"].shape[-1]
    if "pos_embed" in sd:  # (1, T, D) table of the training grid: the only trace of the training size
        cfg["sample_size"] = int(round(sd["pos_embed"].shape[1] ** 0.5)) * p
        cfg["pe_interpolation"] = cfg["sample_size"] / 64  # released models: training size / 512
    else:
        print("weights: checkpoint has no pos_embed; assuming the 1024 model's training size (pass config= to set it)",
              file=sys.stderr)
    return sigma.SigmaConfig(**cfg)


def checkpoint_config(path):
    """The SigmaConfig stored in our .safetensors checkpoint, read from its header alone."""
    with safe_open(path, framework="pt") as f:
        config = _own_config(f.metadata() or {})
    if config is None:
        raise ValueError(f"{path} records no sigma_config: not a checkpoint written by weights.save_checkpoint")
    return config


def _own_config(metadata):  # what save_checkpoint writes into a file's metadata; None in any other file
    return sigma.SigmaConfig(**json.loads(metadata["sigma_config"])) if "sigma_config" in metadata else None


def read_diffusers(folder):
    """A diffusers transformer folder (or the pipeline folder above it) -> (state dict in diffusers' names, config.json
    as a dict or None); the weights in one safetensors file or in shards listed by its index."""
    if os.path.isdir(os.path.join(folder, "transformer")):
        folder = os.path.join(folder, "transformer")
    index, single = (os.path.join(folder, f"diffusion_pytorch_model.safetensors{s}") for s in (".index.json", ""))
    files = shard_files(index) if os.path.isfile(index) else [single]
    if not os.path.isfile(files[0]):
        raise FileNotFoundError(f"{single} is missing: a diffusers transformer folder needs config.json and "
                                "diffusion_pytorch_model.safetensors")
    sd = {k: v for file in files for k, v in read_safetensors(file)[0].items()}
    config = os.path.join(folder, "config.json")
    return sd, (_read_json(config) if os.path.isfile(config) else None)


def drop_micro_conditions(sd):
    """PixArt-α 1024-MS also conditions on the image size and aspect ratio (two small embedders); PixArt-Σ does not
    (paper §3), so their tensors, in the official names or diffusers', are dropped, with a note."""
    micro = {k for k in sd if k.startswith(("csize_embedder.", "ar_embedder.")) or ".resolution_embedder." in k
             or ".aspect_ratio_embedder." in k}
    if micro:
        print(f"weights: ignoring {len(micro)} PixArt-α micro-condition tensors (size/aspect embedders)", file=sys.stderr)
    return {k: v for k, v in sd.items() if k not in micro}


def read_state_dict(src):
    """Any DiT checkpoint (a path of one of the layouts above, or a state dict) -> (state dict in OUR names, the
    config it records or None)."""
    config = None
    if isinstance(src, dict):
        sd = src.get("state_dict", src)
    elif not os.path.exists(src):
        raise FileNotFoundError(f"no checkpoint at {src}: pass an official .pth, a diffusers transformer folder, "
                                f"or a .safetensors written by weights.save_checkpoint")
    elif os.path.isdir(src):
        sd, d = read_diffusers(src)
        config = d and config_from_diffusers(d)
    elif os.fspath(src).endswith(".safetensors"):
        sd, meta = read_safetensors(src)
        beside = os.path.join(os.path.dirname(src), "config.json")  # one file of a diffusers folder
        config = _own_config(meta) or (config_from_diffusers(_read_json(beside)) if os.path.isfile(beside) else None)
    else:
        sd = read_torch(src)
    # DDP saves 'module.x', torch.compile '_orig_mod.x', and train.py's compile(DDP(model)) '_orig_mod.module.x'
    sd = {re.sub(r"^((module|_orig_mod)\.)+", "", k): v for k, v in sd.items()}
    if any(k.startswith(("base_model.csize_embedder.", "base_model.ar_embedder.")) for k in sd):
        raise ValueError(f"{src if not isinstance(src, dict) else 'this state dict'} is PixArt-α's 1024 ControlNet "
                         "(ControlPixArtMSHalf): its copies were trained with α's image-size and aspect-ratio "
                         "embeddings added to t, which sigma's models do not have; use α's 512 ControlNet or one of ours")
    if any(k.startswith("transformer_blocks.") for k in sd):
        sd = sigma.convert_diffusers(sd)
    return drop_micro_conditions(sd), config


def _fill_in(sd, expected, config):
    """What a checkpoint may lack and the model can start without -> (sd, the blocks to which KV compression is added):
    KV-compression layers added to a plain model (load_checkpoint gives them the paper's averaging init,
    SelfAttention.average_init; ~100 fine-tuning steps recover the loss), and the null caption, which diffusers files
    do not store."""
    added = sorted({int(k.split(".")[1]) for k in expected if k not in sd and (".attn.sr." in k or ".attn.norm." in k)})
    new = dict(device=sd["x_embedder.proj.weight"].device)  # beside the checkpoint's tensors (a GPU state dict too)
    if added:
        r = config.kv_compress_ratio
        print(f"weights: KV compression added to blocks {added}: conv initialised to {r}×{r} averaging, norm to 1/0 "
              f"(paper §3.2: fine-tune ~100 steps to recover)", file=sys.stderr)
    if "y_embedder.y_embedding" not in sd:
        sd["y_embedder.y_embedding"] = torch.zeros(config.caption_tokens, config.caption_channels, **new)
        print("weights: note: diffusers' format keeps no null-caption embedding (y_embedding); zeros are put in its "
              "place, which is fine: sampling never reads it (T5 encodes the negative prompt) and train.py fills it "
              "with T5(\"\")", file=sys.stderr)
    return sd, added


def load_checkpoint(src, config=None):
    """Official .pth / diffusers folder or .safetensors / our .safetensors (or a state dict) -> PixArtSigma (fp32, CPU, eval).

    `config` overrides what the checkpoint says: e.g. `replace(sigma.CONFIGS["2K"], kv_compress_layers=sigma.KV_DEEP_HALF)`
    adds KV compression to a plain checkpoint, with the paper's averaging init for the new conv and norm.
    """
    sd, found = read_state_dict(src)
    if "base_model.x_embedder.proj.weight" in sd:  # the official ControlNet file: the base and the copies in one
        base = {k.removeprefix("base_model."): v for k, v in sd.items() if k.startswith("base_model.")}
        return load_controlnet({k: v for k, v in sd.items() if not k.startswith("base_model.")},
                               load_checkpoint(base, config or found))
    if "x_embedder.proj.weight" not in sd:
        raise ValueError(f"{'state dict' if isinstance(src, dict) else src} is not a PixArt checkpoint "
                         f"(no x_embedder.proj.weight / pos_embed.proj.weight); first keys: {list(sd)[:5]}")
    config = config or found or config_from_official(sd)
    sd.pop("pos_embed", None)  # a buffer of the training grid; the model recomputes the table for every grid
    with torch.device("meta"):  # no memory, no init work: every tensor comes from the checkpoint
        model = sigma.PixArtSigma(config)
    expected = model.state_dict()
    sd, added = _fill_in(sd, expected, config)
    kv_new = {f"blocks.{i}.attn.{m}.{p}" for i in added for m in ("sr", "norm") for p in ("weight", "bias")}
    check_keys(sd, {k: v for k, v in expected.items() if k not in kv_new}, "state dict" if isinstance(src, dict) else
               os.fspath(src), f"the model config (depth {config.depth}, width {config.hidden_size}, KV layers "
               f"{list(config.kv_compress_layers)})")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, assign=True, strict=not added)
    for i in added:  # the KV compression the checkpoint lacks: made real beside its tensors, the paper's averaging init
        attn = model.blocks[i].attn
        attn.sr.to_empty(device=sd["x_embedder.proj.weight"].device)
        attn.norm.to_empty(device=sd["x_embedder.proj.weight"].device)
        attn.average_init()
    return model.eval()


def load_controlnet(src, base):
    """A ControlNet's copies -> controlnet.ControlPixArt on the PixArtSigma `base` (fp32, eval). src: our .safetensors
    (save_controlnet), diffusers' research adapter (a folder with diffusion_pytorch_model.safetensors, or that file),
    a train.py run or step folder with controlnet.safetensors, or a state dict; an official ControlNet .pth loads
    whole through load_checkpoint."""
    if not isinstance(src, dict) and os.path.isdir(src) and os.path.isfile(
            os.path.join(step := latest_checkpoint(src) or src, "controlnet.safetensors")):
        src = os.path.join(step, "controlnet.safetensors")  # a train.py ControlNet run or one of its steps
    sd = read_state_dict(src)[0]
    if any(k.startswith("controlnet_blocks.") for k in sd):
        sd = controlnet.convert_diffusers(sd)
    copies = len({k.split(".")[1] for k in sd if k.startswith("controlnet.")})
    name = "state dict" if isinstance(src, dict) else os.fspath(src)
    if not copies:
        raise ValueError(f"{name} holds no ControlNet (no controlnet.* or controlnet_blocks.* keys); first keys: {list(sd)[:3]}")
    with torch.device("meta"):  # no memory, no init work: every copy comes from the file
        model = controlnet.ControlPixArt(sigma.PixArtSigma(base.config), copies)
    expected = model.controlnet.state_dict()
    sd = {k.removeprefix("controlnet."): v for k, v in sd.items()}
    check_keys(sd, expected, name, f"a ControlNet of {copies} copies on the base model (depth {base.config.depth}, "
               f"width {base.config.hidden_size}, KV layers {list(base.config.kv_compress_layers)})")
    model.controlnet.load_state_dict({k: v.float() for k, v in sd.items()}, assign=True)
    model.base_model = base.requires_grad_(False)
    return model.eval()


def save_controlnet(model, path):
    """Our ControlNet file: the copies alone (official names, `controlnet.*`) in one .safetensors; the base is separate."""
    model = getattr(model, "_orig_mod", model)
    _save_safetensors({f"controlnet.{k}": v for k, v in model.controlnet.state_dict().items()}, path,
                      {"format": "pt", "controlnet_copies": str(len(model.controlnet))})


def save_controlnet_diffusers(model, folder):
    """The copies in diffusers' research layout (PixArtControlNetAdapterModel): config.json + safetensors."""
    model = getattr(model, "_orig_mod", model)
    sd, copies = {f"controlnet.{k}": v for k, v in model.controlnet.state_dict().items()}, len(model.controlnet)
    if model.config.kv_compress_layers and any(i < copies for i in model.config.kv_compress_layers):
        raise ValueError("diffusers' adapter has no KV compression, and this ControlNet copies compressed blocks")
    theirs = {n: t for ours, names in controlnet.diffusers_pairs(copies) for n, t in zip(names, sd[ours].chunk(len(names)))}
    os.makedirs(folder, exist_ok=True)
    with atomic(os.path.join(folder, "config.json")) as tmp, open(tmp, "w") as f:
        json.dump({"_class_name": "PixArtControlNetAdapterModel", "num_layers": copies}, f, indent=2)
    _save_safetensors(theirs, os.path.join(folder, "diffusion_pytorch_model.safetensors"), {"format": "pt"})


def _save_safetensors(tensors, path, metadata):
    with atomic(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def save_checkpoint(model, path):
    """Our format: one .safetensors with the config in its metadata, so loading needs no flags."""
    model = getattr(model, "_orig_mod", model)  # never save torch.compile's wrapper names
    _save_safetensors(model.state_dict(), path, {"sigma_config": json.dumps(dataclasses.asdict(model.config))})


def save_diffusers(model, folder):
    """Write config.json + diffusion_pytorch_model.safetensors loadable by PixArtTransformer2DModel.from_pretrained."""
    model = getattr(model, "_orig_mod", model)
    c, sd = model.config, model.state_dict()
    if c.kv_compress_layers and c.kv_compress_mode == "conv":
        raise ValueError("diffusers' PixArtTransformer2DModel has no KV compression, so a model with learned "
                         "compression layers cannot be written in its format: use weights.save_checkpoint")
    if c.kv_compress_layers:
        print(f"weights: diffusers runs without KV compression; the '{c.kv_compress_mode}' mode is not saved", file=sys.stderr)
    # sigma.convert_diffusers backwards: a fused tensor is split into diffusers' parts; the null caption is not saved
    theirs = {n: t for ours, names in sigma.diffusers_pairs(c.depth) for n, t in zip(names, sd[ours].chunk(len(names)))}
    os.makedirs(folder, exist_ok=True)
    with atomic(os.path.join(folder, "config.json")) as tmp, open(tmp, "w") as f:
        json.dump(diffusers_config(c), f, indent=2)
    _save_safetensors(theirs, os.path.join(folder, "diffusion_pytorch_model.safetensors"), {"format": "pt"})


# ---------------------------------------------------------------------------------------------- T5
def read_t5_config(folder):
    """T5Config from config.json beside the weights (transformers' field names); XXL when there is none."""
    file = os.path.join(folder, "config.json")
    if not os.path.isfile(file):
        return t5.T5Config()
    cfg = _read_json(file)
    if cfg.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
        raise ValueError(f"{file}: feed_forward_proj={cfg['feed_forward_proj']!r}; only T5 v1.1's 'gated-gelu' "
                         "encoder is implemented (PixArt uses t5-v1_1-xxl)")
    return t5.T5Config(**{f.name: cfg[f.name] for f in dataclasses.fields(t5.T5Config) if f.name in cfg})


def _t5_files(path):
    """-> (folder of config.json, weight files) for a .safetensors file or a text_encoder/ folder holding
    model.safetensors.index.json + shards (the released layout) or model.safetensors."""
    index, single = os.path.join(path, "model.safetensors.index.json"), os.path.join(path, "model.safetensors")
    if os.path.isfile(path):
        return os.path.dirname(path), [path]
    if os.path.isfile(index):
        return path, shard_files(index)
    if os.path.isfile(single):
        return path, [single]
    raise FileNotFoundError(f"{path}: expected a .safetensors file or a folder with model.safetensors.index.json "
                            "+ shards or model.safetensors (the text_encoder/ folder of the released pipeline)")


def load_t5(path, dtype=torch.bfloat16, device="cpu"):
    """Load the released fp32 T5 encoder into `dtype` on `device`, tensor by tensor.

    The model is built on the meta device and allocated once, directly in the target dtype; each tensor is then
    read from its shard and converted as it is copied in, in file order. Peak host memory is about the model plus
    one fp32 tensor (the 0.5 GB embedding): ~10 GB for T5-XXL in bf16, whose files are 19 GB."""
    if dtype == torch.float16:  # transformers keeps wo in fp32 and clamps; bf16 has fp32's range instead
        raise ValueError("T5 v1.1 activations overflow float16 (> 65504); load it in torch.bfloat16 or torch.float32")
    folder, files = _t5_files(path)
    config = read_t5_config(folder)
    shapes = {}  # file key -> (file, shape), from the headers alone, in file order
    for file in files:
        with safe_open(file, framework="pt") as f:
            shapes.update({k: (file, tuple(f.get_slice(k).get_shape())) for k in f.offset_keys()})
    source = {k: k for k in shapes if not k.startswith(("decoder.", "lm_head."))}  # model key -> file key; a whole T5: its encoder
    alias = source.pop("encoder.embed_tokens.weight", None)  # transformers' second name of shared.weight
    if alias and "shared.weight" not in source:
        source["shared.weight"] = alias
    with torch.device("meta"):
        model = t5.T5Encoder(config).to(dtype)
    model = model.to_empty(device=device).eval().requires_grad_(False)
    expected = model.state_dict()
    check_keys({k: shapes[s][1] for k, s in source.items()}, expected, path, f"T5Encoder({config})",
               "(is this a T5 v1.1 encoder, and is config.json beside it the right one?)")
    target = {s: expected[k] for k, s in source.items()}  # file key -> the model's tensor
    for k, (file, _) in shapes.items():  # file order: one pass through each file
        if k in target:
            # opened per tensor: safetensors maps the file, and every page a read touched counts as this process's
            # memory until the map closes; one map per shard would add a whole shard (~10 GB for T5-XXL) to the peak
            with safe_open(file, framework="pt") as f:
                target[k].copy_(f.get_tensor(k))  # converts the dtype
    return model


# ---------------------------------------------------------------------------------------------- the VAE
VAE_WEIGHTS = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
               "diffusion_pytorch_model.bin"]  # looked for in this order in a folder


def read_vae_config(path):
    """diffusers' config.json -> VAEConfig (same field names), refusing options vae.py does not implement."""
    raw = _read_json(path)
    for key, ok in [("act_fn", "silu"), ("use_quant_conv", True), ("use_post_quant_conv", True),
                    ("mid_block_add_attention", True), ("shift_factor", None), ("latents_mean", None)]:
        if raw.get(key, ok) != ok:
            raise ValueError(f"{path}: {key}={raw[key]!r} is not supported (only {key}={ok!r})")
    known = {f.name for f in dataclasses.fields(vaelib.VAEConfig)} - {"tile_latent", "tile_overlap", "tile_above"}
    return vaelib.VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in known})


def find_vae(path, config=None):
    """A diffusers vae/ folder (or the pipeline folder above it), one weights file of it, or a single-file LDM VAE
    -> (its weights file, its VAEConfig: config.json beside the weights, else `config`, else SDXL's). Reads no weights:
    callers learn the latent space (`config.factor`, pixels per latent) before anything loads."""
    path = os.path.join(path, "vae") if os.path.isdir(os.path.join(path, "vae")) else path
    file = next((os.path.join(path, f) for f in VAE_WEIGHTS if os.path.isfile(os.path.join(path, f))), None) \
        if os.path.isdir(path) else path
    if file is None or not os.path.isfile(file):
        raise FileNotFoundError(f"no VAE weights at {path}: give a diffusers vae/ folder (with one of {VAE_WEIGHTS}) "
                                "or a .safetensors file")
    beside = os.path.join(os.path.dirname(file), "config.json")
    return file, config or (read_vae_config(beside) if os.path.isfile(beside) else vaelib.SDXL)


def vae_factor(path):
    """Pixels per latent per side of the VAE at `path`, from its config (no weights read); None: the released
    components' SDXL VAE, not fetched yet (8)."""
    return (find_vae(path)[1] if path else vaelib.SDXL).factor


def load_vae(path, dtype=torch.float32, device="cpu", config=None):
    """The VAE at `path` (find_vae: a diffusers folder or file, a single-file LDM VAE). config: from config.json beside
    the weights, else SDXL (SD 1.x single files: pass config=vae.SD). Returns the frozen model in eval mode;
    channels_last on CPU (faster there)."""
    file, config = find_vae(path, config)
    sd = read_safetensors(file)[0] if file.endswith(".safetensors") else read_torch(file)
    if any(re.match(r"(first_stage_model\.|vae\.)?encoder\.down\.", k) for k in sd):
        sd = vaelib.convert_ldm(sd)
    elif any(k.endswith(".query.weight") for k in sd):
        sd = vaelib.convert_old_attention(sd)
    model = vaelib.AutoencoderKL(config)
    check_keys(sd, model.state_dict(), file, config)
    model.load_state_dict(sd)
    if dtype == torch.float16 and config.force_upcast:
        warnings.warn("this VAE (force_upcast, e.g. SDXL's) overflows in float16; loading it in float32 instead "
                      "(bfloat16 works too). encode/decode return the dtype of their input.")
        dtype = torch.float32
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    # oneDNN convolutions skip layout reorders in channels_last: measured ~12% less CPU time (benchmark.py vae)
    return model.to(memory_format=torch.channels_last) if model.quant_conv.weight.is_cpu else model
