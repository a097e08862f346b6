"""weights.py's shared pieces: the one mismatch report (as every loader gives it), the atomic write, a run's latest
checkpoint. The layouts themselves are checked against the reference libraries in test_sigma.py, test_t5.py,
test_vae.py, test_lora.py and test_export.py."""
import dataclasses
import os

import pytest
import torch
from safetensors.torch import save_file

import sigma
import vae
import weights

TINY = sigma.SigmaConfig(depth=2, hidden_size=64, num_heads=4, caption_channels=32, caption_tokens=16,
                         sample_size=16, pe_interpolation=1.0)


def test_mismatch_report_names_missing_unexpected_and_misshaped_keys():
    expected = {"a.weight": torch.zeros(4, 2), "b.bias": torch.zeros(3), "c.weight": torch.zeros(5)}
    weights.check_keys({"a.weight": torch.ones(4, 2), "b.bias": (3,), "c.weight": torch.ones(5)}, expected, "f", "m")
    with pytest.raises(ValueError) as e:
        weights.check_keys({"a.weight": torch.ones(2, 4), "c.weight": torch.ones(5), "d.extra": torch.ones(1)},
                           expected, "file.safetensors", "the tiny model", "(a hint)")
    msg = str(e.value)
    assert msg.startswith("file.safetensors does not fit the tiny model:")
    assert "missing keys: b.bias (3,)" in msg and "unexpected keys: d.extra" in msg
    assert "shape mismatches: a.weight: checkpoint (2, 4) vs model (4, 2)" in msg and msg.endswith("(a hint)")
    many = {f"k{i}": torch.zeros(1) for i in range(11)}
    with pytest.raises(ValueError, match=r"missing keys: k0 \(1,\), .*k7 \(1,\) … \(\+3\)$"):
        weights.check_keys({}, many, "f", "m")  # the first 8 named, the rest counted


def test_every_loader_reports_through_it(tmp_path):
    """The DiT, the VAE and T5 name their keys the same way (the fast version of the full-size DiT test)."""
    sd = sigma.PixArtSigma(TINY).state_dict()
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(10, 64)
    sd["blocks.1.attn.extra"] = torch.zeros(1)
    del sd["blocks.0.cross_attn.proj.bias"]
    with pytest.raises(ValueError) as e:
        weights.load_checkpoint(sd, TINY)
    assert "state dict does not fit the model config (depth 2, width 64, KV layers [])" in str(e.value)
    assert "blocks.1.mlp.fc1.weight: checkpoint (10, 64) vs model (256, 64)" in str(e.value)
    assert "unexpected keys: blocks.1.attn.extra" in str(e.value)
    assert "missing keys: blocks.0.cross_attn.proj.bias (64,)" in str(e.value)

    config = vae.VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4)
    sd = vae.AutoencoderKL(config).state_dict()
    del sd["decoder.conv_out.bias"]
    save_file(sd, tmp_path / "vae.safetensors")
    with pytest.raises(ValueError, match=r"vae.safetensors does not fit .*\n  missing keys: decoder.conv_out.bias \(3,\)"):
        weights.load_vae(str(tmp_path / "vae.safetensors"), config=config)


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "latest"
    with weights.atomic(str(path)) as tmp, open(tmp, "w") as f:
        f.write("step_1")
    with pytest.raises(KeyboardInterrupt):
        with weights.atomic(str(path)) as tmp:
            open(tmp, "w").write("ste")  # killed half-way
            raise KeyboardInterrupt
    assert path.read_text() == "step_1" and os.listdir(tmp_path) == ["latest"]  # nothing left aside
    os.makedirs(tmp_path / ".folder.tmp" / "old")  # what a kill -9 left behind is cleared by the next write
    with weights.atomic(str(tmp_path / "folder")) as tmp:
        os.makedirs(os.path.join(tmp, "new"))
    assert os.listdir(tmp_path / "folder") == ["new"] and sorted(os.listdir(tmp_path)) == ["folder", "latest"]


def test_latest_checkpoint_and_its_weights(tmp_path):
    assert weights.latest_checkpoint(str(tmp_path)) is None  # no checkpoint yet
    step = tmp_path / "step_0000002"
    os.makedirs(step)
    (tmp_path / "latest").write_text("step_0000002\n")
    assert weights.latest_checkpoint(str(tmp_path)) == str(step)
    model = sigma.PixArtSigma(dataclasses.replace(TINY, depth=1))
    weights.save_checkpoint(model, str(step / "model.safetensors"))
    assert weights.step_weights(str(step)) == str(step / "model.safetensors")
    weights.save_checkpoint(model, str(step / "ema.safetensors"))
    assert weights.step_weights(str(step)) == str(step / "ema.safetensors")  # EMA weights when the run kept them
    assert weights.find_checkpoint(str(tmp_path)) == str(step / "ema.safetensors")
    assert weights.checkpoint_config(str(step / "model.safetensors")) == model.config
