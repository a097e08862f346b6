"""Training data for PixArt-Σ: captioned images, aspect-ratio buckets, a DDP bucket sampler, a feature cache.

- Layouts: a folder of images with same-name .txt captions (`cat.jpg` + `cat.txt`), or a .jsonl manifest of
  {"image": path relative to the manifest, "<caption key>": text, ...} with several caption keys to mix
  (the official `real_prompt_ratio`: e.g. 50% original alt-text, 50% long VLM captions).
- Multi-aspect buckets (PixArt-α §2.4; the official tables and the nearest-ratio rule are in sizes.py): an image
  goes to the bucket of nearest ratio, is resized to cover it and center-cropped. A batch never mixes buckets.
- Sampler: every global batch (batch × world size images) comes from one bucket and is cut into disjoint
  per-rank slices, so N ranks with batch B see exactly the images one process with batch N·B would see.
  The order is a pure function of (seed, epoch): resuming at step s just skips s batches, nothing repeats.
- Feature cache: one pass stores VAE latents and T5 features of the valid caption tokens as safetensors
  shards (the official maintainers' advice: training then needs neither T5 nor the VAE in memory).
- ControlNet data (train.py --controlnet): each image has a condition image of the same size, `cat.control.png`
  beside `cat.jpg` in a folder, or a "control" path in the manifest; it is cropped as its image and VAE-encoded
  like it (its latent cached beside the image's).
"""
import hashlib
import json
import os
from collections import defaultdict

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import sizes
import weights

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# ---------------------------------------------------------------------------------------------- images
def resize_cover_crop(img, hw):
    """PIL image -> (3, h, w) float tensor in [-1, 1]: scale so the image covers hw, then center-crop."""
    h, w = hw
    s = max(h / img.height, w / img.width)
    rh, rw = max(h, round(img.height * s)), max(w, round(img.width * s))
    img = img.convert("RGB").resize((rw, rh), Image.BICUBIC)
    top, left = (rh - h) // 2, (rw - w) // 2
    img = img.crop((left, top, left + w, top + h))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, h, w)
    return x.float() / 127.5 - 1


# ---------------------------------------------------------------------------------------------- datasets
def caption_keys(text, manifest=True):
    """--caption-keys 'caption:0.5,vlm_caption:0.5' -> (keys, weights (K,)); a folder (manifest=False) has one caption."""
    parts = [k.partition(":") for k in text.split(",")]
    try:
        weights = [float(w or 1) for _, _, w in parts]
    except ValueError:
        weights = [-1.0]
    if not all(k for k, _, _ in parts) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"--caption-keys {text!r}: give KEY or KEY:WEIGHT,... with weights >= 0, not all 0")
    if len(parts) > 1 and not manifest:
        raise ValueError("--caption-keys: several keys need a .jsonl --data manifest (a folder has one caption per image)")
    return [k for k, _, _ in parts], torch.tensor(weights)


