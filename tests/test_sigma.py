"""sigma.py against diffusers' PixArtTransformer2DModel, the official checkpoint layout and the KV-compression maths."""
import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from diffusers import PixArtTransformer2DModel

import sigma

TINY = sigma.SigmaConfig(depth=2, hidden_size=64, num_heads=4, caption_channels=32, caption_tokens=16,
                         sample_size=16, pe_interpolation=1.0)
KEYS = os.path.join(os.path.dirname(__file__), "data", "pixart_sigma_xl2_keys.json")


def diffusers_model(config, std=0.2):
    """diffusers' model for our config, every tensor random (its zero-inits would hide mistakes)."""
    kwargs = {k: v for k, v in sigma.diffusers_config(config).items() if not k.startswith("_")}
    ref = PixArtTransformer2DModel(**kwargs).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, std)
    return ref


def inputs(config, N=3, H=12, W=20, lengths=(5, 11, 1)):  # 16 caption slots, 11 used at most
    x = torch.randn(N, config.in_channels, H, W)
    t = torch.tensor([3.0, 500.0, 999.0])[:N]
    y = torch.randn(N, config.caption_tokens, config.caption_channels)
    mask = torch.zeros(N, config.caption_tokens)
    for i, n in enumerate(lengths[:N]):
        mask[i, :n] = 1
    return x, t, y, mask


def reference_forward(ref, x, t, y, mask):
    with torch.no_grad():
        return ref(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask).sample


@pytest.mark.parametrize("pe_interpolation,H,W", [(1.0, 12, 20), (0.5, 16, 16), (2.0, 20, 8)])
def test_matches_diffusers(pe_interpolation, H, W):
    config = dataclasses.replace(TINY, pe_interpolation=pe_interpolation)
    ref = diffusers_model(config)
    model = sigma.load_checkpoint(ref.state_dict(), config)
    x, t, y, mask = inputs(config, H=H, W=W)
    with torch.no_grad():
        out = model(x, t, y, mask)
    expected = reference_forward(ref, x, t, y, mask)
    assert out.shape == (3, 8, H, W)
    assert (out - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max())


def test_padded_caption_tokens_are_ignored():
    model = sigma.load_checkpoint(diffusers_model(TINY).state_dict(), TINY)
    x, t, y, mask = inputs(TINY)
    y2 = y.clone()
    y2[mask == 0] = torch.randn_like(y2[mask == 0]) * 100  # garbage behind the mask must not matter
    with torch.no_grad():
        assert torch.equal(model(x, t, y, mask), model(x, t, y2, mask))


@pytest.mark.slow
def test_matches_diffusers_full_xl2():
    config = sigma.CONFIGS["1024"]
    ref = diffusers_model(config, std=0.02)
    model = sigma.load_checkpoint(ref.state_dict(), config)
    assert sum(p.numel() for p in model.parameters()) == 610_856_096  # the released XL/2 checkpoints' count
    x, t, y, mask = inputs(config, N=2, H=8, W=12, lengths=(7, 120))
    with torch.no_grad():
        out = model(x, t, y, mask)
    expected = reference_forward(ref, x, t, y, mask)
    assert (out - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max())


# -- the official .pth layout ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def official_state_dict():
    """Random tensors with exactly the keys and shapes of the official PixArtMS_XL_2 (with KV layers)."""
    spec = json.load(open(KEYS))
    gen = torch.Generator().manual_seed(0)
    sd = {e["key"]: torch.empty(e["shape"]).uniform_(-0.05, 0.05, generator=gen) for e in spec["keys"]}
    kv_only = {e["key"] for e in spec["keys"] if e["kv_compress_only"]}
    return sd, kv_only, spec


@pytest.mark.slow
def test_official_layout_loads(official_state_dict, tmp_path):
    sd, kv_only, spec = official_state_dict
    plain = {k: v for k, v in sd.items() if k not in kv_only}
    assert len(plain) == spec["num_keys_without_kv"]
    path = tmp_path / "PixArt-Sigma-XL-2-1024-MS.pth"
    torch.save({"state_dict": plain}, path)  # the released files: a dict with "state_dict"
    model = sigma.load_checkpoint(path)
    assert model.config == sigma.CONFIGS["1024"]  # depth, width, training size and pe scale all inferred
    assert torch.equal(model.y_embedder.y_embedding, plain["y_embedder.y_embedding"])
    assert sum(p.numel() for p in model.parameters()) == spec["num_parameters_without_kv"]

    model = sigma.load_checkpoint(sd)  # with KV-compressed layers 14..27
    assert model.config.kv_compress_layers == tuple(range(14, 28)) and model.config.kv_compress_mode == "conv"
    assert sum(p.numel() for p in model.parameters()) == spec["num_parameters_with_kv"]
    assert torch.equal(model.blocks[20].attn.sr.weight, sd["blocks.20.attn.sr.weight"])
    with torch.no_grad():  # and it runs, on a non-square grid that the compression divides
        out = model(*inputs(model.config, N=2, H=8, W=12, lengths=(3, 300)))
    assert out.shape == (2, 8, 8, 12) and torch.isfinite(out).all()


