"""Where the released PixArt-Σ weights come from: a released name or a local path → files on disk.

Released names fetch through huggingface_hub into the standard Hugging Face cache
(~/.cache/huggingface/hub, or $HF_HUB_CACHE / $HF_HOME), with its progress bars, and work
offline from that cache (HF_HUB_OFFLINE=1). The cache is shared with diffusers and the
official repository, so weights already there are found and nothing is downloaded again:

    transformer   PixArt-alpha/PixArt-Sigma-XL-2-{256x256,512-MS,1024-MS,2K-MS}  transformer/
                  (diffusers safetensors: no pickle; the official PixArt-alpha/PixArt-Sigma
                  .pth of the same model is used instead when only that one is cached)
    T5, tokenizer PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers  text_encoder/, tokenizer/
    VAE (SDXL)    same repo, vae/  (found in the model's own repo first, where a diffusers
                  pipeline download put them)

A local path is checked by weights.find_checkpoint before anything is fetched. Loading (`load_model`, `load`)
turns a damaged or incomplete file into one ValueError naming the file, and adds KV compression to a plain
checkpoint on request (paper §3.2: parameter-free modes, or the learned conv starting as 2×2 averaging).
"""
import dataclasses
import os
import re

import huggingface_hub
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache

import sigma
import tokenizer
import weights

