"""LoRA for the PixArt-Σ DiT (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685).

Full fine-tuning learns a change ΔW of every weight. LoRA freezes W and learns ΔW as a product of rank r:
    W x  ->  W x + (α/r) · B A x,        A (r, in), B (out, r), r ≪ min(in, out)
A starts random and B at zero, so step 0 is exactly the base model (paper §4.1). Only A and B train and are
saved: rank 16 on the attention and MLP Linears of XL/2 is 13.4M numbers (54 MB in fp32), not 611M (2.4 GB).
sample.py merges W += scale · (α/r) · B A once, so a LoRA costs nothing per sampling step, and several add.

Fused projections. Our self-attention computes q, k, v with ONE Linear `attn.qkv` (3D, D); diffusers, and so
PEFT, which adapts diffusers' modules, has three: to_q, to_k, to_v. Three adapters are one adapter of the fused
Linear with the A's stacked and the B's on a block diagonal — the same function, no approximation:
    [B_q A_q x; B_k A_k x; B_v A_v x] = diag(B_q, B_k, B_v) · [A_q; A_k; A_v] x
so `attn.qkv` holds A (3r, D) and B as its 3 diagonal blocks (3, D, r); `cross_attn.kv_linear` likewise with 2.
`to_peft` and `convert_peft` are the two pure conversions, as sigma.convert_diffusers is for checkpoints.

Files are PEFT's for diffusers' PixArtTransformer2DModel: adapter_config.json + adapter_model.safetensors, keys
`base_model.model.transformer_blocks.N.attn1.to_q.lora_A.weight`, so `PeftModel.from_pretrained(transformer,
folder)` loads what train.py writes; diffusers' `pytorch_lora_weights.safetensors` ('transformer.' keys) reads too.

    python train.py --init 1024 --data my_images/ --lora-rank 16 --out runs/mylora    # step_N/: the adapter
    python sample.py --model runs/mylora "a prompt"                # the base model it was trained on + the adapter
    python sample.py --lora runs/mylora:0.8 --lora other_lora/ "a prompt"
"""
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

import hub
import sigma
import weights

# --lora-targets. 'blocks' (default): every block's attention and MLP Linears. 'all' adds what else the official
# LoRA script (PixArt-sigma train_scripts/train_pixart_lora_hf.py) adapts in diffusers' model: the patch-embedding
# conv (`proj`), adaLN-single (`linear`), the timestep and caption MLPs (`linear_1/2`) and the output (`proj_out`).
BLOCK_TARGETS = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
                 "mlp.fc1", "mlp.fc2")
OTHER_TARGETS = ("x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "t_block.1", "y_embedder.y_proj.fc1",
                 "y_embedder.y_proj.fc2", "final_layer.linear")
# train.py's defaults under --lora-rank (flags given still win). AdamW at 1e-4, as diffusers' LoRA example scripts:
# Adam moves each entry of the zero-initialised B by ~lr per step whatever the gradient's size, and the full
# recipe's 2e-5 × √(batch/256) (3.5e-6 at batch 8), sized for nudging pretrained weights, would leave B near zero
# for thousands of steps. Gradient clip 1.0 as the official LoRA script; no EMA (not supported with LoRA).
TRAIN_DEFAULTS = dict(optimizer="adamw", lr=1e-4, lr_scaling=False, clip=1.0, warmup=100, ema=0.0)
PREFIXES = ("base_model.model.", "transformer.", "unet.")  # PEFT's, diffusers' pipeline-level, the official script's


class LoRA(nn.Module):
    """base(x) + (α/r)·B·A·x around a frozen nn.Linear (or the patch-embedding nn.Conv2d). A fused projection
    (parts > 1) gets one adapter per part: A (parts·r, in) stacked, B (parts, out/parts, r) the diagonal blocks."""

    def __init__(self, base, rank, alpha, parts=1):
        super().__init__()
        self.base, self.parts, self.scale = base, parts, alpha / rank
        w = base.weight
        # A Gaussian (std 1/r: PEFT's "gaussian" init, which the official LoRA script uses), B zero: ΔW = 0 at step 0
        self.lora_A = nn.Parameter(torch.randn(parts * rank, *w.shape[1:], device=w.device) / rank)  # (P·r, in[, p, p])
        self.lora_B = nn.Parameter(torch.zeros(parts, w.shape[0] // parts, rank, device=w.device))  # (P, out/P, r)

    @property
    def weight(self):  # the frozen base weight: sigma.py reads the model's dtype from the patch conv's
        return self.base.weight

    def forward(self, x):
        if isinstance(self.base, nn.Conv2d):  # A: a conv with the base's kernel and stride; B: a 1×1 conv (as PEFT)
            h = F.conv2d(x, self.lora_A, stride=self.base.stride, padding=self.base.padding)  # (N, r, h, w)
            return self.base(x) + self.scale * F.conv2d(h, self.lora_B[0, :, :, None, None])  # (N, out, h, w)
        B = torch.block_diag(*self.lora_B)  # (out, P·r), zero off the diagonal: each part reads its own r rows of A x
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_A), B)  # (..., P·r) -> (..., out)


