"""train.py: exact resume, DDP ranks = one process, and the weak-to-strong stages (train.build_model); shared helpers
of the training tests (run_args, tiny, run_train). CAME, buckets, the cache and the quick start have their own files."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import cli
import diffusion
import quickstart
import sigma
import train
import weights

REPO = os.path.join(os.path.dirname(__file__), "..")
TINY_DIT = dict(depth=2, hidden_size=32, num_heads=2, patch_size=2)  # patched into quickstart.DIT for speed


def run_args(out, *extra):
    return ["--out", str(out), "--image-size", "16", "--batch-size", "4", "--log-every", "1",
            "--warmup", "2", "--save-every", "1000", "--caption-dropout", "0.25", *map(str, extra)]


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(quickstart, "DIT", {**quickstart.DIT, **TINY_DIT})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast, and immune to a busy machine
    yield
    torch.set_num_threads(threads)


def run_train(argv):
    """python train.py ARGV, in-process -> the trained model."""
    return train.main(cli.parse_train_args(argv))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---------------------------------------------------------------------------------------------- CAME


# ---------------------------------------------------------------------------------------------- buckets and data


def write_png(path, h, w, color):
    Image.fromarray(np.full((h, w, 3), color, np.uint8)).save(path)


# ---------------------------------------------------------------------------------------------- the loop


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_continues_exactly(tmp_path, tiny, grad_accum):
    accum = ("--grad-accum", grad_accum)  # 2: the data stream restarts at micro-batch step × 2
    straight = snapshot(quickstart.train(run_args(tmp_path / "a", "--steps", 5, "--ema", 0.9, *accum)))
    quickstart.train(run_args(tmp_path / "b", "--steps", 3, "--ema", 0.9, *accum))
    resumed = snapshot(quickstart.train(run_args(tmp_path / "b", "--steps", 5, "--ema", 0.9, "--resume", *accum)))
    assert max_diff(straight, resumed) == 0.0
    ema_a, ema_b = (load_file(str(tmp_path / r / "step_0000005" / "ema.safetensors")) for r in "ab")
    assert max_diff(ema_a, ema_b) == 0.0 and max_diff(ema_a, straight) > 1e-4  # EMA state resumed too
    log = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    ref = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    assert [r["loss"] for r in log] == [r["loss"] for r in ref]  # the same loss curve, step for step
    # the same command without --resume would train and keep none of it (the step folders exist): refused
    with pytest.raises(ValueError, match="already holds a run .latest: step_0000005.: add --resume"):
        quickstart.train(run_args(tmp_path / "b", "--steps", 5))


@pytest.mark.parametrize("optimizer,tolerance,key_bias_tolerance", [("adamw", 1e-6, 1e-6), ("came", 2e-5, 1e-3)])
def test_ddp_two_ranks_match_one_process(tmp_path, tiny, optimizer, tolerance, key_bias_tolerance, free_port):
    """2 gloo ranks × batch 2 through torchrun = 1 process × batch 4, 2 micro-batches per step (the first one
    under no_sync). AdamW: 1e-6. CAME: 2e-5 (measured 5e-6), but for the attention key biases, whose gradient is
    zero in theory (softmax ignores a shift shared by all keys): CAME's scale-free step turns their round-off,
    which differs between 1×4 and 2×2 samples, into steps of up to lr (measured 6.1e-4 after 3 steps at 1e-3)."""
    grad_accum = 2
    worker = tmp_path / "worker.py"
    worker.write_text(
        f"import os, sys\nsys.path.insert(0, {REPO!r})\nimport train\nfrom safetensors.torch import save_file\n"
        f"import quickstart\nquickstart.DIT.update({TINY_DIT!r})\n"
        f"model = quickstart.train(sys.argv[1:])\n"
        f"save_file(model.state_dict(), os.path.join(sys.argv[sys.argv.index('--out') + 1], "
        f"'rank%s.safetensors' % os.environ['RANK']))\n")
    common = ("--steps", 3, "--optimizer", optimizer, "--lr", 1e-3, "--grad-accum", grad_accum)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          free_port, str(worker), *run_args(tmp_path / "ddp", "--batch-size", 2, *common)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (load_file(str(tmp_path / "ddp" / f"rank{r}.safetensors")) for r in (0, 1))
    assert max_diff(r0, r1) == 0.0  # identical on both ranks
    single = snapshot(quickstart.train(run_args(tmp_path / "one", "--batch-size", 4, *common)))
    args = cli.parse_train_args(run_args(tmp_path / "zero"), quickstart.DEFAULTS, need_data=False, own_components=True)
    torch.manual_seed(args.seed)  # as train.main before it builds the model
    init = snapshot(train.build_model(args, torch.device("cpu"), sigma.SigmaConfig(**quickstart.DIT), vae_factor=1))
    assert max_diff(single, init) > 1e-3  # it trained
    D, key_bias = TINY_DIT["hidden_size"], []
    diff = {k: (r0[k] - single[k]).abs() for k in r0}
    for k, d in diff.items():  # fused biases: attn.qkv = [q; k; v], cross_attn.kv_linear = [k; v]
        part = slice(D, 2 * D) if k.endswith("attn.qkv.bias") else slice(0, D) if k.endswith("kv_linear.bias") else None
        if part:
            key_bias.append(d[part].clone())
            d[part] = 0
    assert max(d.max().item() for d in diff.values()) <= tolerance  # in units of lr (1e-3): a fraction of one step
    assert torch.cat(key_bias).max().item() <= key_bias_tolerance


# ---------------------------------------------------------------------------------------------- weak-to-strong stages
def test_stage_new_vae_starts_from_pixart_alpha(tmp_path):
    """Stage 1 starts from a PixArt-α .pth: micro-condition embedders dropped, 120-token null caption resized."""
    cfg = sigma.SigmaConfig(depth=2, hidden_size=64, num_heads=4, caption_channels=32, caption_tokens=8,
                            sample_size=16, pe_interpolation=1.0)
    sd = sigma.PixArtSigma(cfg).state_dict()
    sd |= {"csize_embedder.mlp.0.weight": torch.randn(64, 256), "ar_embedder.mlp.0.weight": torch.randn(64, 256),
           "pos_embed": torch.zeros(1, 64, 64)}  # α-1024-MS extras; pos_embed: 8×8 tokens = a 16-latent grid
    torch.save({"state_dict": sd}, tmp_path / "alpha.pth")
    args = cli.parse_train_args(["--data", ".", "--no-buckets", "--init", str(tmp_path / "alpha.pth"), "--image-size", "128",
                             "--caption-tokens", "16"])
    model = train.build_model(args, torch.device("cpu"))
    assert model.config.caption_tokens == 16 and model.y_embedder.y_embedding.shape == (16, 32)
    assert (model.config.sample_size, model.config.pe_interpolation) == (16, 16 / 64)
    new = model.state_dict()
    assert all(torch.equal(new[k], v) for k, v in sd.items() if k in new and k != "y_embedder.y_embedding")
    assert not any(k.startswith(("csize", "ar_")) for k in new)


def test_stage_higher_resolution_recomputes_positions(tmp_path):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    cfg = sigma.SigmaConfig(depth=2, hidden_size=64, num_heads=4, caption_channels=32, caption_tokens=16,
                            sample_size=16, pe_interpolation=1.0)
    weights.save_checkpoint(sigma.PixArtSigma(cfg), str(tmp_path / "low.safetensors"))
    args = cli.parse_train_args(["--data", ".", "--no-buckets", "--init", str(tmp_path / "low.safetensors"), "--image-size", "256",
                             "--caption-tokens", "16", "--pe-interpolation", "2"])
    model = train.build_model(args, torch.device("cpu"))
    assert (model.config.sample_size, model.config.pe_interpolation) == (32, 2.0)
    pos = model.pos_embed(16, 16, "cpu", torch.float64)  # the 32-latent grid: 16×16 tokens
    ref = get_2d_sincos_pos_embed(64, (16, 16), base_size=16, interpolation_scale=2.0, output_type="pt")
    torch.testing.assert_close(pos.float(), ref.float().reshape(256, 64), rtol=0, atol=1e-5)  # sin, cos: |x| <= 1
    low = weights.load_checkpoint(str(tmp_path / "low.safetensors")).pos_embed(8, 8, "cpu", torch.float64)
    torch.testing.assert_close(pos.view(16, 16, 64)[::2, ::2].reshape(64, 64), low)  # same span [0, 8)


def test_stage_higher_resolution_keeps_the_position_span(tmp_path):
    """pe_interpolation follows the size from the model's own value (old × new/old), for any base: the quick
    start's 16 px at 1.0 -> 32 px at 2.0, as the released 512 px at 1.0 -> 1024 px at 2.0 (size/512)."""
    for pixels, base_pe, factor, size, expected in [(16, 1.0, 1, 32, 2.0), (512, 1.0, 8, 1024, 2.0), (256, 0.5, 8, 2048, 4.0)]:
        cfg = sigma.SigmaConfig(depth=1, hidden_size=32, num_heads=2, caption_channels=16, caption_tokens=4,
                                sample_size=pixels // factor, pe_interpolation=base_pe)
        weights.save_checkpoint(sigma.PixArtSigma(cfg), str(tmp_path / "low.safetensors"))
        args = cli.parse_train_args(["--data", ".", "--no-buckets", "--init", str(tmp_path / "low.safetensors"), "--image-size", str(size),
                                 "--caption-tokens", "4"])
        model = train.build_model(args, torch.device("cpu"), vae_factor=factor)
        assert (model.config.sample_size, model.config.pe_interpolation) == (size // factor, expected)


def test_stage_kv_compression_starts_near_the_trained_loss(tmp_path, tiny):
    trained = quickstart.train(run_args(tmp_path, "--steps", 60, "--batch-size", 16, "--caption-dropout", 0))
    ckpt = str(tmp_path / "step_0000060" / "model.safetensors")
    args = cli.parse_train_args(run_args(tmp_path / "kv", "--init", ckpt, "--kv-compress-layers", "1"), quickstart.DEFAULTS,
                                need_data=False, own_components=True)
    kv = train.build_model(args, torch.device("cpu"), vae_factor=1)
    assert kv.config.kv_compress_layers == (1,) and hasattr(kv.blocks[1].attn, "sr")
    scratch = sigma.PixArtSigma(trained.config)
    ds = quickstart.ShapesDataset(16)
    items = [ds[10_000 + i] for i in range(64)]
    text = train.load_encoders(args, trained.config.caption_tokens, torch.device("cpu"),
                               quickstart.components(str(tmp_path))).captions
    y, mask = text([it["captions"][0] for it in items])
    x0 = torch.stack([it["image"] for it in items]) * quickstart.PIXEL_SCALE  # what the quick start trains on
    g = torch.Generator().manual_seed(0)
    t, noise = torch.randint(0, 1000, (64,), generator=g), torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        loss = {name: diffusion.training_losses(m.eval(), x0, t, y, mask, noise)["mse"].mean().item()
                for name, m in dict(plain=trained, kv=kv, scratch=scratch).items()}
    assert loss["plain"] < 0.8 * loss["scratch"], loss
    assert abs(loss["kv"] - loss["plain"]) < 0.25 * (loss["scratch"] - loss["plain"]), loss


