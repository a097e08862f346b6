"""sigma.py against diffusers' PixArtTransformer2DModel, the official checkpoint layout and the KV-compression maths."""
import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from diffusers import PixArtTransformer2DModel

import hub
import sigma
import weights
from official import official_layout

TINY = sigma.SigmaConfig(depth=2, hidden_size=64, num_heads=4, caption_channels=32, caption_tokens=16,
                         sample_size=16, pe_interpolation=1.0)
KEYS = os.path.join(os.path.dirname(__file__), "data", "pixart_sigma_xl2_keys.json")


def diffusers_model(config, std=0.2):
    """diffusers' model for our config, every tensor random (its zero-inits would hide mistakes)."""
    kwargs = {k: v for k, v in weights.diffusers_config(config).items() if not k.startswith("_")}
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
    model = weights.load_checkpoint(ref.state_dict(), config)
    x, t, y, mask = inputs(config, H=H, W=W)
    with torch.no_grad():
        out = model(x, t, y, mask)
    expected = reference_forward(ref, x, t, y, mask)
    assert out.shape == (3, 8, H, W)
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()  # fp32, other kernels: 1e-5 of the output's scale


def test_padded_caption_tokens_are_ignored():
    model = weights.load_checkpoint(diffusers_model(TINY).state_dict(), TINY)
    x, t, y, mask = inputs(TINY)
    y2 = y.clone()
    y2[mask == 0] = torch.randn_like(y2[mask == 0]) * 100  # garbage behind the mask must not matter
    with torch.no_grad():
        assert torch.equal(model(x, t, y, mask), model(x, t, y2, mask))


@pytest.mark.slow
def test_matches_diffusers_full_xl2():
    config = sigma.CONFIGS["1024"]
    ref = diffusers_model(config, std=0.02)
    model = weights.load_checkpoint(ref.state_dict(), config)
    assert sum(p.numel() for p in model.parameters()) == 610_856_096  # the released XL/2 checkpoints' count
    x, t, y, mask = inputs(config, N=2, H=8, W=12, lengths=(7, 120))
    with torch.no_grad():
        out = model(x, t, y, mask)
    expected = reference_forward(ref, x, t, y, mask)
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()  # fp32, other kernels: 1e-5 of the output's scale


# -- the official .pth layout ----------------------------------------------------------------------

def test_official_layout_is_the_released_one():
    """The tests' own diffusers -> official mapping (tests/official.py), applied to a full-size diffusers model,
    gives exactly the released key list and shapes; and sigma's modules carry exactly those names and shapes."""
    spec = json.load(open(KEYS))
    with torch.device("meta"):  # shapes only: no memory, no init work
        ref = PixArtTransformer2DModel(**{k: v for k, v in weights.diffusers_config(sigma.CONFIGS["1024"]).items()
                                          if not k.startswith("_")})
        model = sigma.PixArtSigma(dataclasses.replace(sigma.CONFIGS["1024"], kv_compress_layers=range(14, 28)))
    official = official_layout(ref.state_dict(), torch.empty(300, 4096, device="meta"),
                               torch.empty(1, 64 * 64, 1152, device="meta"))
    released = {e["key"]: tuple(e["shape"]) for e in spec["keys"]}
    assert {k: tuple(v.shape) for k, v in official.items()} == {
        k: s for k, s in released.items() if k not in {e["key"] for e in spec["keys"] if e["kv_compress_only"]}}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: s for k, s in released.items() if k != "pos_embed"}  # with the KV layers of the official config


