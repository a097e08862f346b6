"""sample.py end to end on tiny random weights written in the released layouts, against diffusers'
PixArtSigmaPipeline built from the same files (sizes: tests/test_sizes.py); the memory schedule; bad input."""
import hashlib
import os
import shutil
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (ASPECT_RATIO_256_BIN, ASPECT_RATIO_512_BIN,
                                                                     ASPECT_RATIO_1024_BIN)
from PIL import Image
from safetensors.torch import load_file
from transformers import T5Config, T5EncoderModel, T5Tokenizer

import hub
import sample
import weights
from tokenizer import Tokenizer
from official import official_layout

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers + numpy 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("a small cactus with happy face in the sahara desert red fox snow golden hour lighthouse on cliff at dawn "
         "cat sitting mat photo of painting watercolor city night rain blue sky green forest mountain river old "
         "man woman child dog bird flower garden sunset ocean beach castle dragon robot space").split()


def write_components(root):
    """A diffusers-layout pipeline folder of tiny random models, every file written by the reference libraries
    (or sentencepiece): transformer/, text_encoder/ (index + 2 shards), tokenizer/spiece.model, vae/."""
    import sentencepiece
    g = torch.Generator().manual_seed(0)
    os.makedirs(f"{root}/tokenizer")
    corpus = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) for i in range(400)]
    sentencepiece.SentencePieceTrainer.train(  # T5's special ids: pad 0, eos 1, unk 2, no bos
        sentence_iterator=iter(corpus), model_prefix=f"{root}/tokenizer/spiece", vocab_size=120, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    os.remove(f"{root}/tokenizer/spiece.vocab")
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=256, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                                 feed_forward_proj="gated-gelu", is_gated_act=True, dense_act_fn="gelu_new"))
    t5.save_pretrained(f"{root}/text_encoder", max_shard_size="70KB")
    dit = PixArtTransformer2DModel(sample_size=32, num_layers=2, num_attention_heads=2, attention_head_dim=72,
                                   in_channels=4, out_channels=8, caption_channels=32, cross_attention_dim=144,
                                   interpolation_scale=0.5, use_additional_conditions=False, norm_type="ada_norm_single",
                                   norm_elementwise_affine=False, norm_eps=1e-6, num_embeds_ada_norm=1000)
    with torch.no_grad():  # random everywhere: its zero-inits would make every image the same
        for p in dit.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    dit.save_pretrained(f"{root}/transformer")
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        scaling_factor=0.13025)
    vae.save_pretrained(f"{root}/vae")
    return root


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    return write_components(str(tmp_path_factory.mktemp("pipeline") / "PixArt-Sigma-tiny"))


def reference_tokenizer(root):
    """transformers' T5Tokenizer as diffusers loads it, from the tokenizer folder's spiece.model."""
    return T5Tokenizer.from_pretrained(f"{root}/tokenizer")


def diffusers_pipeline(root):
    return PixArtSigmaPipeline(
        tokenizer=reference_tokenizer(root), text_encoder=T5EncoderModel.from_pretrained(f"{root}/text_encoder"),
        vae=AutoencoderKL.from_pretrained(f"{root}/vae"), transformer=PixArtTransformer2DModel.from_pretrained(f"{root}/transformer"),
        scheduler=DPMSolverMultistepScheduler())


def ours(root, prompt, size, seed, steps=5, binning=True, negative="", output_type="pil"):
    model = weights.load_checkpoint(f"{root}/transformer")
    t5model = weights.load_t5(f"{root}/text_encoder", dtype=torch.float32)
    return sample.generate([prompt], model, t5model, Tokenizer(f"{root}/tokenizer/spiece.model"),
                           weights.load_vae(f"{root}/vae"), negative=negative, size=size, steps=steps, seed=seed,
                           binning=binning, progress=False, output_type=output_type)[0]


# ------------------------------------------------------------------------------------------------- sizes


# ------------------------------------------------------------------------------------------ parity, e2e