def scan(path, caption_keys=("caption",), control=False):
    """List {image, captions, height, width} records of a folder or .jsonl manifest (control: and the condition image
    of each, see the module's docstring; a missing or mis-sized one is an error naming it).

    Unreadable images, and in a folder images without a caption (no or an empty .txt), are skipped, said and
    counted: returns (records, skipped). No caption at all, or no image, is an error."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data {path} does not exist (a folder of images + .txt captions or a .jsonl)")
    if os.path.isdir(path):
        entries, skipped = folder_entries(path, control)
    else:
        entries, skipped = manifest_entries(path, caption_keys, control), 0
    records = []
    for image, captions, *cond in entries:
        try:
            with Image.open(image) as im:  # reads the header only
                im.verify()
                w, h = im.size
        except Exception as e:  # a corrupt file must not stop a week-long run: count it and go on
            skipped += 1
            print(f"skipping unreadable image {image}: {type(e).__name__}: {e}")
            continue
        records.append(dict(image=image, captions=captions, height=h, width=w))
        if cond:
            records[-1]["control"] = check_control(cond[0], image, (w, h))
    if not records:
        raise ValueError(f"--data {path}: none of its images could be read (see the lines above)")
    return records, skipped


def folder_entries(path, control=False):
    """A folder of images and same-name .txt captions -> ([(image, [caption], (condition image: control only))],
    images skipped for want of a caption, said)."""
    images = [n for n in sorted(os.listdir(path)) if os.path.splitext(n)[1].lower() in IMAGE_EXTS
              and not (control and os.path.splitext(os.path.splitext(n)[0])[1] == ".control")]  # not a condition
    if not images:
        raise ValueError(f"--data {path}: no images ({', '.join(IMAGE_EXTS)}) in this folder (subfolders are not searched)")
    entries, uncaptioned = [], []
    for name in images:
        txt = os.path.join(path, os.path.splitext(name)[0] + ".txt")
        try:
            caption = open(txt, encoding="utf-8").read().strip() if os.path.exists(txt) else ""
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--data: cannot read the caption {txt} ({e}); captions are UTF-8 text files") from None
        if caption:  # the condition beside each image: cat.jpg -> cat.control.png
            image = os.path.join(path, name)
            entries.append((image, [caption]) + ((os.path.splitext(image)[0] + ".control.png",) if control else ()))
        else:
            uncaptioned.append(name)
    if not entries:
        raise ValueError(f"--data {path}: none of its {len(images)} images has a caption; write each one's caption "
                         f"in a same-name .txt file ({images[0]} + {os.path.splitext(images[0])[0]}.txt)")
    if uncaptioned:  # an empty caption would silently train the unconditional model
        print(f"data: skipping {len(uncaptioned)} of {len(images)} images without a caption (no or an empty "
              f"same-name .txt): {', '.join(uncaptioned[:3])}{', ...' if len(uncaptioned) > 3 else ''}")
    return entries, len(uncaptioned)


def manifest_entries(path, caption_keys, control=False):
    """A .jsonl manifest, one {"image": ..., KEY: caption, ...} per line (paths relative to it) -> [(image, [captions],
    (condition image: control only))]."""
    root = os.path.dirname(os.path.abspath(path))
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"--data {path}: not a UTF-8 text file; give a folder of images or a .jsonl manifest") from None
    entries = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise ValueError(f"--data {path} line {n + 1}: not JSON ({e}); a .jsonl manifest has one "
                             '{"image": ..., "caption": ...} object per line') from None
        image = rec.get("image", rec.get("path")) if isinstance(rec, dict) else None
        missing = [k for k in caption_keys if not isinstance(rec, dict) or k not in rec]
        if image is None or missing:
            raise ValueError(f"{path} line {n + 1}: needs 'image' and caption keys {list(caption_keys)}, "
                             f"missing {missing or ['image']}")
        if control and not isinstance(rec.get("control"), str):
            raise ValueError(f"{path} line {n + 1}: a ControlNet needs each image's condition image: add "
                             '"control": "<path relative to the manifest>"')
        entries.append((os.path.join(root, image), [str(rec[k]) for k in caption_keys]) + (
            (os.path.join(root, rec["control"]),) if control else ()))
    return entries


def check_control(path, image, size):
    """A condition image must exist and have its image's size (it is cropped the same way) -> its path."""
    if not os.path.isfile(path):
        raise ValueError(f"--data: {image} has no condition image {path}: a ControlNet trains on pairs (give every "
                         "image its condition: NAME.control.png beside it, or \"control\" in the manifest)")
    try:
        with Image.open(path) as im:
            found = im.size
    except Exception as e:
        raise ValueError(f"--data: cannot read the condition image {path} ({type(e).__name__}: {e})") from None
    if found != size:
        raise ValueError(f"--data: the condition image {path} is {found[0]}x{found[1]} but its image {image} is "
                         f"{size[0]}x{size[1]}: make them the same size (it is cropped as its image)")
    return path


class ImageDataset(torch.utils.data.Dataset):
    """Records -> (image (3,h,w) in [-1,1] at its bucket's size, captions; and control, the condition image, when the
    records have one). Corrupt images give None."""

    def __init__(self, records, table):
        self.records, self.table = records, table
        self.buckets = [sizes.nearest_bucket(r["height"], r["width"], table) for r in records]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        try:
            item = dict(index=i, captions=r["captions"])
            for key in ("image", "control") if "control" in r else ("image",):
                with Image.open(r[key]) as im:
                    item[key] = resize_cover_crop(im, self.table[self.buckets[i]])
        except Exception as e:  # passed the header check, failed to decode: skip it, counted by the loop
            print(f"skipping undecodable image {r[key]}: {type(e).__name__}: {e}")
            return None
        return item