def delta_weight(A, B):
    """B·A in the base weight's shape: (out, in), or (out, C, p, p) for the conv; block-diagonal B for fused layers."""
    if A.dim() == 4:
        return (B[0] @ A.flatten(1)).view(B.shape[1], *A.shape[1:])
    return torch.block_diag(*B) @ A  # (out, P·r) @ (P·r, in)


def _layers(depth):
    """(our module, its diffusers modules: one, or the parts of a fused one) for every Linear and the patch conv."""
    return [(a[:-7], tuple(n[:-7] for n in b)) for a, b in sigma.diffusers_pairs(depth) if a.endswith(".weight")]


def _depth(names, prefix):
    return 1 + max((int(k[len(prefix):].split(".")[0]) for k in names if k.startswith(prefix)), default=-1)


def target_modules(targets, depth):
    """--lora-targets ('blocks', 'all' or a comma list such as 'attn.qkv,mlp.fc1') -> our module names."""
    names = {"blocks": BLOCK_TARGETS, "all": BLOCK_TARGETS + OTHER_TARGETS}.get(targets)
    names = names or tuple(t.strip() for t in targets.split(",") if t.strip())
    if not names or any(n not in BLOCK_TARGETS + OTHER_TARGETS for n in names):
        raise ValueError(f"--lora-targets {targets!r}: give 'blocks', 'all' or a comma list of layers from "
                         f"{', '.join(BLOCK_TARGETS + OTHER_TARGETS)}")
    return [f"blocks.{i}.{n}" for i in range(depth) for n in names if n in BLOCK_TARGETS] + \
           [n for n in names if n in OTHER_TARGETS]


def check_train_args(args):
    """train.py's LoRA flags, checked before anything loads."""
    if not args.lora_rank:
        if args.lora_alpha is not None or args.lora_targets != "blocks":
            raise ValueError("--lora-alpha and --lora-targets shape a LoRA: add --lora-rank R (or leave them out)")
        return
    target_modules(args.lora_targets, 1)
    problem = ("must be a positive integer" if args.lora_rank < 0 else
               "adapts a trained model: give --init (a released name, a checkpoint or a run)" if args.init == "scratch" else
               "cannot train new KV-compression layers (they are frozen): leave out --kv-compress-layers, or fine-tune "
               "fully" if args.kv_compress_layers else
               f"keeps no EMA (it would copy the frozen model too): drop --ema {args.ema}" if args.ema else None)
    if problem:
        raise ValueError(f"--lora-rank {args.lora_rank} {problem}")


def base_name(init):
    """What the adapter records as its base (adapter_config.json's base_model_name_or_path): the Hub repo of a
    released name, else the absolute path of the checkpoint (a run folder: its latest checkpoint file)."""
    name = None if os.path.exists(init) else hub.model_name(init)
    return hub.MODELS[name][0] if name else os.path.abspath(hub.resolve_model(init)[0])


def add(model, rank, alpha, targets="blocks", base=None):
    """Freeze `model` and wrap its target layers in LoRA adapters, in place (train.py --lora-rank)."""
    parts = {a: len(b) for a, b in _layers(model.config.depth)}
    model.requires_grad_(False)
    for name in target_modules(targets, model.config.depth):
        owner, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner)
        setattr(owner, leaf, LoRA(getattr(owner, leaf), rank, alpha, parts[name]))
    model.lora_config = dict(r=rank, lora_alpha=alpha, base=base)  # what lora.save writes beside the weights
    return model


