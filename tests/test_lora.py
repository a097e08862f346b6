"""lora.py against PEFT on diffusers' PixArtTransformer2DModel: adapters trained by train.py load in PEFT, PEFT's
adapters (every official target, the patch conv included) run here, sample.py --lora equals diffusers' pipeline."""
import copy
import json
import os

import numpy as np
import pytest
import torch
from diffusers import PixArtTransformer2DModel
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors.torch import load_file, save_file

import checkpoints
import hub
import lora
import quickstart
import sample
import sigma
import weights
from test_sigma import TINY, diffusers_model, inputs, reference_forward

# the target list of the official LoRA script (PixArt-sigma train_scripts/train_pixart_lora_hf.py)
OFFICIAL_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "proj",
                    "linear", "linear_1", "linear_2"]
QUICK_DIT = dict(depth=2, hidden_size=32, num_heads=2, patch_size=2)  # patched into quickstart.DIT for speed


def peft_lora(ref, folder, std=0.05, seed=0, **config):
    """PEFT's LoRA on a copy of diffusers' model, every A and B random (B = 0 would hide any mistake), saved by PEFT."""
    config = dict(r=4, lora_alpha=6, target_modules=OFFICIAL_TARGETS) | config
    model = get_peft_model(copy.deepcopy(ref), LoraConfig(**config)).to(ref.dtype).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(folder)
    return model


def peft_forward(model, x, t, y, mask):
    with torch.no_grad():
        return model(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask).sample


def ours(ref, config=TINY):
    """Our model with diffusers' weights, in their dtype (a copy: merge writes into the weights)."""
    return weights.load_checkpoint(copy.deepcopy(ref.state_dict()), config).to(ref.dtype)


def close(a, b, tol=1e-5):
    return (a - b).abs().max() <= tol * max(1.0, b.abs().max())


def fp64(config=TINY):
    """diffusers' model and inputs in float64, values that float32 holds exactly: on these random weights PEFT's
    own fp32 outputs, merged vs unmerged, differ by 2.5e-5 of the output scale; in float64 both agree to ~1e-13."""
    return diffusers_model(config).double(), [v.double() for v in inputs(config)]


# ---------------------------------------------------------------------------------------------- PEFT's files here
@pytest.mark.parametrize("config", [
    {},  # every official target: fused q/k/v and k/v, the patch-embedding conv, adaLN, both MLPs, proj_out
    dict(use_rslora=True, rank_pattern={"attn1.to_k": 2}, alpha_pattern={"proj_out": 3.0, "linear_1": 1.5}),
    dict(target_modules=["to_q", "to_v"]),  # a fused layer with a part missing: attn1's k gets no adapter
])
def test_peft_lora_runs_here_as_in_peft(tmp_path, config):
    ref, (x, t, y, mask) = fp64()
    model = peft_lora(ref, tmp_path, **config)
    expected = peft_forward(model, x, t, y, mask)
    assert not close(reference_forward(ref, x, t, y, mask), expected, 0.05)  # the LoRA changes the output a lot
    assert close(lora.merge(ours(ref), [lora.read(str(tmp_path))])(x, t, y, mask).detach(), expected, 1e-10)
    # the adapter file directly, and diffusers' pipeline-level layout: 'transformer.' keys, the LoraConfig as metadata
    sd = load_file(tmp_path / "adapter_model.safetensors")
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    save_file({"transformer." + k.removeprefix("base_model.model."): v for k, v in sd.items()},
              tmp_path / "pytorch_lora_weights.safetensors",
              {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in cfg.items()})})
    for path in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors"):
        assert close(lora.merge(ours(ref), [lora.read(str(tmp_path / path))])(x, t, y, mask).detach(), expected, 1e-10)


def test_scales_and_two_loras_add_as_in_peft(tmp_path):
    ref, (x, t, y, mask) = fp64()
    model = peft_lora(ref, tmp_path / "a", seed=1)
    peft_lora(ref, tmp_path / "b", seed=2, r=2, lora_alpha=2, target_modules=["to_v", "ff.net.2", "proj"])
    model.load_adapter(str(tmp_path / "b"), adapter_name="b")
    model.base_model.set_adapter(["default", "b"])  # both active: their outputs add
    for layer in model.modules():
        if isinstance(layer, LoraLayer) and "default" in layer.scaling:
            layer.scaling["default"] *= 0.5
    merged = lora.merge(ours(ref), [lora.read(f"{tmp_path / 'a'}:0.5"), lora.read(str(tmp_path / "b"))])
    assert close(merged(x, t, y, mask).detach(), peft_forward(model, x, t, y, mask), 1e-10)
    base = ours(ref)
    zero = lora.merge(ours(ref), [lora.read(f"{tmp_path / 'a'}:0")])
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in zero.state_dict().items())  # scale 0 = no LoRA