# ---------------------------------------------------------------------------------------------- sampler
def generator(seed, k, device="cpu"):
    """The random stream of draw k (an epoch's order, a micro-batch's noise) of a run seeded `seed`: a pure function of
    (seed, k), the same on every rank and after --resume, so nothing random needs saving."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + k)


class BucketSampler:
    """Per-rank micro-batches: each global batch (batch_size × world) is one bucket, cut into rank slices."""

    def __init__(self, buckets, batch_size, rank=0, world=1, seed=0):
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.by_bucket = defaultdict(list)
        for i, b in enumerate(buckets):
            self.by_bucket[b].append(i)
        G = batch_size * world
        self.length = sum(len(v) // G for v in self.by_bucket.values())  # batches per epoch, fixed
        if self.length == 0:
            raise ValueError(f"no bucket holds a global batch of {G} images (largest has "
                             f"{max(map(len, self.by_bucket.values()))}): lower --batch-size or add images")

    def __len__(self):
        return self.length

    def epoch(self, epoch):
        """This rank's micro-batches of one epoch: a pure function of (seed, epoch)."""
        g = generator(self.seed, epoch)
        G, batches = self.batch_size * self.world, []
        for key in sorted(self.by_bucket):
            items = self.by_bucket[key]
            items = [items[j] for j in torch.randperm(len(items), generator=g).tolist()]
            batches += [items[j:j + G] for j in range(0, len(items) - G + 1, G)]  # the tail waits for next epoch
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[j][self.rank * self.batch_size:(self.rank + 1) * self.batch_size] for j in order]


# ---------------------------------------------------------------------------------------------- feature cache
CACHE_FORMAT = 2  # in every fingerprint: a cache written in another layout (another version) is rebuilt, never misread
SHARD_IMAGES = 256  # images per shard: shard s holds images s·256 ... s·256 + 255