def adapters(model):
    """Our adapter state dict: '<module>.lora_A' (P·r, in[, p, p]) and '<module>.lora_B' (P, out/P, r)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


# ---------------------------------------------------------------------------------------------- conversions
def to_peft(ours):
    """Our adapters -> PEFT's state dict for diffusers' PixArtTransformer2DModel (pure): a fused A is split
    into its row blocks, a fused B into its diagonal blocks; the conv's B becomes a 1×1 kernel."""
    out = {}
    for mine, theirs in _layers(_depth(ours, "blocks.")):
        if f"{mine}.lora_A" not in ours:
            continue
        A, B = ours[f"{mine}.lora_A"], ours[f"{mine}.lora_B"]  # (P·r, in[, p, p]), (P, out/P, r)
        for name, a, b in zip(theirs, A.chunk(len(theirs)), B):
            out[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()  # (r, in[, p, p])
            out[f"base_model.model.{name}.lora_B.weight"] = b if A.dim() == 2 else b[..., None, None]  # (out, r[, 1, 1])
    return out


def layer_scale(config, module, rank):
    """PEFT's scaling of one layer: lora_alpha / r (/ √r with rsLoRA), alpha_pattern's value where a pattern
    matches the module as PEFT matches it; without a config diffusers' convention W + B·A, i.e. 1."""
    if not config:
        return 1.0
    alpha = next((v for k, v in (config.get("alpha_pattern") or {}).items() if re.match(rf"(.*\.)?({k})$", module)),
                 config.get("lora_alpha", 8))  # PEFT's default
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def convert_peft(sd, config=None):
    """PEFT / diffusers LoRA state dict (+ adapter_config.json as a dict) -> (ours, α/r) (pure; unknown keys
    pass through). Exact in every case: parts of a fused layer with a smaller rank, or none, are padded with
    zeros; a layer scaled unlike the config's α/r (rank_pattern, alpha_pattern) has the ratio folded into B."""
    sd = {strip(k): v for k, v in sd.items()}
    scale = layer_scale(config, "", (config or {}).get("r", 8))  # the config's α/r (PEFT's default r: 8)
    ours = {}
    for mine, theirs in _layers(_depth(sd, "transformer_blocks.")):
        found = [n for n in theirs if f"{n}.lora_A.weight" in sd and f"{n}.lora_B.weight" in sd]
        if not found:
            continue
        R = max(sd[f"{n}.lora_A.weight"].shape[0] for n in found)
        A0, B0 = sd[f"{found[0]}.lora_A.weight"], sd[f"{found[0]}.lora_B.weight"]
        dtype = torch.promote_types(A0.dtype, torch.float32)  # half-precision files are merged in fp32
        As, Bs = [], []
        for n in theirs:
            a, b = A0.new_zeros(R, *A0.shape[1:], dtype=dtype), A0.new_zeros(B0.shape[0], R, dtype=dtype)  # absent: ΔW = 0
            if n in found:
                a_n, b_n = sd.pop(f"{n}.lora_A.weight").to(dtype), sd.pop(f"{n}.lora_B.weight").to(dtype).flatten(1)
                a[:len(a_n)], b[:, :b_n.shape[1]] = a_n, b_n * (layer_scale(config, n, len(a_n)) / scale)
            As.append(a)
            Bs.append(b)
        ours[f"{mine}.lora_A"], ours[f"{mine}.lora_B"] = torch.cat(As), torch.stack(Bs)  # (P·R, in[, p, p]), (P, out, R)
    return {**ours, **sd}, scale


def strip(key):
    while key.startswith(PREFIXES):
        key = key[len(next(p for p in PREFIXES if key.startswith(p))):]
    return key


def check(sd, model, what):
    """Each tensor of a LoRA must adapt a layer of `model` with fitting shapes; else ONE error line naming the
    first bad keys (in the file's own names)."""
    shapes = {}
    for mine, theirs in _layers(model.config.depth):
        w = model.get_submodule(mine).weight
        for n in theirs:
            shapes[n] = (w.shape[0] // len(theirs), *w.shape[1:])
    bad = []
    for key, v in sd.items():
        module, _, kind = strip(key).rpartition(".lora_")
        A, B = sd.get(key.replace(".lora_B.", ".lora_A.")), sd.get(key.replace(".lora_A.", ".lora_B."))
        if kind not in ("A.weight", "B.weight"):
            bad.append(f"{key} (not a LoRA A/B weight: DoRA, biases and modules_to_save are not supported)")
        elif module not in shapes:
            bad.append(f"{key} (no such layer in this model)")
        elif A is None or B is None:
            bad.append(f"{key} (its lora_{'B' if kind[0] == 'A' else 'A'} is missing)")
        elif (tuple(A.shape[1:]) != shapes[module][1:] or B.shape[0] != shapes[module][0] or B.shape[1] != A.shape[0]
              or any(s != 1 for s in B.shape[2:])):
            bad.append(f"{key} {tuple(v.shape)} (layer weight {shapes[module]})")
    if bad:
        c = model.config
        raise ValueError(f"{what}: {len(bad)} of its {len(sd)} tensors do not fit the model (depth {c.depth}, width "
                         f"{c.hidden_size}): {'; '.join(bad[:3])}{' …' if len(bad) > 3 else ''}")


# ---------------------------------------------------------------------------------------------- files
def _files(path):
    """A LoRA path -> (its .safetensors, its adapter_config.json or None)."""
    if os.path.isdir(path) and (latest := weights.latest_checkpoint(path)):  # a train.py run: its latest step
        path = latest
    if os.path.isdir(path):
        for name in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"--lora {path}: no adapter_model.safetensors (PEFT) or pytorch_lora_weights."
                                    "safetensors (diffusers) in this folder")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--lora {path}: no such file or folder (give a PEFT adapter folder, a .safetensors "
                                "or a train.py --lora-rank run)")
    beside = os.path.join(os.path.dirname(path), "adapter_config.json")
    return path, (beside if os.path.basename(path) == "adapter_model.safetensors" and os.path.isfile(beside) else None)


def read(spec):
    """'PATH[:SCALE]' -> dict(path, scale, sd, config, base): the tensors and settings, applied by `merge`."""
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and not os.path.exists(spec) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", tail):
        path, scale = head, float(tail)
    file, config_file = _files(path)
    sd, meta = weights.read_safetensors(file)
    if config_file:
        config = json.load(open(config_file))
    elif "lora_adapter_metadata" in meta:  # diffusers' save_lora_weights: the LoraConfig, keys 'transformer.r' ...
        config = {strip(k): v for k, v in json.loads(meta["lora_adapter_metadata"]).items()}
    else:
        config = None
    if config and (config.get("peft_type", "LORA") != "LORA" or config.get("use_dora")):
        raise ValueError(f"--lora {path}: a {'DoRA' if config.get('use_dora') else config.get('peft_type')} adapter; "
                         "only plain LoRA is supported")
    return dict(path=path, scale=scale, sd=sd, config=config, base=(config or {}).get("base_model_name_or_path"))


@torch.no_grad()
def merge(model, loras):
    """W += scale · (α/r) · B·A for each LoRA read by `read` (sample.py --lora): full speed, and several add."""
    for lo in loras:
        check(lo["sd"], model, f"--lora {lo['path']}")
        ours, s = convert_peft(lo["sd"], lo["config"])
        for name in sorted({k.rpartition(".")[0] for k in ours}):
            w = model.get_submodule(name).weight
            w += (lo["scale"] * s * delta_weight(ours[f"{name}.lora_A"], ours[f"{name}.lora_B"])).to(w)
    return model


def split_model(model, loras):
    """sample.py --model: a train.py LoRA run (or a PEFT adapter folder that records its base) -> (the base
    model, [that adapter at scale 1] + loras); anything else unchanged."""
    if not os.path.isdir(model) or not _files_or_none(model):
        return model, loras
    lo = read(model)
    if not lo["base"]:
        raise ValueError(f"--model {model} is a LoRA that records no base model: give --model BASE --lora {model}")
    return next((n for n, (repo, _) in hub.MODELS.items() if repo == lo["base"]), lo["base"]), [lo] + loras


def _files_or_none(path):
    try:
        return _files(path)[1]  # a LoRA folder with its adapter_config.json
    except FileNotFoundError:
        return None


def describe(loras):
    """For the PNG's parameters chunk."""
    return "".join(f", LoRA: {lo['path']}:{lo['scale']:g}" for lo in loras)


def save(model, folder):
    """folder/adapter_model.safetensors + adapter_config.json, as PEFT's save_pretrained writes them."""
    from safetensors.torch import save_file
    c, sd = model.lora_config, to_peft(adapters(model))
    modules = sorted({re.sub(r"^transformer_blocks\.\d+\.", "", k[len("base_model.model."):].rpartition(".lora_")[0])
                      for k in sd})  # PEFT matches a target by name suffix: 'attn1.to_q' = that layer of every block
    config = dict(peft_type="LORA", base_model_name_or_path=c["base"], r=c["r"], lora_alpha=c["lora_alpha"],
                  target_modules=modules, lora_dropout=0.0, bias="none", use_rslora=False, use_dora=False,
                  init_lora_weights="gaussian", fan_in_fan_out=False, modules_to_save=None, rank_pattern={},
                  alpha_pattern={}, inference_mode=True, task_type=None,
                  auto_mapping=dict(base_model_class="PixArtTransformer2DModel",
                                    parent_library="diffusers.models.transformers.pixart_transformer_2d"))
    save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, os.path.join(folder, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def load(model, folder):
    """train.py --resume: the adapter of a checkpoint back into the LoRA layers that `add` made."""
    lo = read(folder)
    check(lo["sd"], model, f"resume: {folder}")
    ours, s = convert_peft(lo["sd"], lo["config"])
    c, mine = model.lora_config, adapters(model)
    if (lo["base"] != c["base"] or set(ours) != set(mine) or any(ours[k].shape != v.shape for k, v in mine.items())
            or not math.isclose(s, c["lora_alpha"] / c["r"])):
        raise ValueError(f"resume: {folder} was trained with other LoRA settings (base {lo['base']}, layers, rank or "
                         "alpha) than this command line's: resume with the same --init and --lora-* flags")
    model.load_state_dict(ours, strict=False)