# released name -> (diffusers repo, official .pth in PixArt-alpha/PixArt-Sigma); the official repo's README lists them
MODELS = {
    "256": ("PixArt-alpha/PixArt-Sigma-XL-2-256x256", "PixArt-Sigma-XL-2-256x256.pth"),
    "512": ("PixArt-alpha/PixArt-Sigma-XL-2-512-MS", "PixArt-Sigma-XL-2-512-MS.pth"),
    "1024": ("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "PixArt-Sigma-XL-2-1024-MS.pth"),
    "2K": ("PixArt-alpha/PixArt-Sigma-XL-2-2K-MS", "PixArt-Sigma-XL-2-2K-MS.pth"),
}
OFFICIAL_REPO = "PixArt-alpha/PixArt-Sigma"
COMPONENTS_REPO = "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"
TRANSFORMER = ["transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"]
T5_INDEX = "text_encoder/model.safetensors.index.json"
OTHER_COMPONENTS = ["text_encoder/config.json", "tokenizer/spiece.model",
                    "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]


def model_name(name):
    """Canonical released name ('2k', '2048' -> '2K') or None when `name` is not one."""
    name = {"2048": "2K", "256x256": "256"}.get(name.upper(), name.upper())
    return name if name in MODELS else None


def fetch(repo, filename, flag):
    """Path of `filename` of Hub `repo` in the cache, downloading it first when allowed. A file not cached yet fails
    fast: at once when offline, and after one short request without network (huggingface_hub itself retries with
    backoff for ~25 s when no cached copy exists)."""
    where = f"{flag}: cannot get {filename} of https://huggingface.co/{repo}"
    fix = f"or pass a local copy with {flag} PATH"
    if not cached(repo, [filename]):
        if huggingface_hub.constants.is_offline_mode():
            raise FileNotFoundError(f"{where}: HF_HUB_OFFLINE is set and it is not in the Hugging Face cache "
                                    f"({huggingface_hub.constants.HF_HUB_CACHE}); unset HF_HUB_OFFLINE to download it, {fix}")
        try:
            get_hf_file_metadata(hf_hub_url(repo, filename), timeout=10, retry_on_errors=False)
        except Exception as e:  # no network, gated, 404
            raise FileNotFoundError(f"{where} ({weights.first_line(e)}); connect to the internet to download it into the "
                                    f"Hugging Face cache (log in first for a gated repo), {fix}") from None
    try:
        return hf_hub_download(repo, filename)
    except Exception as e:  # the download broke off: one clear message instead of a traceback
        raise FileNotFoundError(f"{where} ({weights.first_line(e)}); run the command again to resume, {fix}") from None


def cached(repo, filenames):
    """Paths of all `filenames` if every one is already in the cache, else None (never downloads)."""
    paths = [try_to_load_from_cache(repo, f) for f in filenames]
    return paths if all(isinstance(p, str) for p in paths) else None


def resolve_model(model, flag="--model"):
    """--model (or train.py's --init) -> (local path for weights.load_checkpoint, released name or None, diffusers repo or None)."""
    if os.path.exists(model):
        return weights.find_checkpoint(model, flag), None, None
    name = model_name(model)
    if name is None:
        raise ValueError(f"{flag} {model!r} is neither a released model ({', '.join(MODELS)}) nor an existing "
                         "file or folder (an official .pth, a diffusers transformer folder, our .safetensors or a train.py run)")
    repo, pth = MODELS[name]
    if not cached(repo, TRANSFORMER) and (official := cached(OFFICIAL_REPO, [pth])):
        return official[0], name, repo  # the user has the official .pth already: don't fetch a second copy
    paths = [fetch(repo, f, flag) for f in TRANSFORMER]
    return os.path.dirname(paths[0]), name, repo


def check_components(components, flag="--components"):
    """A local --components folder must hold text_encoder/, tokenizer/ (spiece.model or tokenizer.json) and vae/ -> their paths; a Hub
    repo id (owner/name) -> None, fetched later. Checked before anything is downloaded."""
    if components is None or (not os.path.exists(components) and re.fullmatch(r"[\w.-]+/[\w.-]+", components)
                               and not components.startswith(".")):
        return None
    if not os.path.isdir(components):
        raise ValueError(f"{flag} {components}: no such folder (and not a Hub repo id such as {COMPONENTS_REPO})")
    found = {k: os.path.join(components, k) for k in ("text_encoder", "tokenizer", "vae")}
    for k, p in found.items():
        if not os.path.exists(p):
            raise ValueError(f"{flag} {components}: no {k} at {p} (expected the layout of "
                             f"https://huggingface.co/{COMPONENTS_REPO}: text_encoder/, tokenizer/, vae/)")
    try:  # spiece.model, or tokenizer.json as transformers 5 saves it
        found["tokenizer"] = tokenizer.find(found["tokenizer"])
    except FileNotFoundError as e:
        raise ValueError(f"{flag} {components}: {e}") from None
    return found


def resolve_components(components=None, model_repo=None, model=None):
    """--components (a local folder or a Hub repo) -> dict of local paths: text_encoder, tokenizer, vae. By default
    those of a diffusers pipeline folder `model`, else of the model's repo when cached, else of COMPONENTS_REPO."""
    if components is None and model and os.path.isdir(os.path.join(model, "text_encoder")):
        components = model  # a whole diffusers pipeline folder
    found = check_components(components)
    if found:
        return found
    repo = components or COMPONENTS_REPO
    if components is None and model_repo and cached(model_repo, [T5_INDEX] + OTHER_COMPONENTS):
        repo = model_repo  # a diffusers pipeline download of the model already holds T5 and the VAE
    shards = weights.shard_files(fetch(repo, T5_INDEX, "--components"), check=False)  # not fetched yet
    for name in OTHER_COMPONENTS + [f"text_encoder/{os.path.basename(s)}" for s in shards]:
        path = fetch(repo, name, "--components")
    root = os.path.dirname(os.path.dirname(path))  # the snapshot folder: every file above lies in it
    return dict(text_encoder=os.path.join(root, "text_encoder"),
                tokenizer=os.path.join(root, "tokenizer", "spiece.model"), vae=os.path.join(root, "vae"))


def parse_layers(text, depth=None, flag=None):
    """A list of blocks, as sample.py's --kv-compress and train.py's --kv-compress-layers take it: 'deep' (the deep
    half, paper Tab. 3d), a range '14-27', a list '0,1,20-27' -> sorted block indices. depth None: not known yet,
    only the syntax is checked (and 'deep' gives None). flag: what an error names (default: train.py's flag)."""
    flag = flag or f"--kv-compress-layers {text!r}"
    if text == "deep":
        return depth and sigma.deep_half(depth)
    if not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", text):
        raise ValueError(f"{flag}: give 'deep', a range such as 14-27 or a list such as 0,1,20-27")
    spans = [tuple(map(int, s.split("-"))) for s in text.split(",")]
    layers = tuple(sorted({i for s in spans for i in range(s[0], s[-1] + 1)}))
    if depth and layers[-1] >= depth:
        raise ValueError(f"{flag}: the model has blocks 0-{depth - 1}, not {layers[-1]}")
    return layers


def parse_kv_compress(text, depth=None):
    """'MODE[:LAYERS]' (e.g. 'avgpool', 'conv:14-27', 'uniform:0,1,20-27') -> (mode, layers), LAYERS as parse_layers
    reads them, the deep half when left out (None while the depth is not known)."""
    mode, _, layers = text.partition(":")
    if mode not in ("conv", "uniform", "avgpool"):
        raise ValueError(f"--kv-compress mode must be conv, uniform or avgpool, got {mode!r}")
    return mode, parse_layers(layers or "deep", depth, f"--kv-compress {text}")


def load(what, path, fn, *args, **kwargs):
    """Run a loader; a damaged file becomes a ValueError that says which file and what to do."""
    try:
        return fn(path, *args, **kwargs)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # truncated download, not a checkpoint, bad JSON: no torch traceback for the user
        raise ValueError(f"cannot load the {what} from {path}: {weights.first_line(e)}"
                         " -- the file looks damaged or incomplete; delete it and download it again (in the Hugging Face "
                         "cache: `hf cache verify REPO`, `hf cache rm model/REPO`), or pass a good local copy") from e


def load_model(path, name=None, kv_compress=None):
    """The DiT on the CPU in fp32; a released name fixes the config (.pth files do not say their training size)."""
    config = sigma.CONFIGS[name] if name and path.endswith(".pth") else None  # a diffusers folder has config.json
    model = load("transformer", path, weights.load_checkpoint, config)
    if kv_compress:
        mode, layers = parse_kv_compress(kv_compress, model.config.depth)
        if model.config.kv_compress_layers:
            raise ValueError(f"--kv-compress: {path} already has KV compression ({model.config.kv_compress_mode} in layers "
                             f"{list(model.config.kv_compress_layers)}): leave out --kv-compress")
        config = dataclasses.replace(model.config, kv_compress_mode=mode, kv_compress_layers=layers)
        model = weights.load_checkpoint(model.state_dict(), config)  # parameter-free modes, or a fresh averaging conv
    return model
