"""--data's images and the feature cache (data.scan, data.build_cache, train.py --cache): corrupt images skipped, the
cache invalidated for every reason, and cached features train exactly as encoding on the fly."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import quickstart
import sigma
import sizes
import t5
import weights

from test_train import REPO, max_diff, run_train, snapshot, tiny, write_png  # noqa: F401 (fixtures and helpers shared with test_train.py)


def test_folder_and_manifest_skip_corrupt_images(tmp_path):
    write_png(tmp_path / "a.png", 64, 128, (255, 0, 0))
    write_png(tmp_path / "b.png", 128, 64, (0, 255, 0))
    write_png(tmp_path / "c.png", 90, 90, (0, 0, 255))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))  # garbage after the signature
    good = (tmp_path / "c.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])  # truncated file
    for name in "abc":
        (tmp_path / f"{name}.txt").write_text(f"caption {name}\n")
    records, skipped = data.scan(str(tmp_path))
    assert skipped == 2 and [os.path.basename(r["image"]) for r in records] == ["a.png", "b.png", "c.png"]
    assert records[0]["captions"] == ["caption a"] and (records[0]["height"], records[0]["width"]) == (64, 128)
    ds = data.ImageDataset(records, sizes.bucket_table(256))
    assert ds.buckets == ["0.5", "2.0", "1.0"]
    assert ds[0]["image"].shape == (3, 176, 352) and ds[1]["image"].shape == (3, 352, 176)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(dict(image=f"{n}.png", short=f"s{n}", long=f"l{n}")) for n in ["a", "bad"]))
    records, skipped = data.scan(str(manifest), ("short", "long"))
    assert skipped == 1 and records[0]["captions"] == ["sa", "la"]
    with pytest.raises(ValueError, match="missing"):
        data.scan(str(manifest), ("short", "nope"))


def test_feature_cache_roundtrip_and_invalidation(tmp_path):
    for i, (h, w) in enumerate([(64, 128), (128, 64), (96, 96)]):
        write_png(tmp_path / f"{i}.png", h, w, (40 * i, 100, 200))
        (tmp_path / f"{i}.txt").write_text("word " * (i + 1))
    records, _ = data.scan(str(tmp_path))
    table = sizes.bucket_table(256)
    calls = []
    enc_img = lambda x: (calls.append(len(x)), torch.nn.functional.avg_pool2d(x, 8)[:, :2])[1]  # stand-in "VAE"
    enc_cap = lambda caps: (torch.stack([torch.full((6, 3), float(len(c))) for c in caps]),
                            torch.tensor([[1] * (len(c.split()) + 1) + [0] * (5 - len(c.split())) for c in caps]))
    cache = str(tmp_path / "cache")
    fp = data.fingerprint(records, table, "vae-A", "t5", 6)
    build = lambda fp: data.build_cache(cache, records, table, fp, enc_img, enc_cap,
                                        data.cache_problems(cache, 3, fp, shard_size=2), shard_size=2)
    assert set(data.cache_problems(cache, 3, fp, shard_size=2)) == {"shard_00000.safetensors", "shard_00001.safetensors",
                                                                   "null.safetensors"}
    build(fp)
    data.write_cache_index(cache, fp)
    ds = data.CachedDataset(cache)
    assert len(ds) == 3 and ds.buckets == ["0.5", "2.0", "1.0"]
    item = ds[2]
    assert item["latent"].shape == (2, 32, 32) and item["y"][0].shape == (4, 3)  # valid tokens only: 3 words + eos
    build(fp)  # up to date: nothing encoded
    assert sum(calls) == 3 and not data.cache_problems(cache, 3, fp, shard_size=2)
    for other in (data.fingerprint(records, table, "vae-B", "t5", 6),  # new VAE
                  data.fingerprint(records, sizes.bucket_table(512), "vae-A", "t5", 6)):  # new size / buckets
        assert other != fp and len(data.cache_problems(cache, 3, other, shard_size=2)) == 3


def test_feature_cache_fingerprint_changes_for_every_reason_to_rebuild(tmp_path):
    """README: the cache is rebuilt when images, captions, components (T5, VAE), resolution, buckets or caption
    length change. Each one alone must change data.fingerprint; nothing changed must keep it."""
    for i in range(2):
        write_png(tmp_path / f"{i}.png", 64, 96, (100, 50 * i, 0))
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    table = sizes.bucket_table(256)
    fp = lambda records=None, table=table, vae="vae", t5="t5", tokens=300: data.fingerprint(
        records or data.scan(str(tmp_path))[0], table, vae, t5, tokens)
    base = fp()
    assert fp() == base  # a pure function of its inputs
    changed = {"VAE": fp(vae="other-vae"), "T5 / components": fp(t5="other-t5"), "caption length": fp(tokens=120),
               "resolution": fp(table=sizes.bucket_table(512)), "buckets": fp(table={"1.0": (256, 256)}),
               "an image fewer": fp(data.scan(str(tmp_path))[0][:1])}
    (tmp_path / "1.txt").write_text("another caption")
    changed["captions"] = fp()
    (tmp_path / "1.txt").write_text("caption 1")
    assert fp() == base
    stat = os.stat(tmp_path / "0.png")
    os.utime(tmp_path / "0.png", (stat.st_atime, stat.st_mtime + 10))  # rewritten: same name and size, newer
    changed["image rewritten"] = fp()
    write_png(tmp_path / "0.png", 64, 96, (0, 0, 255))  # other pixels
    changed["image content"] = fp()
    assert all(v != base for v in changed.values()), [k for k, v in changed.items() if v == base]


def image_folder(tmp_path):
    """The user path's world, tiny: 8 captioned images and a broken one, components (the quick start's tokenizer and
    T5, a random 4-level VAE) and a random DiT to --init from -> (train.py's flags for it, the images, components, DiT
    config)."""
    import dataclasses
    from safetensors.torch import save_file
    import vae
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for i, (h, w) in enumerate([(64, 64), (80, 72), (64, 70), (90, 88), (40, 80), (50, 96), (44, 90), (48, 100)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(["a red circle on a blue background", "a green square on a black background"][i % 2])
    (images / "broken.png").write_bytes(b"not an image")
    comps = tmp_path / "components"
    quickstart.components(str(comps))  # tokenizer/ + tiny random text_encoder/ (64 wide); vae/ replaced below
    cfg = vae.VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    (comps / "vae" / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    save_file(vae.AutoencoderKL(cfg).state_dict(), str(comps / "vae" / "diffusion_pytorch_model.safetensors"))
    dit = sigma.SigmaConfig(depth=2, hidden_size=32, num_heads=2, caption_channels=64, caption_tokens=16,
                            sample_size=32, pe_interpolation=0.5)
    weights.save_checkpoint(sigma.PixArtSigma(dit), str(tmp_path / "init.safetensors"))
    common = ["--data", str(images), "--components", str(comps), "--init", str(tmp_path / "init.safetensors"),
              "--image-size", "256", "--caption-tokens", "16", "--batch-size", "2", "--steps", "3", "--lr", "1e-3",
              "--no-lr-scaling", "--warmup", "1", "--log-every", "1", "--workers", "0", "--caption-dropout", "0.3"]
    return common, images, comps, dit


def test_image_folder_cache_equals_on_the_fly(tmp_path, tiny):
    """The user path: images + captions -> (feature cache) -> training, with tiny random T5, VAE and DiT.
    Cached features must train exactly as encoding on the fly; a second run reuses the cache."""
    common, images, comps, dit = image_folder(tmp_path)
    fly = snapshot(run_train(common + ["--out", str(tmp_path / "fly")]))
    cached = snapshot(run_train(common + ["--out", str(tmp_path / "cached"), "--cache", str(tmp_path / "cache")]))
    stamp = os.path.getmtime(tmp_path / "cache" / "index.json")
    again = snapshot(run_train(common + ["--out", str(tmp_path / "again"), "--cache", str(tmp_path / "cache")]))
    assert os.path.getmtime(tmp_path / "cache" / "index.json") == stamp  # reused, not rebuilt
    assert max_diff(fly, cached) < 1e-2 * 1e-3 and max_diff(cached, again) == 0  # 1/100 of one step at lr 1e-3
    # what train.py hands the fingerprint: a caption, the VAE, the T5 (components) and the caption length,
    # each changed alone on top of the run before, rebuild the cache
    shutil.copytree(comps, tmp_path / "components2")
    (images / "3.txt").write_text("a blue triangle on a white background")
    flags = []
    for i, change in enumerate([[], ["--vae", str(comps / "vae")], ["--components", str(tmp_path / "components2")],
                                ["--caption-tokens", "12"]]):
        flags += change
        fp = json.load(open(tmp_path / "cache" / "index.json"))["fingerprint"]
        run_train(common + ["--out", str(tmp_path / f"rebuilt{i}"), "--cache", str(tmp_path / "cache"), *flags])
        assert json.load(open(tmp_path / "cache" / "index.json"))["fingerprint"] != fp, change
    log = [json.loads(line) for line in open(tmp_path / "cached" / "log.jsonl")]
    assert log[-1]["skipped_images"] == 1 and max_diff(fly, snapshot(sigma.PixArtSigma(dit))) > 1e-4


def test_a_damaged_cache_is_found_before_training_and_encoded_again(tmp_path, tiny, monkeypatch, capsys):
    """A shard cut short, a shard deleted (index.json still names it) and a shard whose header is overwritten, then a
    cache of another version of data.py: each is found from the files' headers when the cache is opened, said in one
    line, and only those files are encoded again; the model trains as on the intact cache."""
    monkeypatch.setattr(data, "SHARD_IMAGES", 2)  # 8 images: 4 shards
    common, *_ = image_folder(tmp_path)
    cache = tmp_path / "cache"
    run = lambda out: snapshot(run_train(common + ["--out", str(tmp_path / out), "--cache", str(cache)]))
    intact, stamp = run("intact"), os.path.getmtime(cache / "shard_00000.safetensors")
    shard = (cache / "shard_00001.safetensors").read_bytes()
    (cache / "shard_00001.safetensors").write_bytes(shard[:-100])
    os.remove(cache / "shard_00002.safetensors")
    with open(cache / "shard_00003.safetensors", "r+b") as f:
        f.write(b"\0" * 16)
    capsys.readouterr()
    assert max_diff(run("repaired"), intact) == 0
    assert (f"cache {cache}: encoding 3 files: shard_00001.safetensors damaged (SafetensorError: Error while deserializing header: "
            "incomplete metadata, file not fully covered); shard_00002.safetensors missing; shard_00003.safetensors "
            "damaged (SafetensorError: Error while deserializing header: ") in capsys.readouterr().out
    assert os.path.getmtime(cache / "shard_00000.safetensors") == stamp  # intact: not encoded again
    monkeypatch.setattr(data, "CACHE_FORMAT", data.CACHE_FORMAT + 1)  # as if a later data.py opened it
    assert max_diff(run("later"), intact) == 0
    assert f"cache {cache}: encoding 5 files: shard_00000.safetensors of another build;" in capsys.readouterr().out


def test_a_killed_cache_build_is_finished_by_the_next_run(tmp_path, tiny, monkeypatch, capsys):
    """kill -9 (a real one, in a subprocess) while a cache is encoded for new captions over a complete one of the old:
    what is left is taken for complete by neither (though index.json still names the old build), and the next run
    encodes only the files still missing; it trains as on a cache built in one go."""
    monkeypatch.setattr(data, "SHARD_IMAGES", 3)  # 8 images: 3 shards
    common, images, *_ = image_folder(tmp_path)
    cache = tmp_path / "cache"
    run_train(common + ["--out", str(tmp_path / "old"), "--cache", str(cache)])
    old = json.load(open(cache / "index.json"))["fingerprint"]
    (images / "3.txt").write_text("a blue triangle on a white background")
    worker = tmp_path / "worker.py"  # killed once two files (null.safetensors, shard_00000) of the new build are written
    worker.write_text(f"import os, signal, sys\nsys.path.insert(0, {REPO!r})\nimport cli, data, train\ndata.SHARD_IMAGES = 3\n"
                      "def save_file(*args, written=[], save=data.save_file, **kwargs):\n"
                      "    if len(written) == 2:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
                      "    written.append(save(*args, **kwargs))\n"
                      "data.save_file = save_file\ntrain.main(cli.parse_train_args(sys.argv[1:]))\n")
    killed = subprocess.run([sys.executable, str(worker), *common, "--out", str(tmp_path / "killed"), "--cache", str(cache)],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    new = data.fingerprint(data.scan(str(images))[0], sizes.bucket_table(256), common[3], common[3], 16)
    assert json.load(open(cache / "index.json"))["fingerprint"] == old and data.cache_problems(cache, 8, old)
    assert data.cache_problems(cache, 8, new) == {"shard_00001.safetensors": "of another build",
                                                  "shard_00002.safetensors": "of another build"}
    capsys.readouterr()
    finished = snapshot(run_train(common + ["--out", str(tmp_path / "finished"), "--cache", str(cache)]))
    assert f"cache {cache}: encoding 2 files: shard_00001.safetensors of another build;" in capsys.readouterr().out
    assert not data.cache_problems(cache, 8, new) and json.load(open(cache / "index.json"))["fingerprint"] == new
    in_one_go = snapshot(run_train(common + ["--out", str(tmp_path / "one_go"), "--cache", str(tmp_path / "cache2")]))
    assert max_diff(finished, in_one_go) == 0
