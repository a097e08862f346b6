"""vae.py against diffusers' AutoencoderKL on random weights: encode/decode, the three file layouts,
tiling (against diffusers' own tiling, and seams against untiled), fp16 policy and load errors."""
import json
import re

import pytest
import torch
from diffusers import AutoencoderKL as Reference
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

import vae
import weights

SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
THREE = dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=32)  # up-block reversal matters
SDXL = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)


def reference(scaling_factor=0.5, **config):
    """diffusers' AutoencoderKL with every tensor randomised (GroupNorm affines far from 1/0 so they matter).
    scaling_factor 0.5 by default: a decode that multiplied instead of divided would be off by 4x."""
    n = len(config["block_out_channels"])
    model = Reference(down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                      scaling_factor=scaling_factor, **config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
    return model


def ours(ref, tmp_path, **kw):
    """Ours through the diffusers folder layout (config.json + safetensors): the identity load."""
    ref.save_pretrained(tmp_path / "vae")
    return weights.load_vae(str(tmp_path / "vae"), **kw)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("config", [SMALL, THREE], ids=["small", "three-levels"])
def test_encode_decode_match_diffusers(config, tmp_path):
    ref = reference(**config)
    model = ours(ref, tmp_path)
    assert model.scaling_factor == 0.5
    f = 2 ** (len(config["block_out_channels"]) - 1)
    images, latents = torch.rand(2, 3, 48, 40) * 2 - 1, torch.randn(2, 4, 48 // f, 40 // f)
    with torch.no_grad():
        posterior = ref.encode(images).latent_dist
        assert rel(model.encode(images), posterior.mean * 0.5) <= 1e-5
        sampled = posterior.sample(generator=torch.Generator().manual_seed(7)) * 0.5
        assert rel(model.encode(images, sample=True, generator=torch.Generator().manual_seed(7)), sampled) <= 1e-5
        assert rel(model.decode(latents), ref.decode(latents / 0.5).sample) <= 1e-5


def test_full_sdxl_config_matches_diffusers(tmp_path):
    ref = reference(scaling_factor=0.13025, **SDXL)
    model = ours(ref, tmp_path)
    assert model.config.block_out_channels == SDXL["block_out_channels"] and model.scaling_factor == 0.13025
    images, latents = torch.rand(1, 3, 64, 64) * 2 - 1, torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert rel(model.encode(images), ref.encode(images).latent_dist.mean * 0.13025) <= 1e-5
        assert rel(model.decode(latents), ref.decode(latents / 0.13025).sample) <= 1e-5


def to_ldm(sd, n_levels):
    """diffusers keys -> the original LDM single-file layout, written from the LDM module tree
    (Encoder.down[i].block[j], .downsample, mid.block_1/attn_1/block_2, norm_out; Decoder.up[i] counted from
    the full-resolution end; AttnBlock q/k/v/proj_out as 1x1 convs; ResnetBlock.nin_shortcut)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", k)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
        k = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{n_levels - 1 - int(m[1])}.block.", k)
        k = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{n_levels - 1 - int(m[1])}.upsample.", k)
        k = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
        k = k.replace("mid_block.attentions.0.", "mid.attn_1.").replace("conv_shortcut", "nin_shortcut")
        k = k.replace("group_norm", "norm").replace("to_out.0", "proj_out").replace("conv_norm_out", "norm_out")
        k = re.sub(r"attn_1\.to_([qkv])\.", r"attn_1.\1.", k)
        out[k] = v[:, :, None, None] if "attn_1" in k and v.ndim == 2 else v
    return out


def test_single_file_and_old_attention_layouts_load_the_same_model(tmp_path):
    ref = reference(**THREE)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    ldm = to_ldm(sd, 3)
    assert "decoder.up.0.block.2.norm1.weight" in ldm and ldm["encoder.mid.attn_1.q.weight"].ndim == 4
    back = convert_ldm_vae_checkpoint(ldm, ref.config)  # diffusers' own loader agrees with the test's layout
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    config = vae.VAEConfig(**THREE, scaling_factor=0.5)
    save_file(ldm, tmp_path / "ldm_vae.safetensors")
    save_file({"first_stage_model." + k: v for k, v in ldm.items()} | {"loss.logvar": torch.zeros(())},
              tmp_path / "sd_checkpoint.safetensors")
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {re.sub(r"\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f".{names[m[1]]}.", k): v for k, v in sd.items()}
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in old
    save_file(old, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(dict(ref.config)))
    for path, kw in [(tmp_path / "ldm_vae.safetensors", dict(config=config)),
                     (tmp_path / "sd_checkpoint.safetensors", dict(config=config)), (tmp_path, {})]:
        loaded = weights.load_vae(str(path), **kw).state_dict()
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd), path


def test_tiled_matches_diffusers_tiling(tmp_path):
    ref = reference(**THREE)  # 4 px per latent
    model = ours(ref, tmp_path)
    model.config.tile_latent, model.config.tile_above = 16, 80 * 100  # stride 12 latents, blend 4 latents / 16 px
    ref.enable_tiling()
    ref.tile_latent_min_size, ref.tile_sample_min_size, ref.tile_overlap_factor = 16, 64, 0.25
    latents, images = torch.randn(1, 4, 38, 45), torch.rand(1, 3, 152, 180) * 2 - 1  # ragged last tiles
    with torch.no_grad():
        expected = ref.decode(latents / 0.5).sample
        assert expected.shape == (1, 3, 152, 180)
        assert rel(model.decode(latents, tiled=True), expected) <= 1e-5
        assert rel(model.decode(latents), expected) <= 1e-5  # automatic: 152*180 px > tile_above
        assert rel(model.encode(images, tiled=True), ref.encode(images).latent_dist.mean * 0.5) <= 1e-5
        ref.disable_tiling()
        assert rel(model.decode(latents[:, :, :20, :20]), ref.decode(latents[:, :, :20, :20] / 0.5).sample) <= 1e-5


def test_tiles_leave_no_seams():
    """Tiled vs untiled decode: small differences (each tile has its own GroupNorm statistics and zero-padded
    edges), and no larger jumps at the tile borders than inside the tiles, which a visible seam would be."""
    ref = reference(**SMALL)  # 2 px per latent
    model = vae.AutoencoderKL(vae.VAEConfig(**SMALL, scaling_factor=0.5, tile_latent=32))
    model.load_state_dict(ref.state_dict())
    latents = torch.randn(1, 4, 96, 96)  # 4x4 tiles of 32 latents every 24
    with torch.no_grad():
        full, tiled = model.decode(latents, tiled=False), model.decode(latents, tiled=True)
    assert ((tiled - full).abs().mean() / full.abs().mean()).item() < 0.15  # 0.08 here (unblended tiles: 0.16)
    err = (tiled - full).abs().mean(dim=(0, 1))  # (H, W)
    # tile j owns output pixels [48j, 48j + 48) and fades in from its left/upper neighbour over the first 16
    jumps_x, jumps_y = (err[:, 1:] - err[:, :-1]).abs().mean(0), (err[1:] - err[:-1]).abs().mean(1)
    borders = [48 * j + d - 1 for j in (1, 2, 3) for d in (0, 16)]  # where a hard cut would jump
    for jumps in (jumps_x, jumps_y):
        assert jumps[borders].max() < 2 * jumps.median(), (jumps[borders], jumps.median())  # 1.35x; unblended 15x


def test_attention_never_builds_the_pixel_by_pixel_matrix():
    model = vae.AutoencoderKL(vae.VAEConfig(**SMALL)).eval()
    with torch.no_grad(), torch.profiler.profile() as prof:
        model.decode(torch.randn(1, 4, 64, 64))  # 4096 pixels attend to each other
    ops = {e.key for e in prof.key_averages()}
    assert not ops & {"aten::softmax", "aten::_softmax", "aten::bmm", "aten::baddbmm"}, ops


@pytest.mark.bf16_attention  # conftest.py
def test_fp16_upcasts_the_sdxl_vae_and_refuses_by_hand_bf16_runs(tmp_path):
    ref = reference(**SMALL)  # diffusers' default force_upcast=True, as in SDXL's config.json
    with pytest.warns(UserWarning, match="float16"):
        model = ours(ref, tmp_path, dtype=torch.float16)
    assert model.quant_conv.weight.dtype == torch.float32
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        out = model.decode(latents.half())
        assert out.dtype == torch.float16
        assert rel(out.float(), ref.decode(latents.half().float() / 0.5).sample) <= 1e-3
        with pytest.raises(ValueError, match="float16"):
            model.half().decode(latents.half())
        bf16 = weights.load_vae(str(tmp_path / "vae"), dtype=torch.bfloat16)  # no warning: bf16 does not overflow
        assert bf16.quant_conv.weight.dtype == torch.bfloat16
        assert rel(bf16.decode(latents), ref.decode(latents / 0.5).sample) <= 0.05
    assert vae.SD.force_upcast is False and vae.SD.scaling_factor == 0.18215 and vae.SDXL.scaling_factor == 0.13025


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no VAE weights"):
        weights.load_vae(str(tmp_path / "nothing"))
    ref = reference(**SMALL)
    sd = ref.state_dict()
    del sd["decoder.conv_out.bias"]
    save_file(sd, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="decoder.conv_out.bias"):
        weights.load_vae(str(tmp_path / "broken.safetensors"), config=vae.VAEConfig(**SMALL))
    with pytest.raises(ValueError, match="shape mismatches"):
        save_file(ref.state_dict(), tmp_path / "small.safetensors")
        weights.load_vae(str(tmp_path / "small.safetensors"))  # SDXL config by default
    ref.register_to_config(act_fn="relu")
    ref.save_pretrained(tmp_path / "relu")
    with pytest.raises(ValueError, match="act_fn"):
        weights.load_vae(str(tmp_path / "relu"))
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\)"):
        vae.AutoencoderKL(vae.VAEConfig(**SMALL)).decode(torch.randn(1, 3, 8, 8))
