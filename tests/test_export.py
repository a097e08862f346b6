"""export.py: a short train.py run of a tiny latent-space model -> a pipeline folder that diffusers'
PixArtSigmaPipeline.from_pretrained loads as is and that draws the image sample.py draws from the same folder."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline
from PIL import Image
from safetensors.torch import load_file

import export
from cli import parse_train_args
import hub
import sample
import train
import weights
from test_sample import fake_hub_cache, pixels, tree, write_components

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers + numpy 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny components written by diffusers/transformers, and 2 steps of train.py on them with EMA kept."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast, and immune to a busy machine
    root = tmp_path_factory.mktemp("export")
    comps = write_components(str(root / "components"))
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(["a red fox in snow", "a lighthouse on a cliff at dawn"][i % 2])
    run = root / "run"
    train.main(parse_train_args(["--data", str(images), "--components", comps, "--init", f"{comps}/transformer",
                                     "--image-size", "256", "--no-buckets", "--batch-size", "2", "--steps", "2",
                                     "--optimizer", "adamw", "--lr", "1e-3", "--no-lr-scaling", "--warmup", "1",
                                     "--ema", "0.5", "--workers", "0", "--out", str(run)]))
    torch.set_num_threads(threads)
    return comps, run


def cli(capsys, *args):
    rc = export.main([str(a) for a in args])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return rc, out.out, out.err


def test_exported_run_draws_the_same_image_in_diffusers_and_sample_py(trained, tmp_path, capsys, one_thread):
    comps, run = trained
    out = tmp_path / "exported"
    rc, stdout, _ = cli(capsys, run, out)
    assert rc == 0 and "ema.safetensors" in stdout
    # the EMA weights, not the last ones, are the transformer written (the null caption is not part of diffusers')
    written, ema = weights.load_checkpoint(str(out / "transformer")).state_dict(), load_file(run / "step_0000002" / "ema.safetensors")
    last = load_file(run / "step_0000002" / "model.safetensors")
    assert all(torch.equal(written[k], ema[k]) for k in ema if k != "y_embedder.y_embedding")
    assert any(not torch.equal(ema[k], last[k]) for k in ema)
    # components hard-linked from the folder the run recorded, not copied
    assert os.stat(out / "vae" / "diffusion_pytorch_model.safetensors").st_ino == \
        os.stat(f"{comps}/vae/diffusion_pytorch_model.safetensors").st_ino
    assert sorted(tree(str(out), "text_encoder", "tokenizer", "vae")) == sorted(tree(comps, "text_encoder", "tokenizer", "vae"))
    # the hand-written scheduler config reads back as diffusers' defaults
    loaded = DPMSolverMultistepScheduler.from_pretrained(out, subfolder="scheduler").config
    default = DPMSolverMultistepScheduler().config
    assert {k: v for k, v in loaded.items() if not k.startswith("_")} == {k: v for k, v in default.items() if not k.startswith("_")}

    pipe = PixArtSigmaPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red fox in snow"
    expected = pipe(prompt, num_inference_steps=5, guidance_scale=4.5, height=256, width=256, clean_caption=False,
                    generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert sample.main([prompt, "--model", str(out), "--steps", "5", "--seed", "3", "--out", str(tmp_path / "png")]) == 0
    a, b = np.asarray(expected, dtype=np.int16), pixels(tmp_path / "png" / "00000-3.png")
    print(f"exported pipeline, diffusers vs sample.py: max difference {np.abs(a - b).max()}/255")
    assert a.shape == b.shape == (256, 256, 3) and a.std() > 10
    assert np.abs(a - b).max() <= 1


def test_the_readme_snippet_runs_quietly(trained, tmp_path, capsys, one_thread):
    """README's diffusers snippet, run as written on an exported run: an image, and no notice on diffusers' logger (by
    default the pipeline warns that the optional bs4 is missing)."""
    import logging
    from diffusers.utils import logging as diffusers_logging
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    snippet = readme.split("### Using a run in diffusers")[1].split("```python\n")[1].split("```")[0]
    out = tmp_path / "exported"
    assert cli(capsys, trained[1], out)[0] == 0
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logging.get_logger("diffusers").addHandler(handler)
    try:
        scope = {}
        exec(snippet.replace('"exported/"', repr(str(out))), scope)
    finally:
        diffusers_logging.get_logger("diffusers").removeHandler(handler)
    assert scope["image"].size == (256, 256)
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def test_a_given_step_and_the_released_components_from_the_cache(trained, tmp_path, monkeypatch, capsys):
    """A step folder exported with the components the run got from train.py's default, the released repo: found
    in the Hugging Face cache (never fetched) and linked from its blobs."""
    comps, run = trained
    step = tmp_path / "step_0000001"
    shutil.copytree(run / "step_0000002", step)
    os.remove(step / "ema.safetensors")
    args = json.loads(torch.load(step / "trainer.pt", weights_only=True)["args"])
    torch.save(dict(args=json.dumps(dict(args, components=None))), step / "trainer.pt")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    rc, _, err = cli(capsys, step, tmp_path / "a")
    assert rc == 2 and "not in the Hugging Face cache" in err and err.count("\n") == 1
    snapshot = fake_hub_cache(tmp_path / "hub", hub.COMPONENTS_REPO, tree(comps, "text_encoder", "tokenizer", "vae"))
    out = tmp_path / "b"
    out.mkdir()  # an empty folder is fine
    rc, stdout, _ = cli(capsys, step, out)
    assert rc == 0 and "model.safetensors" in stdout
    assert os.stat(out / "text_encoder" / "config.json").st_ino == os.stat(f"{snapshot}/text_encoder/config.json").st_ino
    written, last = weights.load_checkpoint(str(out / "transformer")).state_dict(), load_file(step / "model.safetensors")
    assert all(torch.equal(written[k], last[k]) for k in last if k != "y_embedder.y_embedding")


def test_links_reach_the_data_or_fall_back_to_a_copy(tmp_path, monkeypatch):
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "blob").write_text("{}")
    os.symlink(tmp_path / "blob", tmp_path / "src" / "sub" / "f.json")  # as the Hugging Face cache's snapshots
    (tmp_path / "src" / "top.txt").write_text("top")
    export.link_tree(str(tmp_path / "src"), str(tmp_path / "linked"))
    assert sorted(tree(str(tmp_path / "linked"), ".")) == ["sub/f.json", "top.txt"]
    assert os.stat(tmp_path / "linked" / "sub" / "f.json", follow_symlinks=False).st_ino == os.stat(tmp_path / "blob").st_ino

    def no_links(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")
    monkeypatch.setattr(os, "link", no_links)
    export.link_tree(str(tmp_path / "src"), str(tmp_path / "copied"))
    assert (tmp_path / "copied" / "sub" / "f.json").read_text() == "{}"
    assert not os.path.islink(tmp_path / "copied" / "sub" / "f.json")


def test_errors_are_one_line(trained, tmp_path, capsys):
    comps, run = trained
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "young").mkdir()
    dangling = tmp_path / "dangling"  # 'latest' names a step folder that was deleted
    dangling.mkdir()
    (dangling / "latest").write_text("step_0000009")
    bare = tmp_path / "bare" / "step_0000002"  # weights without trainer.pt: the components must be named
    shutil.copytree(run / "step_0000002", bare)
    os.remove(bare / "trainer.pt")
    for args, message in [((tmp_path / "missing", tmp_path / "o"), "no run at"),
                          ((tmp_path / "young", tmp_path / "o"), "has no checkpoint yet"),
                          ((dangling, tmp_path / "o"), "holds no model.safetensors"),
                          ((run, tmp_path / "full"), "exists and is not empty"),
                          ((bare, tmp_path / "o"), "does not record the run's components"),
                          ((run, tmp_path / "o", "--components", tmp_path / "nowhere"), "pass --components FOLDER")]:
        rc, _, err = cli(capsys, *args)
        assert rc == 2 and message in err and err.count("\n") == 1, err
        assert not os.path.exists(tmp_path / "o")
    assert cli(capsys, bare, tmp_path / "o", "--components", comps)[0] == 0  # named: fine


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        export.main(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and "python export.py runs/mine exported/" in text and "model_index.json" in text


def test_a_lora_run_exports_merged(trained, tmp_path, capsys, one_thread):
    """A LoRA run on top of the trained run: its adapter merged into transformer/ (diffusers' pipeline loads a full
    DiT), the adapter files beside it in lora/; diffusers draws what sample.py draws from the LoRA run itself."""
    comps, run = trained
    lora_run = tmp_path / "lora_run"
    train.main(parse_train_args(["--data", str(run.parent / "images"), "--components", comps, "--init", str(run),
                                     "--image-size", "256", "--no-buckets", "--batch-size", "2", "--steps", "2",
                                     "--lora-rank", "2", "--lr", "1e-1", "--workers", "0", "--out", str(lora_run)]))
    out = tmp_path / "exported"
    rc, _, err = cli(capsys, lora_run, out)
    assert rc == 0, err
    assert sorted(os.listdir(out / "lora")) == ["adapter_config.json", "adapter_model.safetensors"]
    merged = weights.load_checkpoint(str(out / "transformer")).state_dict()
    base = load_file(run / "step_0000002" / "ema.safetensors")  # what the LoRA run trained on: the run's EMA weights
    assert any((merged[k] - base[k]).abs().max() > 1e-4 for k in base if k != "y_embedder.y_embedding")  # merged
    pipe = PixArtSigmaPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red fox in snow"
    expected = pipe(prompt, num_inference_steps=5, guidance_scale=4.5, height=256, width=256, clean_caption=False,
                    generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert sample.main([prompt, "--model", str(lora_run), "--components", comps, "--steps", "5", "--seed", "3",
                        "--out", str(tmp_path / "png")]) == 0
    a, b = np.asarray(expected, dtype=np.int16), pixels(tmp_path / "png" / "00000-3.png")
    assert a.std() > 10 and np.abs(a - b).max() <= 1
