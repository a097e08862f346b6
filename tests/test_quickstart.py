"""The CPU quick start (quickstart.py): its pixel space as a VAE, its shapes, T5 and scorer, training through
train.main, sample.py on its runs, and (slow) that it learns shapes and colours."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import quickstart
import t5
import tokenizer
import train
import weights

from test_train import run_args, tiny  # noqa: F401 (fixtures and helpers shared with test_train.py)


def test_quickstart_pixel_space_is_a_vae_of_the_images_times_4(tmp_path):
    """quickstart.pixel_space, the one VAE file train.py, sample.py and export.py load for the quick start: encode is
    x -> 4x and decode z -> z/4, one latent per pixel, in weights.load_vae's model and in diffusers' AutoencoderKL.
    Tolerance 2e-6 on values up to 4: float32 rounding in its GroupNorm and SiLU (measured 4.8e-7)."""
    from diffusers import AutoencoderKL
    folder = quickstart.pixel_space(str(tmp_path / "vae"))
    x = torch.stack([quickstart.ShapesDataset(16)[i]["image"] for i in range(8)])  # (8, 3, 16, 16) in [-1, 1]
    z = torch.randn(8, 3, 20, 12) * 4  # latents as sampled: any size, beyond the clip range too
    ours, ref = weights.load_vae(folder), AutoencoderKL.from_pretrained(folder).eval()
    assert ours.factor == 1 and ours.config.latent_channels == 3
    with torch.no_grad():
        assert (ours.encode(x) - 4 * x).abs().max() < 2e-6 and (ours.decode(z) - z / 4).abs().max() < 2e-6
        assert (ref.encode(x).latent_dist.mode() * ref.config.scaling_factor - 4 * x).abs().max() < 2e-6
        assert (ref.decode(z / ref.config.scaling_factor).sample - z / 4).abs().max() < 2e-6

def test_quickstart_loss_goes_down(tmp_path, tiny):
    quickstart.train(run_args(tmp_path, "--steps", 60, "--batch-size", 16, "--caption-dropout", 0.1, "--preview-every", 60))
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    preview = np.asarray(Image.open(tmp_path / "step_0000060" / "preview.png").convert("L"))
    labels = preview[:, :-4 * 128]  # 4 prompts × 4 seeds, 16 px drawn 8x larger, right of a column of labels
    assert preview.shape[0] == 4 * 128 and labels.shape[1] > 100
    assert all((labels[r * 128:(r + 1) * 128] < 128).sum() > 50 for r in range(4))  # each row's prompt written, dark on white
    first, last = np.mean([r["loss"] for r in log[:10]]), np.mean([r["loss"] for r in log[-10:]])
    assert len(log) == 60 and last < 0.75 * first, (first, last)
    model = weights.load_checkpoint(str(tmp_path / "step_0000060" / "model.safetensors"))  # sample.py-loadable
    assert model.config.in_channels == 3 and model.config.sample_size == 16

def test_sample_py_draws_a_quickstart_run(tmp_path, tiny, capsys):
    """`sample.py --model <run>` and no other flag: the run's latest EMA weights, its own T5 and tokenizer (sample.json),
    pixel space at the training size; its images equal train.py's preview of the same weights, prompts and seed
    (image k from seed + k: same noise, CFG 4.5, x̂0 clipping, 20 DPM-Solver++ steps; the preview samples all of its
    images in one batch) within 1/255."""
    import sample
    run, prompts = tmp_path / "run", ["a red circle on a blue background", "a green square on a white background"]
    quickstart.train(run_args(run, "--steps", 4, "--ema", 0.5, "--save-every", 2))
    capsys.readouterr()  # train.py's lines: where the run is, how to sample it
    assert json.load(open(run / "sample.json")) == dict(text_encoder="text_encoder", tokenizer="tokenizer/spiece.model",
                                                        vae="vae", clip_x0=4.0)
    assert sample.main([*prompts, "--model", str(run), "--n", "2", "--seed", "7", "--out", str(tmp_path / "out")]) == 0
    pngs = [Image.open(tmp_path / "out" / f"0000{k}-{7 + k}.png") for k in range(4)]  # prompt k // 2, seed 7 + k
    assert pngs[0].size == (16, 16)  # as sampled; a copy 16x larger for a person to look at, every pixel a 16x16 block
    copy = np.asarray(Image.open(tmp_path / "out" / "enlarged" / "00000-7.png").convert("RGB"), dtype=np.int16)
    assert copy.shape == (256, 256, 3) and np.array_equal(copy, np.asarray(pngs[0].convert("RGB")).repeat(16, 0).repeat(16, 1))
    assert pngs[0].text["parameters"].startswith(prompts[0] + "\nNegative prompt: \nSteps: 20, Sampler: dpm")
    assert pngs[0].text["parameters"].endswith(os.path.join("step_0000004", "ema.safetensors"))
    model = weights.load_checkpoint(str(run / "step_0000004" / "ema.safetensors"))
    assert len(capsys.readouterr().out.splitlines()) == 4  # one line per image
    args = cli.parse_train_args(run_args(tmp_path / "new"), quickstart.DEFAULTS, need_data=False, own_components=True)
    capsys.readouterr()  # its note on the preview cadence
    encoders = train.load_encoders(args, 16, torch.device("cpu"), quickstart.components(str(run)))
    captions, null = train.Caption(*encoders.captions(prompts)), train.Caption(*(v[0] for v in encoders.captions([""])))
    train.preview(model, captions, null, encoders.vae, tmp_path / "preview.png", prompts, "dpm", 2, seed=7, clip_x0=4.0)
    grid = np.asarray(Image.open(tmp_path / "preview.png"), dtype=np.int16)[:, -2 * 128:][::8, ::8]  # 8x, right of the labels
    for k, png in enumerate(pngs):  # row k // 2, column k % 2
        expected = grid[16 * (k // 2):16 * (k // 2 + 1), 16 * (k % 2):16 * (k % 2 + 1)]
        got = np.asarray(png.convert("RGB"), dtype=np.int16)
        assert got.std() > 5 and np.abs(got - expected).max() <= 1, k
    # a checkpoint file of the run directly: its sample.json is one folder up; sizes from 16 px, no buckets
    assert sample.main([prompts[0], "--model", str(run / "step_0000002" / "model.safetensors"), "--size", "32x16",
                        "--seed", "0", "--out", str(tmp_path / "out")]) == 0
    assert Image.open(tmp_path / "out" / "00004-0.png").size == (32, 16)
    assert len(capsys.readouterr().out.splitlines()) == 1  # one line per image: its path (and its enlarged copy's)
    # `python quickstart.py score <run>`: every caption sampled and scored, a labelled grid; a run without sample.json refused
    result = quickstart.main(["score", str(run), "--n", "1", "--steps", "2", "--grid", str(tmp_path / "grid.png")])
    assert set(result) == {"seen", "held_out"} and 0 <= result["held_out"]["shape"] <= 1
    assert set(result["seen"]) == {"shape", "color", "rmse", "circle", "square", "triangle"}
    grid = Image.open(tmp_path / "grid.png")  # 6 seeds a row, 128 px each, right of the labels
    assert grid.height == len(quickstart.GRID_PROMPTS) * 128 and grid.width > 6 * 128 + 100
    assert "right shape" in capsys.readouterr().out
    os.remove(run / "sample.json")
    with pytest.raises(ValueError, match="not a quick-start run"):
        quickstart.main(["score", str(run)])
    with pytest.raises(ValueError, match="no such run"):
        quickstart.main(["score", str(tmp_path / "missing")])

def test_quickstart_score_tells_shapes_and_colours_apart():
    # the scorer behind the README's quick-start figures: drawings with their own captions score 1, the
    # same drawings under another shape's or swapped colours' caption score 0
    ds = quickstart.ShapesDataset(16)
    items = [ds[i] for i in range(60)]
    images, captions = [it["image"] for it in items], [it["captions"][0] for it in items]
    assert quickstart.score(images, captions) == pytest.approx(
        dict(shape=1.0, color=1.0, rmse=0.0, circle=1.0, square=1.0, triangle=1.0), abs=0.12)
    shapes = quickstart.ShapesDataset.SHAPES
    other = [c.replace(f" {s} ", f" {shapes[(shapes.index(s) + 1) % 3]} ") for c in captions
             for s in shapes if f" {s} " in c]
    assert quickstart.score(images, other)["shape"] == quickstart.score(images, other)["square"] == 0.0
    swapped = []
    for c in captions:
        _, color, shape, _, _, bg, _ = c.split()
        swapped.append(f"a {bg} {shape} on a {color} background")
    assert quickstart.score(images, swapped)["color"] == 0.0
    noisy = [x + 0.8 * torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) for i, x in enumerate(images)]
    assert quickstart.score(noisy, captions)["rmse"] > 0.7

def test_quickstart_style_judge_tells_outlines_from_filled_shapes():
    """score_style, the LoRA demo's judge: the data's shapes drawn filled score 0 outlined, the same shapes as outlines
    1 (every size and position of the data's range), each with its own shape; pure noise has no shape."""
    ds, outlined = quickstart.ShapesDataset(16), quickstart.ShapesDataset(16, outline=quickstart.OUTLINE)
    captions = [ds[i]["captions"][0] for i in range(60)]
    assert [outlined[i]["captions"][0] for i in range(60)] == captions  # the same shapes, colours and places
    filled = quickstart.score_style([ds[i]["image"] for i in range(60)], captions, quickstart.OUTLINE)
    styled = quickstart.score_style([outlined[i]["image"] for i in range(60)], captions, quickstart.OUTLINE)
    assert filled == dict(outlined=0.0, shape=1.0) and styled == dict(outlined=1.0, shape=1.0), (filled, styled)
    a, b = ds[0]["image"], outlined[0]["image"]  # an outline is the filled shape with its inside in the background colour
    assert ((a - b).abs().amax(0) > 0.1).sum() > 10 and torch.equal(a[:, 0], b[:, 0])

def test_quickstart_lora_demo_trains_and_scores(tmp_path, tiny, monkeypatch, capsys):
    """`quickstart.py lora`: adapters on a quick-start run, trained on outlined shapes with the base run's own T5 and
    tokenizer; `score BASE --lora RUN` samples at scales 0, 0.5, 1 and draws the grid (6 of the captions here, for
    time). Without a base run it trains one first."""
    base, run = tmp_path / "base", tmp_path / "lora"
    quickstart.train(run_args(base, "--steps", 2))
    quickstart.lora(run_args(run, "--init", base, "--steps", 2, "--preview-every", 0))
    assert sorted(os.listdir(run / "step_0000002")) == ["adapter_config.json", "adapter_model.safetensors", "trainer.pt"]
    assert json.load(open(run / "sample.json"))["tokenizer"] == str(base / "tokenizer" / "spiece.model")
    capsys.readouterr()
    monkeypatch.setattr(quickstart.ShapesDataset, "captions", classmethod(lambda cls: quickstart.GRID_PROMPTS[:6]))
    result = quickstart.main(["score", str(base), "--lora", str(run), "--n", "1", "--steps", "2", "--grid",
                              str(tmp_path / "grid.png")])
    assert set(result) == {0.0, 0.5, 1.0} and all(set(r) == {"outlined", "shape"} for r in result.values())
    out = capsys.readouterr().out
    assert out.count("6 samples of all 6 captions: outlined ") == 3
    assert Image.open(tmp_path / "grid.png").height == 3 * 128  # a row per scale
    calls = []
    monkeypatch.setattr(quickstart, "train", lambda argv: calls.append(argv))
    with pytest.raises(ValueError):  # nothing trained by the stand-in: then no checkpoint to start from
        quickstart.lora(run_args(tmp_path / "lora2", "--init", tmp_path / "none", "--steps", 2))
    assert calls == [["--out", str(tmp_path / "none")]]

def test_quickstart_holds_captions_out_of_training():
    """15 of the 90 combinations are never drawn for training; each of their words still is, in other captions."""
    held, seen = set(quickstart.ShapesDataset.captions(True)), set(quickstart.ShapesDataset.captions(False))
    assert len(held) == 15 and len(seen) == 75 and not held & seen
    ds = quickstart.ShapesDataset(16)
    drawn = {ds[i]["captions"][0] for i in range(3000)}
    assert drawn == seen  # all the others are drawn, the held-out ones never
    for word in {w for c in held for w in c.split()}:
        assert sum(word in c.split() for c in seen) >= 10, word

def test_quickstart_threads_are_the_idle_cores(monkeypatch, capsys):
    """pick_threads: one torch thread per core that other work leaves idle, at least one; OMP_NUM_THREADS decides when
    set. busy_cores sees a spinning process as (at least half) a busy core."""
    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        for cores, busy, expected in ((2, 0.1, 2), (2, 0.9, 1), (2, 1.7, 1), (2, 3.0, 1), (4, 1.2, 3)):
            torch.set_num_threads(cores)  # torch's default: the cores it may use
            monkeypatch.setattr(quickstart, "busy_cores", lambda: busy)
            assert quickstart.pick_threads("quickstart.py") == expected == torch.get_num_threads(), (cores, busy)
        assert capsys.readouterr().out.splitlines()[-1] == ("quickstart.py: 3 torch threads: 1.2 of 4 cores busy with "
                                                            "other work (OMP_NUM_THREADS=N to choose)")
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        monkeypatch.setattr(quickstart, "busy_cores", lambda: 1.9)
        assert quickstart.pick_threads("quickstart.py") == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    monkeypatch.undo()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert 0.5 <= quickstart.busy_cores() <= (os.cpu_count() or 1)
    finally:
        spinner.kill()

def test_quickstart_t5_tells_a_words_place(tmp_path):
    # neighbour_heads: "red" as the shape's colour and as the background's must get different vectors; a plain
    # random T5 of the same size gives nearly the same one (the reason the quick start does not use it)
    comps = quickstart.components(str(tmp_path))
    tok = tokenizer.Tokenizer(comps["tokenizer"], max_length=16)
    prompts = ["a red circle on a blue background", "a blue circle on a red background"]
    cos = lambda y: torch.nn.functional.cosine_similarity(y[0, 1], y[1, 5], dim=0).item()  # "red" at 1 and at 5
    y, _ = t5.encode(weights.load_t5(comps["text_encoder"], dtype=torch.float32), tok, prompts)
    torch.manual_seed(0)
    plain = t5.T5Encoder(t5.T5Config(vocab_size=tok.sp.get_piece_size(), **quickstart.T5))
    y_plain, _ = t5.encode(plain, tok, prompts)
    assert cos(y_plain) > 0.95 and cos(y) < 0.8, (cos(y_plain), cos(y))
    with pytest.raises(ValueError, match="one offset per head"):
        quickstart.neighbour_heads(plain, offsets=(-1, 1))

@pytest.mark.slow
def test_quickstart_learns_shapes_and_colours(tmp_path):
    # the quick start's promise at 1500 of its 2500 steps (2 min 17 s on 2 idle cores), judged by quickstart.score
    # over the 75 seen captions: 81% right shapes, 99% right colours (2 threads; the 4-block DiT of before: 86% / 98%
    # with 1 thread); guessing: 33%, 3%. Without the T5's neighbour heads (4 blocks): 13% right colours. Breaking
    # the caption path or the loss fails it too.
    quickstart.main(["train", "--out", str(tmp_path), "--steps", "1500", "--preview-every", "0"])
    result = quickstart.main(["score", str(tmp_path), "--n", "1"])
    assert result["seen"]["color"] >= 0.8 and result["seen"]["shape"] >= 0.6, result


@pytest.mark.parametrize("command", ["lora", "controlnet"])
def test_quickstart_demo_help_trains_nothing(tmp_path, monkeypatch, capsys, command):
    """`quickstart.py lora --help` / `controlnet --help` print the flags and exit: no base model is trained for it."""
    calls = []
    monkeypatch.setattr(quickstart, "train", lambda argv: calls.append(argv))
    with pytest.raises(SystemExit) as e:
        quickstart.main([command, "--init", str(tmp_path / "none"), "--help"])
    assert e.value.code == 0 and calls == [] and "--steps" in capsys.readouterr().out