def test_conversions_are_inverse_and_fused_equals_split():
    model = lora.add(sigma.PixArtSigma(TINY), rank=3, alpha=5, targets="all")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    mine = lora.adapters(model)
    peft = lora.to_peft(mine)
    assert peft["base_model.model.transformer_blocks.1.attn1.to_k.lora_A.weight"].shape == (3, 64)
    assert peft["base_model.model.pos_embed.proj.lora_B.weight"].shape == (64, 3, 1, 1)
    again, scale = lora.convert_peft(peft, dict(r=3, lora_alpha=5))
    assert scale == 5 / 3 and again.keys() == mine.keys() and all(torch.equal(again[k], mine[k]) for k in mine)
    # the fused adapter of attn.qkv is the three adapters of to_q, to_k, to_v: (α/r)·B_k·A_k is k's rows of ΔW
    layer = model.blocks[0].attn.qkv
    x = torch.randn(5, 64)
    A, B = (peft[f"base_model.model.transformer_blocks.0.attn1.to_k.lora_{n}.weight"] for n in "AB")
    with torch.no_grad():
        k_rows = (layer(x) - layer.base(x))[:, 64:128]
    want = 5 / 3 * x @ A.T @ B.T  # fp32 products in another order: 1e-5 of their magnitude
    assert (k_rows - want).abs().max() <= 1e-5 * want.abs().max()


# ---------------------------------------------------------------------------------------------- train.py
def run_args(out, *extra):
    return ["--out", str(out), "--batch-size", "4", "--log-every", "1", "--save-every", "1000", "--warmup", "1",
            "--preview-every", "0", "--caption-dropout", "0.25", *map(str, extra)]


@pytest.fixture
def base(tmp_path, monkeypatch):
    """A random tiny quick-start DiT saved as our checkpoint in a quick-start-like run folder (sample.json, T5)."""
    monkeypatch.setattr(quickstart, "DIT", {**quickstart.DIT, **QUICK_DIT})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path / "base"
    quickstart.components(str(folder))
    checkpoints.save_run_settings(str(folder), quickstart.components(str(folder)), 4.0)
    model = sigma.PixArtSigma(sigma.SigmaConfig(**quickstart.DIT))
    with torch.no_grad():  # random everywhere: the zero-inits (final layer, cross-attention out) would hide the LoRA
        for p in model.parameters():
            p.normal_(0, 0.2)
    weights.save_checkpoint(model, str(folder / "model.safetensors"))
    yield model
    torch.set_num_threads(threads)


def test_train_lora_loads_in_peft_and_samples(tmp_path, base, capsys):
    run = tmp_path / "run"
    model = quickstart.train(run_args(run, "--init", tmp_path / "base" / "model.safetensors", "--lora-rank", 4,
                                "--lora-alpha", 6, "--lora-targets", "all", "--steps", 3, "--lr", 1e-2))
    step = run / "step_0000003"
    assert sorted(os.listdir(step)) == ["adapter_config.json", "adapter_model.safetensors", "trainer.pt"]
    config = json.load(open(step / "adapter_config.json"))
    assert config["base_model_name_or_path"] == str(tmp_path / "base" / "model.safetensors")
    assert (config["r"], config["lora_alpha"]) == (4, 6)
    frozen = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in frozen.items() if k != "y_embedder.y_embedding")
    # diffusers + PEFT on the same base: the same DiT output as our model with its adapters, unmerged and merged
    weights.save_diffusers(base, tmp_path / "diffusers")
    ref = PeftModel.from_pretrained(PixArtTransformer2DModel.from_pretrained(tmp_path / "diffusers"), str(step)).eval()
    cfg = model.config
    x, t, y, mask = inputs(cfg, H=16, W=16)
    expected = peft_forward(ref, x, t, y, mask)
    with torch.no_grad():
        assert not close(base.eval()(x, t, y, mask), expected)  # it trained
        assert close(model.eval()(x, t, y, mask), expected)
        merged = lora.merge(weights.load_checkpoint(str(tmp_path / "base" / "model.safetensors")), [lora.read(str(run))])
        assert close(merged(x, t, y, mask), expected)
    # sample.py --model <LoRA run> = its recorded base + the adapter; = --model BASE --lora STEP; != the base alone
    prompt, out = "a red circle on a blue background", tmp_path / "out"
    for extra in (["--model", run], ["--model", tmp_path / "base", "--lora", step], ["--model", tmp_path / "base"]):
        assert sample.main([prompt, "--seed", "1", "--steps", "4", "--out", str(out), *map(str, extra)]) == 0
    images = [np.asarray(Image.open(out / f"0000{i}-1.png"), dtype=np.int16) for i in range(3)]
    assert np.array_equal(images[0], images[1]) and np.abs(images[0] - images[2]).max() > 10
    assert Image.open(out / "00000-1.png").text["parameters"].endswith(f"base/model.safetensors, LoRA: {run}:1")