@pytest.mark.parametrize("size,binning,negative", [((240, 200), True, ""), ((192, 320), False, "old blurry photo")])
def test_images_match_diffusers_pipeline(components, size, binning, negative):
    """Same files, prompt, seed and steps through diffusers' PixArtSigmaPipeline: float images within 2e-5
    (measured 2e-6), and the 8-bit images equal but for the few pixels that lie at a rounding boundary."""
    prompt = "A Small cactus with a happy face in the Sahara desert "
    ids, mask = Tokenizer(f"{components}/tokenizer/spiece.model")([prompt.lower().strip()])
    ref_tok = reference_tokenizer(components)(prompt.lower().strip(), padding="max_length", max_length=300)
    assert ids[0].tolist() == ref_tok.input_ids  # the two tokenizers agree: differences below are downstream
    pipe = diffusers_pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt, negative_prompt=negative, num_inference_steps=5, guidance_scale=4.5, height=size[0],
                    width=size[1], generator=torch.Generator("cpu").manual_seed(3), use_resolution_binning=binning,
                    clean_caption=False, output_type="np").images[0]  # (H, W, 3) floats in [0, 1]
    got = ours(components, prompt, size, seed=3, binning=binning, negative=negative, output_type="np")
    assert expected.shape == got.shape == (size[0], size[1], 3)
    assert expected.std() > 0.04  # a real picture, not a flat colour
    assert np.abs(expected - got).max() < 2e-5  # images in [0, 1]: relative to their range, 1/200 of an 8-bit step
    a = np.asarray(pipe.image_processor.numpy_to_pil(expected[None])[0], dtype=np.int16)  # diffusers' 8-bit image
    b = np.asarray(ours(components, prompt, size, seed=3, binning=binning, negative=negative), dtype=np.int16)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3  # measured 7e-5; a floor instead of rounding: 0.5


def test_pipeline_saved_by_diffusers(components, tmp_path, capsys):
    """`sample.py --model FOLDER` on a pipeline written by diffusers' PixArtSigmaPipeline.save_pretrained (with
    transformers 5: tokenizer/ holds tokenizer.json and no spiece.model) against diffusers' pipeline loaded back
    from that folder: the same token ids, images within 1/255."""
    pipe = diffusers_pipeline(components)
    pipe.tokenizer = T5Tokenizer.from_pretrained(f"{components}/tokenizer")  # as diffusers loads it: with the charsmap
    saved = tmp_path / "saved"
    pipe.save_pretrained(saved)
    assert (saved / "tokenizer" / "tokenizer.json").is_file() and not (saved / "tokenizer" / "spiece.model").exists()
    ref = PixArtSigmaPipeline.from_pretrained(saved)
    ref.set_progress_bar_config(disable=True)
    prompt = "A Small cactus with a happy face in the Sahara desert "
    ids = Tokenizer(str(saved / "tokenizer"))([prompt.lower().strip()])[0]
    assert ids[0].tolist() == ref.tokenizer(prompt.lower().strip(), padding="max_length", max_length=300).input_ids
    expected = ref(prompt, num_inference_steps=5, guidance_scale=4.5, height=240, width=200, clean_caption=False,
                   generator=torch.Generator("cpu").manual_seed(3)).images[0]
    rc, _, err = cli(capsys, prompt, "--model", saved, "--size", "200x240", "--steps", 5, "--seed", 3, "--out",
                     tmp_path / "out", "--device", "cpu")
    assert rc == 0, err
    a, b = np.asarray(expected, dtype=np.int16), pixels(tmp_path / "out" / "00000-3.png")
    assert a.shape == b.shape == (240, 200, 3)
    assert a.std() > 10  # a real picture, not a flat colour
    assert np.abs(a - b).max() <= 1
    os.remove(saved / "tokenizer" / "tokenizer.json")  # neither file: one line naming both
    rc, _, err = cli(capsys, prompt, "--model", saved, "--out", tmp_path / "out")
    assert rc == 2 and f"no tokenizer at {saved}/tokenizer: expected spiece.model or tokenizer.json" in err


def test_a_diffusers_checkpoint_needs_no_null_caption(components, capsys, one_thread):
    """diffusers' files keep no y_embedding: loading one says so in a one-line note, and the note's claim holds: the
    images do not depend on it (the null caption comes from T5(""))."""
    model = weights.load_checkpoint(f"{components}/transformer")
    err = capsys.readouterr().err
    assert err.startswith("weights: note: ") and err.count("\n") == 1 and "error" not in err.lower()
    t5model = weights.load_t5(f"{components}/text_encoder", dtype=torch.float32)
    draw = lambda: sample.generate(["a red fox"], model, t5model, Tokenizer(f"{components}/tokenizer/spiece.model"),
                                   weights.load_vae(f"{components}/vae"), size=(64, 64), steps=2, progress=False,
                                   output_type="np")[0]
    zeros = draw()
    model.y_embedder.y_embedding.normal_()
    assert np.array_equal(draw(), zeros)