@pytest.mark.slow
def test_official_layout_errors_are_readable(official_state_dict):
    sd, kv_only, _ = official_state_dict
    bad = {k: v for k, v in sd.items() if k not in kv_only}
    bad["blocks.3.mlp.fc1.weight"] = torch.zeros(10, 1152)
    bad["blocks.3.attn.extra"] = torch.zeros(1)
    del bad["blocks.5.cross_attn.proj.bias"]
    with pytest.raises(ValueError) as e:
        sigma.load_checkpoint(bad, sigma.CONFIGS["1024"])
    msg = str(e.value)
    assert "blocks.3.mlp.fc1.weight: checkpoint (10, 1152) vs model (4608, 1152)" in msg
    assert "unexpected keys: blocks.3.attn.extra" in msg
    assert "missing keys: blocks.5.cross_attn.proj.bias" in msg


def test_adding_kv_compression_to_a_plain_checkpoint(capsys):
    plain = sigma.load_checkpoint(diffusers_model(TINY).state_dict(), TINY)
    kv = sigma.load_checkpoint(plain.state_dict(), dataclasses.replace(TINY, kv_compress_layers=(1,)))
    assert "KV compression added to blocks [1]" in capsys.readouterr().err
    assert torch.all(kv.blocks[1].attn.sr.weight == 0.25) and torch.all(kv.blocks[1].attn.sr.bias == 0)
    assert torch.all(kv.blocks[1].attn.norm.weight == 1) and torch.all(kv.blocks[1].attn.norm.bias == 0)


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        sigma.load_checkpoint(tmp_path / "nope.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="could not read"):
        sigma.load_checkpoint(corrupt)
    with pytest.raises(ValueError, match="not a PixArt checkpoint"):
        sigma.load_checkpoint({"foo.weight": torch.zeros(1)})
    model = sigma.PixArtSigma(TINY)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(torch.randn(1, 4, 7, 8), torch.tensor([1]), torch.randn(1, 16, 32), torch.ones(1, 16))
    kv = sigma.PixArtSigma(dataclasses.replace(TINY, kv_compress_layers=(0,)))
    with pytest.raises(ValueError, match="token grid divisible by 2"):
        kv(torch.randn(1, 4, 6, 8), torch.tensor([1]), torch.randn(1, 16, 32), torch.ones(1, 16))
    with pytest.raises(ValueError, match="kv_compress_mode"):
        sigma.SigmaConfig(kv_compress_mode="pool")


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling this would run a shell command
        return (os.system, (f"touch {self.path}",))


def test_pickled_code_is_never_executed(tmp_path):
    path, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    torch.save({"state_dict": {"x": Payload(marker)}}, path)
    with pytest.raises(ValueError, match="weights only"):
        sigma.load_checkpoint(path)
    assert not marker.exists()


# -- our formats ---------------------------------------------------------------------------------

def test_save_diffusers_loads_in_diffusers(tmp_path):
    model = sigma.load_checkpoint(diffusers_model(TINY).state_dict(), TINY)
    sigma.save_diffusers(model, tmp_path / "transformer")
    ref = PixArtTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    x, t, y, mask = inputs(TINY)
    expected = reference_forward(ref, x, t, y, mask)
    with torch.no_grad():
        assert (model(x, t, y, mask) - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max())
    again = sigma.load_checkpoint(tmp_path / "transformer")  # and back, config from config.json
    assert again.config == dataclasses.replace(TINY, caption_tokens=300)  # diffusers doesn't record the length
    with pytest.raises(ValueError, match="no KV compression"):
        sigma.save_diffusers(sigma.PixArtSigma(dataclasses.replace(TINY, kv_compress_layers=(1,))), tmp_path / "kv")


def test_own_checkpoint_carries_its_config(tmp_path):
    config = dataclasses.replace(TINY, kv_compress_layers=(1,), pe_interpolation=0.5)
    model = sigma.PixArtSigma(config)
    sigma.save_checkpoint(model, tmp_path / "ours.safetensors")
    again = sigma.load_checkpoint(tmp_path / "ours.safetensors")
    assert again.config == config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


# -- KV token compression --------------------------------------------------------------------------

def attention_on_patch_constant_tokens(mode, N=2, h=6, w=8, D=64):
    """Self-attention outputs with and without compression on tokens constant over every 2×2 patch."""
    coarse = torch.randn(N, D, h // 2, w // 2)
    x = F.interpolate(coarse, scale_factor=2, mode="nearest").flatten(2).transpose(1, 2)  # (N, h·w, D)
    plain, compressed = sigma.SelfAttention(D, 4), sigma.SelfAttention(D, 4, kv_compress=mode)
    compressed.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        return plain(x, (h, w)), compressed(x, (h, w))


@pytest.mark.parametrize("mode", ["avgpool", "uniform"])
def test_kv_compression_is_exact_on_patch_constant_keys(mode):
    # 4 identical keys with 4 identical values weigh the same in softmax as 1 key: nothing changes.
    plain, compressed = attention_on_patch_constant_tokens(mode)
    assert (plain - compressed).abs().max() < 1e-5


def test_kv_conv_is_avgpool_plus_layernorm():
    D, N, h, w = 64, 2, 6, 8
    conv, pool = sigma.SelfAttention(D, 4, kv_compress="conv"), sigma.SelfAttention(D, 4, kv_compress="avgpool")
    with torch.no_grad():
        conv.sr.weight.fill_(0.25), conv.sr.bias.zero_()  # the averaging init
        pool.load_state_dict(conv.state_dict(), strict=False)
        kv = torch.randn(N, h * w, D)
        c, p = conv.compress(kv, (h, w)), pool.compress(kv, (h, w))
        assert c.shape == p.shape == (N, h * w // 4, D)
        assert (c - F.layer_norm(p, (D,), eps=1e-5)).abs().max() < 1e-5


def official_kv_attention(attn, x, H, W):
    """The official AttentionKVCompress forward ('conv' sampling), re-derived in plain tensor maths."""
    B, N, C = x.shape
    S = attn.num_heads
    q, k, v = attn.qkv(x).reshape(B, N, 3, C).unbind(2)

    def down(z):  # (B, N, C) -> conv over the (H, W) grid -> LayerNorm
        z = z.reshape(B, H, W, C).permute(0, 3, 1, 2)
        z = F.conv2d(z, attn.sr.weight, attn.sr.bias, stride=2, groups=C).reshape(B, C, -1).permute(0, 2, 1)
        return F.layer_norm(z, (C,), attn.norm.weight, attn.norm.bias, eps=1e-5)

    k, v = down(k), down(v)
    q, k, v = (z.reshape(B, -1, S, C // S).transpose(1, 2) for z in (q, k, v))
    weights = (q @ k.transpose(-1, -2) / math.sqrt(C // S)).softmax(-1)  # (B, S, N, N/4)
    return attn.proj((weights @ v).transpose(1, 2).reshape(B, N, C))


def test_kv_conv_matches_official_semantics():
    D, h, w = 64, 6, 10
    attn = sigma.SelfAttention(D, 4, kv_compress="conv")
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)  # trained-looking conv and norm, not the init
        x = torch.randn(2, h * w, D)
        assert (attn(x, (h, w)) - official_kv_attention(attn, x, h, w)).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["conv", "uniform", "avgpool"])
def test_kv_model_runs_with_fewer_keys(mode):
    config = dataclasses.replace(TINY, kv_compress_layers=(0, 1), kv_compress_mode=mode)
    model = sigma.PixArtSigma(config)
    seen = []
    model.blocks[0].attn.register_forward_hook(lambda m, a, o: seen.append(m.compress(torch.cat([a[0], a[0]]), a[1]).shape))
    with torch.no_grad():
        out = model(*inputs(config, H=8, W=12))
    assert out.shape == (3, 8, 8, 12) and seen[0] == (6, 24 // 4, 64)


# -- training-side switches ------------------------------------------------------------------------

def test_scratch_init_starts_at_zero_output_and_checkpointing_keeps_gradients():
    model = sigma.PixArtSigma(TINY)
    x, t, y, mask = inputs(TINY)
    with torch.no_grad():
        assert torch.all(model(x, t, y, mask) == 0)  # final layer zero-initialised (DiT)
        assert all(torch.all(b.cross_attn.proj.weight == 0) for b in model.blocks)
        for p in model.final_layer.parameters():
            p.normal_(0, 0.1)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(x, t, y, mask).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_position_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    for h, w, base, interp in [(16, 16, 16, 1.0), (8, 24, 64, 2.0), (32, 12, 128, 4.0)]:
        ours = sigma.pos_embed_2d(1152, h, w, base, interp)
        theirs = get_2d_sincos_pos_embed(1152, (h, w), base_size=base, interpolation_scale=interp, output_type="pt")
        assert ours.shape == (h * w, 1152) and (ours - theirs.float()).abs().max() < 1e-5


def test_truncated_safetensors_is_reported(tmp_path):
    sigma.save_checkpoint(sigma.PixArtSigma(TINY), tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="could not read .*cut.safetensors as safetensors"):
        sigma.load_checkpoint(tmp_path / "cut.safetensors")