def test_lora_resume_continues_exactly(tmp_path, base):
    common = ["--init", tmp_path / "base" / "model.safetensors", "--lora-rank", 2, "--lora-alpha", 3, "--lr", 1e-2,
              "--grad-checkpoint"]
    straight = lora.adapters(quickstart.train(run_args(tmp_path / "a", *common, "--steps", 4)))
    quickstart.train(run_args(tmp_path / "b", *common, "--steps", 2))
    resumed = lora.adapters(quickstart.train(run_args(tmp_path / "b", *common, "--steps", 4, "--resume")))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight) and straight["blocks.0.mlp.fc1.lora_B"].abs().max() > 0
    logs = [[json.loads(line)["loss"] for line in open(tmp_path / r / "log.jsonl")] for r in "ab"]
    assert logs[0] == logs[1]
    with pytest.raises(ValueError, match="other LoRA settings"):  # another rank than the checkpoint's
        quickstart.train(run_args(tmp_path / "b", *common[:3], 4, "--steps", 5, "--resume"))


@pytest.mark.bf16_attention  # conftest.py
def test_lora_trains_under_bf16_autocast(tmp_path, base):
    common = ["--init", tmp_path / "base" / "model.safetensors", "--lora-rank", 2, "--lora-alpha", 3, "--lr", 1e-2,
              "--grad-checkpoint"]
    bf16 = quickstart.train(run_args(tmp_path / "c", *common, "--steps", 2, "--bf16"))  # bf16 autocast: adapters train
    assert all(v.dtype == torch.float32 for v in lora.adapters(bf16).values())
    assert lora.adapters(bf16)["blocks.1.attn.qkv.lora_B"].abs().max() > 0


def test_step_zero_is_the_base_model():
    model = weights.load_checkpoint(diffusers_model(TINY).state_dict(), TINY)
    x, t, y, mask = inputs(TINY)
    with torch.no_grad():
        before = model(x, t, y, mask)
        assert torch.equal(lora.add(model, 4, 4, "all")(x, t, y, mask), before)  # B = 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


@pytest.mark.parametrize("extra,message", [
    (["--lora-rank", 4, "--ema", 0.9], "keeps no EMA"),
    (["--lora-rank", 4, "--lora-targets", "attn.qkv,mlp.fc3"], "--lora-targets 'attn.qkv,mlp.fc3'"),
    (["--lora-rank", 4, "--init", "scratch"], "adapts a trained model"),
    (["--lora-rank", 4, "--kv-compress-layers", "1"], "cannot train new KV-compression layers"),
    (["--lora-alpha", 8], "add --lora-rank"),  # would be ignored
])
def test_train_refuses_bad_lora_flags(tmp_path, extra, message):
    init = ["--init", "missing.safetensors"]  # never read: the flags are checked first
    with pytest.raises(ValueError, match=message):
        quickstart.train(run_args(tmp_path, *init, *map(str, extra)))