def test_t5_is_freed_before_the_dit_runs(components, tmp_path, monkeypatch, capsys):
    """sample.py's memory schedule: T5 loads, encodes and is gone before the DiT's first step; the DiT is gone before
    the VAE loads (one model at a time on the accelerator)."""
    events, refs = [], {}

    def load_t5(*args, **kwargs):
        events.append("t5")
        refs["t5"] = weakref.ref(model := t5_loader(*args, **kwargs))
        return model

    def load_model(*args, **kwargs):
        refs["dit"] = weakref.ref(model := model_loader(*args, **kwargs))
        model.register_forward_pre_hook(lambda *_: events.append(("dit", refs["t5"]() is None)) if "t5" in refs else None)
        return model

    def load_vae(*args, **kwargs):
        events.append(("vae", refs["dit"]() is None))
        return vae_loader(*args, **kwargs)
    t5_loader, model_loader, vae_loader = weights.load_t5, hub.load_model, weights.load_vae
    monkeypatch.setattr(weights, "load_t5", load_t5)
    monkeypatch.setattr(hub, "load_model", load_model)
    monkeypatch.setattr(weights, "load_vae", load_vae)
    assert cli(capsys, "a cat", "a dog", "--model", components, "--size", 128, "--steps", 1, "--n", 2, "--out", tmp_path)[0] == 0
    assert events == ["t5"] + [("dit", True)] * 4 + [("vae", True)]  # 4 images, one step each
    assert len(os.listdir(tmp_path)) == 4


@pytest.mark.parametrize("sampler", ["dpm", "ancestral"])
def test_batches_never_change_an_image(components, sampler, one_thread):
    """3 prompts × n=2 in batches of 4 (then a last one of 2), each batch one DiT forward with CFG: every image
    within 1/255 of the same image sampled alone (its own seed's noise, and for the ancestral sampler its own
    generator for the noise of every step)."""
    model = weights.load_checkpoint(f"{components}/transformer")
    t5model, tok = weights.load_t5(f"{components}/text_encoder", dtype=torch.float32), Tokenizer(f"{components}/tokenizer")
    rows = []
    model.register_forward_hook(lambda module, args, out: rows.append(len(args[0])))
    run = lambda b: np.stack([np.asarray(im, dtype=np.int16) for im in sample.generate(
        ["a cat", "a red fox in snow", "a lighthouse at dawn"], model, t5model, tok, weights.load_vae(f"{components}/vae"),
        size=(128, 128), steps=3, n=2, seed=5, sampler=sampler, batch_size=b, progress=False)])
    alone, batched = run(1), run(4)
    assert rows == [2] * 3 * 6 + [8] * 3 + [4] * 3  # (null + caption) × images per forward, 3 steps per batch
    assert min(np.abs(alone[i] - alone[j]).max() for i in range(6) for j in range(i)) > 10  # six different images
    assert np.abs(alone - batched).max() <= 1


@pytest.mark.bf16_attention  # conftest.py
def test_dtype_aliases(components, tmp_path, capsys, one_thread):
    images = {}
    for dtype in ["fp32", "float32", "bf16", "BFloat16", "half", "float16"]:
        assert cli(capsys, "a cat", "--model", components, "--size", 64, "--no-binning", "--steps", 1, "--seed", 0, "--dtype", dtype,
                   "--out", tmp_path / dtype)[0] == 0
        images[dtype] = pixels(tmp_path / dtype / "00000-0.png")
    assert np.array_equal(images["fp32"], images["float32"]) and np.array_equal(images["bf16"], images["BFloat16"])
    assert np.array_equal(images["half"], images["float16"])
    assert not np.array_equal(images["fp32"], images["bf16"]) and not np.array_equal(images["fp32"], images["half"])


# ------------------------------------------------------------------------------------------------- CLI