def test_official_pth_matches_diffusers(tmp_path):
    """A diffusers model written into the released .pth layout by the tests' own mapping (fused attn.qkv as
    [q; k; v], cross_attn.kv_linear as [k; v]) and loaded by path, config inferred: diffusers' outputs."""
    config = dataclasses.replace(TINY, hidden_size=144, num_heads=2, sample_size=32, pe_interpolation=0.5,
                                 caption_tokens=300)  # heads of 72 and pe = size/512, as every released model
    ref = diffusers_model(config, std=0.1)  # at 0.2 and width 144 scores outgrow diffusers' -10000 mask bias
    y_embedding = torch.randn(300, config.caption_channels)
    sd = official_layout(ref.state_dict(), y_embedding, torch.zeros(1, 16 * 16, 144))  # pos_embed: 16² tokens
    torch.save({"state_dict": sd}, tmp_path / "PixArt-Sigma-tiny.pth")
    model = weights.load_checkpoint(tmp_path / "PixArt-Sigma-tiny.pth")
    assert model.config == config and torch.equal(model.y_embedder.y_embedding, y_embedding)
    x, t, y, mask = inputs(config)
    with torch.no_grad():
        out = model(x, t, y, mask)
    expected = reference_forward(ref, x, t, y, mask)
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()  # fp32, other kernels: 1e-5 of the output's scale


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_ddp_and_compile_prefixes_are_stripped(prefix, tmp_path):
    # DDP saves 'module.x', torch.compile '_orig_mod.x'; train.py's compile(DDP(model)) '_orig_mod.module.x'
    ref = diffusers_model(TINY)
    model = weights.load_checkpoint(ref.state_dict(), TINY)
    torch.save({"state_dict": {prefix + k: v for k, v in model.state_dict().items()}}, tmp_path / "wrapped.pth")
    for src in (tmp_path / "wrapped.pth", {prefix + k: v for k, v in ref.state_dict().items()}):  # ours, diffusers'
        loaded = weights.load_checkpoint(src, TINY).state_dict()
        assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items())


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
    model = weights.load_checkpoint(path)
    assert model.config == sigma.CONFIGS["1024"]  # depth, width, training size and pe scale all inferred
    assert torch.equal(model.y_embedder.y_embedding, plain["y_embedder.y_embedding"])
    assert sum(p.numel() for p in model.parameters()) == spec["num_parameters_without_kv"]

    model = weights.load_checkpoint(sd)  # with KV-compressed layers 14..27
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
        weights.load_checkpoint(bad, sigma.CONFIGS["1024"])
    msg = str(e.value)
    assert "blocks.3.mlp.fc1.weight: checkpoint (10, 1152) vs model (4608, 1152)" in msg
    assert "unexpected keys: blocks.3.attn.extra" in msg
    assert "missing keys: blocks.5.cross_attn.proj.bias" in msg


def test_adding_kv_compression_to_a_plain_checkpoint(capsys):
    plain = weights.load_checkpoint(diffusers_model(TINY).state_dict(), TINY)
    kv = weights.load_checkpoint(plain.state_dict(), dataclasses.replace(TINY, kv_compress_layers=(1,)))
    assert "KV compression added to blocks [1]" in capsys.readouterr().err
    assert torch.all(kv.blocks[1].attn.sr.weight == 0.25) and torch.all(kv.blocks[1].attn.sr.bias == 0)
    assert torch.all(kv.blocks[1].attn.norm.weight == 1) and torch.all(kv.blocks[1].attn.norm.bias == 0)