def fingerprint(records, table, vae_id, t5_id, caption_tokens):
    """Hash of everything the cached features depend on; a change means re-encode."""
    stat = lambda f: (f, os.path.getsize(f), os.path.getmtime(f))
    files = [(*stat(r["image"]), r["captions"], *(stat(r["control"]) if "control" in r else ())) for r in records]
    key = json.dumps(dict(files=files, table=table, vae=vae_id, t5=t5_id, tokens=caption_tokens, format=CACHE_FORMAT),
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def cache_problems(cache_dir, images, fp, shard_size=None):
    """{file: why it cannot be used} for a cache of `images` images and fingerprint fp; {}: the cache is complete. Each
    file carries the fingerprint it was encoded for, so this reads headers only: a file missing (a build killed before
    writing it, or deleted), of another build (other images, captions, encoders or version), or damaged (truncated,
    overwritten: safetensors refuses a header whose tensors do not cover the file exactly). A damaged tensor inside
    an intact file is not found: no checksum, whose reading would cost a large cache more than it saves."""
    shards = -(-images // (shard_size or SHARD_IMAGES))
    problems = {}
    for name in [f"shard_{s:05d}.safetensors" for s in range(shards)] + ["null.safetensors"]:
        path = os.path.join(cache_dir, name)
        try:
            with safe_open(path, "pt") as f:
                found = (f.metadata() or {}).get("fingerprint")
            if found != fp:
                problems[name] = "of another build"
        except FileNotFoundError:
            problems[name] = "missing"
        except Exception as e:  # safetensors' SafetensorError
            problems[name] = f"damaged ({weights.first_line(e)})"
    return problems


def build_cache(cache_dir, records, table, fp, encode_images, encode_captions, todo, rank=0, world=1, shard_size=None):
    """Encode the files `todo` of the cache (cache_problems' names, found by every rank before any writes), this rank's
    share of them (the k-th goes to rank k % world): each shard, and the null caption T5(""), is written whole
    (weights.atomic) with fp in its metadata, so a build that is killed leaves complete files only, and the next one
    encodes just the rest.

    encode_images((N,3,h,w) in [-1,1]) -> (N,C,h/8,w/8); encode_captions(list of str) -> (y (N,L,D), mask (N,L)).
    The caller runs a barrier, then rank 0 calls write_cache_index."""
    shard_size, todo = shard_size or SHARD_IMAGES, sorted(todo)
    os.makedirs(cache_dir, exist_ok=True)
    ds = ImageDataset(records, table)
    for name in todo[rank::world]:
        if name == "null.safetensors":  # the caption that caption dropout trains with
            y, mask = encode_captions([""])
            with weights.atomic(os.path.join(cache_dir, name)) as tmp:
                save_file(dict(y=y[0].cpu().contiguous(), mask=mask[0].cpu().contiguous()), tmp, dict(fingerprint=fp))
            continue
        s = int(name[len("shard_"):-len(".safetensors")])
        tensors, meta, skipped = {}, [], 0
        ids = range(s * shard_size, min(len(records), (s + 1) * shard_size))
        by_bucket = defaultdict(list)
        for i in ids:
            by_bucket[ds.buckets[i]].append(i)
        for bucket, idx in by_bucket.items():
            for j in range(0, len(idx), 16):
                items = [it for it in (ds[i] for i in idx[j:j + 16]) if it is not None]
                skipped += len(idx[j:j + 16]) - len(items)
                if not items:
                    continue
                latents = encode_images(torch.stack([it["image"] for it in items]))
                if "control" in items[0]:  # a ControlNet's condition, encoded like its image
                    for it, lat in zip(items, encode_images(torch.stack([it["control"] for it in items]))):
                        tensors[f"{it['index']}.control"] = lat.float().contiguous().cpu()
                for k in range(len(items[0]["captions"])):
                    y, mask = encode_captions([it["captions"][k] for it in items])
                    for it, yi, mi in zip(items, y, mask):
                        tensors[f"{it['index']}.y{k}"] = yi[: int(mi.sum())].contiguous().cpu()  # valid tokens only
                for it, lat in zip(items, latents):
                    tensors[f"{it['index']}.latent"] = lat.float().contiguous().cpu()
                    meta.append([it["index"], bucket, len(it["captions"])])
        with weights.atomic(os.path.join(cache_dir, name)) as tmp:
            save_file(tensors, tmp, metadata=dict(items=json.dumps(meta), skipped=str(skipped), fingerprint=fp))


def write_cache_index(cache_dir, fp):
    """index.json: every item of the shards of fingerprint fp (shard, key, bucket, captions), read by CachedDataset."""
    items, skipped = [], 0
    for name in sorted(os.listdir(cache_dir)):
        if name.startswith("shard_") and name.endswith(".safetensors"):
            with safe_open(os.path.join(cache_dir, name), "pt") as f:
                meta = f.metadata()
            if meta.get("fingerprint") == fp:  # a shard left over from a larger build of other images is not ours
                items += [[name] + m for m in json.loads(meta["items"])]
                skipped += int(meta["skipped"])
    with weights.atomic(os.path.join(cache_dir, "index.json")) as tmp, open(tmp, "w") as f:
        json.dump(dict(fingerprint=fp, items=items, skipped=skipped), f)


class CachedDataset(torch.utils.data.Dataset):
    """Items of a feature cache: latent (C,h,w), per caption key the valid T5 tokens (L_valid, D), and a ControlNet's
    control latent (C,h,w) when the cache has them."""

    def __init__(self, cache_dir):
        index = json.load(open(os.path.join(cache_dir, "index.json")))
        self.dir, self.items, self.skipped = cache_dir, index["items"], index["skipped"]
        self.buckets = [bucket for _, _, bucket, _ in self.items]
        self.files = {}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        shard, key, _, n = self.items[i]
        if shard not in self.files:  # one lazily memory-mapped handle per shard and worker
            self.files[shard] = safe_open(os.path.join(self.dir, shard), "pt")
        f = self.files[shard]
        item = dict(index=i, latent=f.get_tensor(f"{key}.latent"), y=[f.get_tensor(f"{key}.y{k}") for k in range(n)],
                    captions=[None] * n)
        if f"{key}.control" in f.keys():
            item["control_latent"] = f.get_tensor(f"{key}.control")
        return item


def micro_batches(dataset, sampler, start, workers):
    """Endless stream of this rank's micro-batches, starting at global micro-batch number `start`."""
    epoch, offset = divmod(start, len(sampler))
    while True:
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler.epoch(epoch)[offset:],
                                             num_workers=workers, collate_fn=list)
        for items in loader:
            yield epoch, items
        epoch, offset = epoch + 1, 0


def pad_tokens(ys, L):
    """List of (L_valid, D) caption features -> y (N, L, D) zero-padded, mask (N, L)."""
    y = torch.zeros(len(ys), L, ys[0].shape[-1])
    mask = torch.zeros(len(ys), L, dtype=torch.long)
    for i, v in enumerate(ys):
        y[i, : len(v)], mask[i, : len(v)] = v[:L].float(), 1
    return y, mask