def cli(capsys, *args):
    """sample.main in-process -> (exit code, stdout, stderr)."""
    rc = sample.main([str(a) for a in args])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return rc, out.out, out.err


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_cli_writes_pngs_with_settings(components, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--model", components, "--steps", 2, "--out", out, "--device", "cpu"]
    rc, stdout, _ = cli(capsys, "A red fox in snow", "a lighthouse at dawn", "--size", "320x192", "--n", 2, "--seed", 5, *common)
    assert rc == 0
    assert sorted(os.listdir(out)) == ["00000-5.png", "00001-6.png", "00002-7.png", "00003-8.png"]
    assert stdout.split() == [str(out / f) for f in sorted(os.listdir(out))]
    first = Image.open(out / "00001-6.png")
    assert first.size == (320, 192)
    assert first.text["parameters"] == ("A red fox in snow\nNegative prompt: \nSteps: 2, Sampler: dpm, CFG scale: 4.5, "
                                        f"Seed: 6, Size: 320x192, Model: {components}/transformer")
    assert Image.open(out / "00002-7.png").text["parameters"].startswith("a lighthouse at dawn\n")
    assert np.abs(pixels(out / "00000-5.png") - pixels(out / "00001-6.png")).max() > 10  # seeds differ
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    # the same seed alone gives the same image as inside a batch; the second run adds a file
    assert cli(capsys, "A red fox in snow", "--size", "320x192", "--seed", 6, *common)[0] == 0
    assert {f: (out / f).read_bytes() for f in before} == before
    assert np.array_equal(pixels(out / "00004-6.png"), pixels(out / "00001-6.png"))
    # another aspect ratio (portrait, exact size), the other sampler, a negative prompt
    rc, _, _ = cli(capsys, "a red fox in snow", "--size", "192x320", "--no-binning", "--sampler", "ancestral",
                   "--negative", "blurry", "--seed", 1, *common)
    image = Image.open(out / "00005-1.png")
    assert rc == 0 and image.size == (192, 320)
    assert "Negative prompt: blurry\nSteps: 2, Sampler: ancestral" in image.text["parameters"]


def test_official_pth_and_own_checkpoint_give_the_same_images(components, tmp_path, capsys):
    """The diffusers folder, the same weights in the released .pth layout (written by the tests' own mapping,
    tests/official.py) and our .safetensors: the same PNG from each."""
    theirs = load_file(f"{components}/transformer/diffusion_pytorch_model.safetensors")
    # the released files carry the null caption and the training grid's position table (16² tokens at 256²)
    sd = official_layout(theirs, torch.randn(300, 32), torch.zeros(1, 16 * 16, 144))
    torch.save({"state_dict": sd}, tmp_path / "PixArt-Sigma-tiny.pth")
    weights.save_checkpoint(weights.load_checkpoint(f"{components}/transformer"), tmp_path / "ours.safetensors")
    images = []
    for i, model in enumerate([f"{components}/transformer", tmp_path / "PixArt-Sigma-tiny.pth", tmp_path / "ours.safetensors"]):
        out = tmp_path / f"out{i}"
        assert cli(capsys, "a cat on a mat", "--model", model, "--components", components, "--size", 256,
                   "--steps", 2, "--seed", 0, "--out", out)[0] == 0
        images.append(pixels(out / "00000-0.png"))
    assert images[0].std() > 10 and np.array_equal(images[0], images[1]) and np.array_equal(images[0], images[2])


def test_above_training_size_with_kv_compression(components, tmp_path, capsys):
    """4096² from the 2K model in miniature: 512² from a model trained at 256² (16² tokens -> 32²), keys and
    values 2x2-pooled in the deep half (block 1 of 2)."""
    (tmp_path / "prompts.txt").write_text("a lighthouse at dawn\n\n")
    rc, _, err = cli(capsys, "--prompts-file", tmp_path / "prompts.txt", "--model", components, "--size", 512,
                     "--kv-compress", "avgpool", "--steps", 2, "--seed", 0, "--out", tmp_path / "out")
    assert rc == 0 and "position-embedding interpolation" in err
    image = Image.open(tmp_path / "out" / "00000-0.png")
    assert image.size == (512, 512) and image.text["parameters"].startswith("a lighthouse at dawn\nNegative")
    model = hub.load_model(f"{components}/transformer", kv_compress="uniform:0-1")
    assert model.config.kv_compress_layers == (0, 1) and model.config.kv_compress_mode == "uniform"


def fake_hub_cache(cache, repo, files):
    """Lay `files` ({path in repo: local file}) out as huggingface_hub caches a download of `repo`."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    base = os.path.join(cache, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(base, "refs"), exist_ok=True)
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(commit)
    for name, src in files.items():
        dst = os.path.join(base, "snapshots", commit, name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy(src, dst)
    return os.path.join(base, "snapshots", commit)


def tree(root, *folders):
    return {os.path.relpath(os.path.join(d, f), root): os.path.join(d, f)
            for folder in folders for d, _, fs in os.walk(os.path.join(root, folder)) for f in fs}


def test_released_name_resolves_offline_from_the_hf_cache(components, tmp_path, capsys):
    """`--model 256` in a fresh process with HF_HUB_OFFLINE=1: transformer from the model's repo, T5, tokenizer and
    VAE from the shared components repo, all found in the cache; the image equals the local-folder run."""
    cache = tmp_path / "hub"
    fake_hub_cache(cache, hub.MODELS["256"][0], tree(components, "transformer"))
    fake_hub_cache(cache, hub.COMPONENTS_REPO, tree(components, "text_encoder", "tokenizer", "vae"))
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    args = ["a cat on a mat", "--size", 256, "--steps", 2, "--seed", 0, "--device", "cpu"]
    done = subprocess.run([sys.executable, "sample.py", *map(str, args), "--model", "256", "--out", tmp_path / "a"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert cli(capsys, *args, "--model", components, "--out", tmp_path / "b")[0] == 0
    got = Image.open(tmp_path / "a" / "00000-0.png")
    assert got.text["parameters"].endswith("Model: 256")
    assert np.array_equal(pixels(tmp_path / "a" / "00000-0.png"), pixels(tmp_path / "b" / "00000-0.png"))


def test_hub_prefers_what_is_already_cached(components, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    repo = hub.MODELS["1024"][0]
    # a diffusers pipeline download of the model: T5 and the VAE come from it, the shared repo is never asked
    snapshot = fake_hub_cache(tmp_path, repo, tree(components, "transformer", "text_encoder", "tokenizer", "vae"))
    assert hub.resolve_components(None, repo)["vae"] == os.path.join(snapshot, "vae")
    assert hub.resolve_model("1024") == (os.path.join(snapshot, "transformer"), "1024", repo)
    # only the official .pth is cached: it is used instead of downloading the diffusers copy
    pth = tmp_path / "x.pth"
    pth.write_bytes(b"")
    official = fake_hub_cache(tmp_path, hub.OFFICIAL_REPO, {hub.MODELS["2K"][1]: pth})
    assert hub.resolve_model("2k")[:2] == (os.path.join(official, hub.MODELS["2K"][1]), "2K")


# ------------------------------------------------------------------------------------------- bad input

# (each bad argument, before anything loads: tests/test_cli.py)

def test_missing_weights_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    rc, _, err = cli(capsys, "a cat", "--model", "1024")
    assert rc == 2
    assert "cannot get transformer/config.json of https://huggingface.co/PixArt-alpha/PixArt-Sigma-XL-2-1024-MS" in err
    assert "--model" in err and "HF_HUB_OFFLINE" in err


def test_corrupt_checkpoints(components, tmp_path, capsys):
    bad = tmp_path / "PixArt-Sigma-XL-2-1024-MS.pth"
    bad.write_bytes(b"\x80\x02garbage" * 100)
    rc, _, err = cli(capsys, "a cat", "--model", bad, "--components", components, "--size", 256)
    assert rc == 2 and str(bad) in err
    folder = tmp_path / "transformer"
    shutil.copytree(f"{components}/transformer", folder)
    file = folder / "diffusion_pytorch_model.safetensors"
    file.write_bytes(file.read_bytes()[:5000])  # an interrupted download
    rc, _, err = cli(capsys, "a cat", "--model", folder, "--components", components, "--size", 256)
    assert rc == 2 and str(file) in err and "download it again" in err


def test_long_prompt_warns_and_truncates(components, tmp_path, capsys):
    prompt = " ".join(WORDS * 8)  # ~ 600 tokens
    with pytest.warns(UserWarning, match="tokens"):
        rc, _, _ = cli(capsys, prompt, "--model", components, "--steps", 1, "--seed", 0, "--out", tmp_path)
    assert rc == 0 and os.listdir(tmp_path) == ["00000-0.png"]
    assert Image.open(tmp_path / "00000-0.png").size == (256, 256)  # no --size: the model's training size


def test_help_lists_defaults_and_examples(capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # however the terminal width wrapped it
    assert e.value.code == 0 and "(default: 4.5)" in text and "Examples:" in text and "--kv-compress" in text