def test_added_tensors_live_beside_the_checkpoint():
    """A state dict on another device (a GPU's; meta here) gives a model wholly on that device: the KV layers and
    the null caption that loading adds too (bench/gpu_check.py found them left on the CPU)."""
    sd = {k: v.to("meta") for k, v in diffusers_model(TINY).state_dict().items()}
    kv = weights.load_checkpoint(sd, dataclasses.replace(TINY, kv_compress_layers=(1,)))
    assert {v.device.type for v in kv.state_dict().values()} == {"meta"}


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        weights.load_checkpoint(tmp_path / "nope.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="could not read"):
        weights.load_checkpoint(corrupt)
    with pytest.raises(ValueError, match="not a PixArt checkpoint"):
        weights.load_checkpoint({"foo.weight": torch.zeros(1)})
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
        weights.load_checkpoint(path)
    assert not marker.exists()


# -- our formats ---------------------------------------------------------------------------------

def test_save_diffusers_loads_in_diffusers(tmp_path):
    model = weights.load_checkpoint(diffusers_model(TINY).state_dict(), TINY)
    weights.save_diffusers(model, tmp_path / "transformer")
    ref = PixArtTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    x, t, y, mask = inputs(TINY)
    expected = reference_forward(ref, x, t, y, mask)
    with torch.no_grad():
        assert (model(x, t, y, mask) - expected).abs().max() <= 1e-5 * expected.abs().max()  # of the output's scale
    again = weights.load_checkpoint(tmp_path / "transformer")  # and back, config from config.json
    assert again.config == dataclasses.replace(TINY, caption_tokens=300)  # diffusers doesn't record the length
    with pytest.raises(ValueError, match="no KV compression"):
        weights.save_diffusers(sigma.PixArtSigma(dataclasses.replace(TINY, kv_compress_layers=(1,))), tmp_path / "kv")


def test_own_checkpoint_carries_its_config(tmp_path):
    config = dataclasses.replace(TINY, kv_compress_layers=(1,), pe_interpolation=0.5)
    model = sigma.PixArtSigma(config)
    weights.save_checkpoint(model, tmp_path / "ours.safetensors")
    again = weights.load_checkpoint(tmp_path / "ours.safetensors")
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
    assert (plain - compressed).abs().max() <= 1e-5 * plain.abs().max()  # softmax over 4x the keys: fp32 rounding only


def test_kv_conv_is_avgpool_plus_layernorm():
    D, N, h, w = 64, 2, 6, 8
    conv, pool = sigma.SelfAttention(D, 4, kv_compress="conv"), sigma.SelfAttention(D, 4, kv_compress="avgpool")
    with torch.no_grad():
        conv.sr.weight.fill_(0.25), conv.sr.bias.zero_()  # the averaging init
        pool.load_state_dict(conv.state_dict(), strict=False)
        kv = torch.randn(N, h * w, D)
        c, p = conv.compress(kv, (h, w)), pool.compress(kv, (h, w))
        assert c.shape == p.shape == (N, h * w // 4, D)
        want = F.layer_norm(p, (D,), eps=1e-5)
        assert (c - want).abs().max() <= 1e-5 * want.abs().max()  # a conv's sum vs a mean: fp32 rounding


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
        want = official_kv_attention(attn, x, h, w)
        assert (attn(x, (h, w)) - want).abs().max() <= 1e-5 * want.abs().max()  # fp32, fused vs written-out attention


def reference_kv_attention(attn, x, H, W, mode):
    """Softmax attention written out, over keys and values compressed by hand on the H×W grid."""
    B, N, C = x.shape
    S = attn.num_heads
    q, k, v = attn.qkv(x).reshape(B, N, 3, C).unbind(2)

    def down(z):  # (B, N, C) -> (B, N/4, C)
        grid = z.reshape(B, H // 2, 2, W // 2, 2, C)  # (B, H/2, row in patch, W/2, column in patch, C)
        if mode == "uniform":  # official 'uniform' sampling: x[:, :, ::2, ::2], the top-left token of each patch
            return grid[:, :, 0, :, 0].reshape(B, -1, C)
        return grid.mean((2, 4)).reshape(B, -1, C)  # avgpool: the mean of each 2×2 patch

    k, v = down(k), down(v)
    q, k, v = (z.reshape(B, -1, S, C // S).transpose(1, 2) for z in (q, k, v))
    weights = (q @ k.transpose(-1, -2) / math.sqrt(C // S)).softmax(-1)  # (B, S, N, N/4)
    return attn.proj((weights @ v).transpose(1, 2).reshape(B, N, C))


def kv_reference(attn, x, H, W, mode):
    return official_kv_attention(attn, x, H, W) if mode == "conv" else reference_kv_attention(attn, x, H, W, mode)


@pytest.mark.parametrize("mode", ["uniform", "avgpool"])
def test_parameter_free_kv_modes_match_attention_over_compressed_keys(mode):
    D, h, w = 64, 6, 10
    attn = sigma.SelfAttention(D, 4, kv_compress=mode)
    with torch.no_grad():
        x = torch.randn(2, h * w, D)  # every token different: which one a patch keeps matters
        want = reference_kv_attention(attn, x, h, w, mode)
        assert (attn(x, (h, w)) - want).abs().max() <= 1e-5 * want.abs().max()  # fp32, fused vs written-out attention


@pytest.mark.parametrize("mode", ["conv", "uniform", "avgpool"])
def test_kv_model_compresses_exactly_the_configured_blocks(mode):
    """The whole model with compression in block 1 of 2 = the plain model with block 1's self-attention
    replaced by the reference above; and that differs from no compression."""
    config = dataclasses.replace(TINY, kv_compress_layers=(1,), kv_compress_mode=mode)
    model = sigma.PixArtSigma(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # random everywhere: the zero-inits would hide the attention
    plain = weights.load_checkpoint({k: v for k, v in model.state_dict().items() if ".attn.sr." not in k
                                   and ".attn.norm." not in k}, TINY)
    x, t, y, mask = inputs(config, H=8, W=12)
    with torch.no_grad():
        out, uncompressed = model(x, t, y, mask), plain(x, t, y, mask)
        plain.blocks[1].attn.forward = lambda z, hw: kv_reference(model.blocks[1].attn, z, *hw, mode)
        expected = plain(x, t, y, mask)
    # outputs of magnitude ~14: 1e-5 of that (an absolute 1e-5 is 6 float32 ulps there, which AMD EPYC exceeds)
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (out - uncompressed).abs().max() > 1e-3 * expected.abs().max()


def test_default_kv_layers_are_the_official_deep_half():
    official = tuple(json.load(open(KEYS))["config"]["kv_compress_config"]["kv_compress_layer"])  # 14..27
    assert sigma.KV_DEEP_HALF == official
    assert hub.parse_kv_compress("avgpool", 28) == ("avgpool", official)  # sample.py --kv-compress MODE
    assert hub.parse_layers("deep", 28) == official  # train.py --kv-compress-layers deep


def test_one_grammar_for_a_list_of_blocks():
    # sample.py's --kv-compress MODE:LAYERS and train.py's --kv-compress-layers read their lists alike
    assert hub.parse_layers("0,1,20-22", 28) == (0, 1, 20, 21, 22) == hub.parse_kv_compress("conv:20-22,0,1", 28)[1]
    assert hub.parse_kv_compress("uniform:deep", 8) == ("uniform", (4, 5, 6, 7)) == hub.parse_kv_compress("uniform", 8)
    assert hub.parse_layers("deep") is None and hub.parse_layers("3,5") == (3, 5)  # depth not known yet: syntax only
    with pytest.raises(ValueError, match="--kv-compress-layers '14-': give 'deep', a range such as 14-27"):
        hub.parse_layers("14-", 28)
    with pytest.raises(ValueError, match="--kv-compress-layers '27-28': the model has blocks 0-27, not 28"):
        hub.parse_layers("27-28", 28)


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
    # the same forward recomputed: equal but for fp32 rounding, relative to the largest gradient
    assert grads[0].abs().max() > 0 and (grads[0] - grads[1]).abs().max() <= 1e-5 * grads[0].abs().max()


def test_position_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    for h, w, base, interp in [(16, 16, 16, 1.0), (8, 24, 64, 2.0), (32, 12, 128, 4.0)]:
        ours = sigma.pos_embed_2d(1152, h, w, base, interp)
        theirs = get_2d_sincos_pos_embed(1152, (h, w), base_size=base, interpolation_scale=interp, output_type="pt")
        # sin and cos in [-1, 1]: float32 against diffusers' float64, relative to the table's magnitude
        assert ours.shape == (h * w, 1152) and (ours - theirs.float()).abs().max() <= 1e-5 * theirs.abs().max()


def test_truncated_safetensors_is_reported(tmp_path):
    weights.save_checkpoint(sigma.PixArtSigma(TINY), tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="could not read .*cut.safetensors as safetensors"):
        weights.load_checkpoint(tmp_path / "cut.safetensors")