def test_sample_refuses_a_lora_that_does_not_fit(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert sample.main(["a cat", "--model", str(bad), "--lora", str(tmp_path / "nope")]) == 2
    assert "--lora " + str(tmp_path / "nope") + ": no such file or folder" in capsys.readouterr().err
    # a LoRA for a wider model: one line naming the first keys that do not fit
    wide = dict(TINY.__dict__, hidden_size=128)
    peft_lora(diffusers_model(sigma.SigmaConfig(**wide)), tmp_path / "wide", target_modules=["to_q"])
    weights.save_checkpoint(sigma.PixArtSigma(TINY), str(tmp_path / "tiny.safetensors"))
    checkpoints.save_run_settings(str(tmp_path), quickstart.components(str(tmp_path)), 4.0)  # no T5 or VAE is needed: the LoRA fails first
    assert sample.main(["a cat", "--model", str(tmp_path / "tiny.safetensors"), "--lora", str(tmp_path / "wide")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "8 of its 8 tensors do not fit the model (depth 2, width 64)" in err
    assert "base_model.model.transformer_blocks.0.attn1.to_q.lora_A.weight (4, 128) (layer weight (64, 64))" in err


def test_ddp_two_ranks_train_the_same_lora_as_one_process(tmp_path, base, free_port):
    """Each rank draws its own A (per-rank seeds); DDP starts them all from rank 0's, so 2 ranks × 2 images end
    with the adapters of 1 process × 4 images."""
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    worker = tmp_path / "worker.py"
    worker.write_text(
        f"import os, sys\nsys.path.insert(0, {repo!r})\nimport lora, quickstart, train\n"
        f"from safetensors.torch import save_file\nquickstart.DIT.update({QUICK_DIT!r})\n"
        f"model = quickstart.train(sys.argv[1:])\nsave_file(lora.adapters(model), os.path.join(sys.argv[sys.argv.index('--out') "
        f"+ 1], 'rank%s.safetensors' % os.environ['RANK']))\n")
    common = ["--init", tmp_path / "base" / "model.safetensors", "--lora-rank", 2, "--lr", 1e-2, "--steps", 2]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          free_port, str(worker), *run_args(tmp_path / "ddp", *common, "--batch-size", 2)],
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (load_file(tmp_path / "ddp" / f"rank{r}.safetensors") for r in (0, 1))
    single = lora.adapters(quickstart.train(run_args(tmp_path / "one", *common, "--batch-size", 4)))
    assert all(torch.equal(r0[k], r1[k]) for k in r0) and single["blocks.0.attn.qkv.lora_B"].abs().max() > 1e-3
    # Adam at lr 1e-2 turns the round-off of averaging 2×2 vs 1×4 gradients into ~2e-5 (measured 1.8e-5); a missing
    # all-reduce or a per-rank A differs by ~lr = 1e-2
    assert max((r0[k] - single[k]).abs().max().item() for k in single) <= 1e-4  # in units of lr: 1/100 of one step


# ---------------------------------------------------------------------------------------------- sample.py
@pytest.fixture(scope="module")
def components(tmp_path_factory):
    from test_sample import write_components
    return write_components(str(tmp_path_factory.mktemp("pipeline") / "PixArt-Sigma-tiny"))


def test_sample_py_lora_equals_diffusers_pipeline_with_peft(components, tmp_path, capsys):
    """A PEFT LoRA on every official target of the tiny pipeline's transformer: `sample.py --lora` gives diffusers'
    PixArtSigmaPipeline with that PeftModel within 1/255 (scale 0 = no LoRA: test_scales_and_two_loras_add_as_in_peft)."""
    from test_sample import diffusers_pipeline
    pipe = diffusers_pipeline(components)
    peft_lora(pipe.transformer, tmp_path / "lora", std=0.05)
    pipe.transformer = PeftModel.from_pretrained(pipe.transformer, str(tmp_path / "lora")).eval()
    pipe.set_progress_bar_config(disable=True)
    prompt = "a small cactus with a happy face in the sahara desert"
    expected = pipe(prompt, num_inference_steps=4, height=128, width=128, generator=torch.Generator().manual_seed(3),
                    clean_caption=False).images[0]
    out = tmp_path / "out"
    for spec in (tmp_path / "lora", f"{tmp_path / 'lora'}:0"):
        assert sample.main([prompt, "--model", components, "--size", "128", "--steps", "4", "--seed", "3",
                            "--out", str(out), "--lora", str(spec)]) == 0
    got, plain = (np.asarray(Image.open(out / f"0000{i}-3.png").convert("RGB"), dtype=np.int16) for i in range(2))
    assert np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1 and np.abs(got - plain).max() > 20
    assert Image.open(out / "00001-3.png").text["parameters"].endswith(f"transformer, LoRA: {tmp_path / 'lora'}:0")
