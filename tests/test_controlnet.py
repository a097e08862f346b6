"""controlnet.py against the official ControlNet-Transformer forward (PixArt-δ, ControlPixArtHalf) re-derived here with
diffusers' modules, the official and diffusers-research file layouts written by the tests' own mappings, and the
closed-form facts: zero-initialised projections or control_scale 0 give exactly the base model; only copies learn."""
import copy
import dataclasses
import json
import os

import pytest
import torch
import torch.nn as nn
from PIL import Image, ImageDraw

import cli
import controlnet
import data
import diffusion
import sigma
import sizes
import weights
from official import BLOCK, FUSED, official_layout
from test_sigma import TINY, diffusers_model, inputs

CONFIG = dataclasses.replace(TINY, depth=6)  # 3 copies feed blocks 1..3; blocks 4, 5 run as in the base
COPIES = 3


def reference(config=CONFIG, copies=COPIES, std=0.2):
    """A diffusers base model and a ControlNet in diffusers' modules, every tensor random (zero-inits included)."""
    ref = diffusers_model(config, std)
    blocks = [copy.deepcopy(ref.transformer_blocks[i]) for i in range(copies)]
    D = config.hidden_size
    before, after = nn.Linear(D, D), nn.ModuleList([nn.Linear(D, D) for _ in range(copies)])
    with torch.no_grad():
        for p in [*(p for b in blocks for p in b.parameters()), *before.parameters(), *after.parameters()]:
            p.normal_(0, std)  # the copies differ from the base blocks, so a copy read from the wrong slot shows
    return ref, blocks, before, after


def official_forward(ref, blocks, before, after, x, t, y, mask, c):
    """ControlPixArtHalf's forward (PixArt-δ §4; REFERENCE.md §9) in diffusers' modules: block 0 runs alone; copy 0
    takes block 0's OUTPUT plus before_proj(c); copy j > 0 takes only copy j-1's output; after_proj(copy j) is added
    to the input of base block j+1."""
    N, _, H, W = x.shape
    p = ref.config.patch_size
    kw = dict(encoder_attention_mask=((1 - mask) * -10000.0)[:, None], encoder_hidden_states=ref.caption_projection(y))
    kw["timestep"], embedded_t = ref.adaln_single(t, {"resolution": None, "aspect_ratio": None}, batch_size=N,
                                                  hidden_dtype=x.dtype)
    h, c = ref.pos_embed(x), ref.pos_embed(c)  # the condition through the base's own patch + position embedding
    h = ref.transformer_blocks[0](h, **kw)
    for j, block in enumerate(blocks):
        c = block(h + before(c) if j == 0 else c, **kw)
        h = ref.transformer_blocks[j + 1](h + after[j](c), **kw)
    for block in ref.transformer_blocks[len(blocks) + 1:]:
        h = block(h, **kw)
    shift, scale = (ref.scale_shift_table[None] + embedded_t[:, None]).chunk(2, dim=1)
    h = ref.proj_out(ref.norm_out(h) * (1 + scale) + shift).view(N, H // p, W // p, p, p, -1)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(N, -1, H, W)


def adapter_state_dict(blocks, before, after):
    """The diffusers research layout (PixArtControlNetAdapterModel), written here from the modules."""
    sd = {f"controlnet_blocks.{i}.transformer_block.{k}": v for i, b in enumerate(blocks) for k, v in b.state_dict().items()}
    sd.update({f"controlnet_blocks.0.before_proj.{k}": v for k, v in before.state_dict().items()})
    sd.update({f"controlnet_blocks.{i}.after_proj.{k}": v for i, a in enumerate(after) for k, v in a.state_dict().items()})
    return sd


def official_state_dict(ref, blocks, before, after):
    """The official ControlNet .pth layout: base_model.<official DiT keys>, controlnet.i.copied_block.<official block
    keys> (the tests' own maps in tests/official.py), controlnet.0.before_proj, controlnet.i.after_proj."""
    T, D = (ref.config.sample_size // ref.config.patch_size) ** 2, ref.config.num_attention_heads * ref.config.attention_head_dim
    base = official_layout(ref.state_dict(), torch.randn(CONFIG.caption_tokens, CONFIG.caption_channels), torch.zeros(1, T, D))
    sd = {f"base_model.{k}": v for k, v in base.items()}
    for i, b in enumerate(blocks):
        theirs, pre = b.state_dict(), f"controlnet.{i}.copied_block."
        sd[pre + "scale_shift_table"] = theirs["scale_shift_table"]
        for s in ("weight", "bias"):
            sd.update({f"{pre}{o}.{s}": theirs[f"{d}.{s}"] for d, o in BLOCK.items()})
            sd.update({f"{pre}{o}.{s}": torch.cat([theirs[f"{d}.{s}"] for d in parts]) for o, parts in FUSED.items()})
        sd.update({f"controlnet.{i}.after_proj.{k}": v for k, v in after[i].state_dict().items()})
    sd.update({f"controlnet.0.before_proj.{k}": v for k, v in before.state_dict().items()})
    return sd


def close(out, expected):  # fp32 ≤ 1e-5 of the output's magnitude: summation order differs between kernels
    return out.shape == expected.shape and (out - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max())


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    ref, blocks, before, after = reference()
    x, t, y, mask = inputs(CONFIG)
    c = torch.randn_like(x)
    with torch.no_grad():
        expected = official_forward(ref, blocks, before, after, x, t, y, mask, c)
    return ref, (blocks, before, after), (x, t, y, mask, c), expected


def test_diffusers_research_layout_matches_the_official_forward(case):
    ref, parts, (x, t, y, mask, c), expected = case
    model = weights.load_controlnet(adapter_state_dict(*parts), weights.load_checkpoint(ref.state_dict(), CONFIG))
    assert len(model.controlnet) == COPIES
    with torch.no_grad():
        assert close(model(x, t, y, mask, control=c), expected)
        assert close(model(x, t, y, mask), official_forward(ref, [], None, None, x, t, y, mask, c))  # no control: the base


def test_official_pth_loads_whole_and_matches(case, tmp_path):
    ref, parts, (x, t, y, mask, c), expected = case
    torch.save({"state_dict": official_state_dict(ref, *parts)}, tmp_path / "PixArt-tiny-ControlNet.pth")
    model = weights.load_checkpoint(tmp_path / "PixArt-tiny-ControlNet.pth", CONFIG)  # heads of 16, not 72: config given
    assert isinstance(model, controlnet.ControlPixArt) and model.config.depth == CONFIG.depth
    with torch.no_grad():
        assert close(model(x, t, y, mask, control=c), expected)
        # a batch of conditions serves classifier-free guidance's doubled batch, in order
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), torch.cat([mask, mask]), control=c)
    assert close(both[:3], expected) and close(both[3:], expected)


def test_our_files_and_diffusers_layout_round_trip(case, tmp_path):
    ref, parts, (x, t, y, mask, c), expected = case
    base = weights.load_checkpoint(ref.state_dict(), CONFIG)
    model = weights.load_controlnet(adapter_state_dict(*parts), base)
    weights.save_controlnet(model, tmp_path / "cn.safetensors")
    weights.save_controlnet_diffusers(model, tmp_path / "adapter")
    assert json.load(open(tmp_path / "adapter" / "config.json")) == {"_class_name": "PixArtControlNetAdapterModel",
                                                                    "num_layers": COPIES}
    written = weights.read_safetensors(tmp_path / "adapter" / "diffusion_pytorch_model.safetensors")[0]
    theirs = adapter_state_dict(*parts)
    assert written.keys() == theirs.keys() and all(torch.equal(written[k], theirs[k]) for k in theirs)
    for src in (tmp_path / "cn.safetensors", tmp_path / "adapter"):
        with torch.no_grad():
            assert close(weights.load_controlnet(src, base)(x, t, y, mask, control=c), expected)
    kv = controlnet.ControlPixArt(sigma.PixArtSigma(dataclasses.replace(CONFIG, kv_compress_layers=(1,))), 2)
    with pytest.raises(ValueError, match="diffusers' adapter has no place for controlnet.1.copied_block.attn"):
        weights.save_controlnet_diffusers(kv, tmp_path / "kv")  # diffusers' blocks do not compress: refused


@pytest.mark.parametrize("kv", [(), (2, 3, 4, 5)])  # KV compression in copied blocks and in base blocks alone
def test_zero_init_and_scale_zero_are_exactly_the_base(kv):
    config = dataclasses.replace(CONFIG, kv_compress_layers=kv, sample_size=16)
    base = sigma.PixArtSigma(config).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.2)
    model = controlnet.ControlPixArt(base, COPIES)
    x, t, y, mask = inputs(config, H=16, W=16)
    c = torch.randn_like(x)
    with torch.no_grad():
        plain = base(x, t, y, mask)
        assert torch.equal(model(x, t, y, mask, control=c), plain)  # zero-initialised projections
        for p in model.controlnet.parameters():
            p.normal_(0, 0.2)
        assert not torch.equal(model(x, t, y, mask, control=c), plain)  # the control now matters…
        assert torch.equal(model(x, t, y, mask, control=c, control_scale=0.0), plain)  # …unless scaled to 0
        assert torch.equal(model(x, t, y, mask), plain)


def test_gradients_reach_only_the_controlnet_and_checkpointing_keeps_them():
    base = sigma.PixArtSigma(CONFIG)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.2)
    model = controlnet.ControlPixArt(base, COPIES)
    with torch.no_grad():
        for p in model.controlnet.parameters():
            p.normal_(0, 0.2)
    x, t, y, mask = inputs(CONFIG)
    c = torch.randn_like(x)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        base.gradient_checkpointing = ckpt
        model(x, t, y, mask, control=c).square().mean().backward()
        assert all(p.grad is None for p in base.parameters())  # frozen: the patch embedding the control uses too
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.controlnet.parameters())
        grads.append(torch.cat([p.grad.flatten() for p in model.controlnet.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6 * grads[0].abs().max())


def test_default_copies_and_bad_input():
    assert controlnet.default_copies(28) == 13 and controlnet.default_copies(6) == 2 and controlnet.default_copies(2) == 1
    base = sigma.PixArtSigma(CONFIG)
    assert len(controlnet.ControlPixArt(base).controlnet) == 2
    with pytest.raises(ValueError, match="copies 1 to 5 blocks"):
        controlnet.ControlPixArt(base, 6)
    x, t, y, mask = inputs(CONFIG)
    with pytest.raises(ValueError, match="control must be a latent shaped like x"):
        controlnet.ControlPixArt(base)(x, t, y, mask, control=x[:, :, :4])


def test_alpha_1024_controlnet_is_refused(case, tmp_path):
    ref, parts, _, _ = case
    sd = official_state_dict(ref, *parts)
    sd["base_model.csize_embedder.mlp.0.weight"] = torch.zeros(CONFIG.hidden_size, 256)
    torch.save({"state_dict": sd}, tmp_path / "PixArt-XL-2-1024-ControlNet.pth")
    with pytest.raises(ValueError, match="PixArt-α's 1024 ControlNet"):
        weights.load_checkpoint(tmp_path / "PixArt-XL-2-1024-ControlNet.pth")
    with pytest.raises(ValueError, match="holds no ControlNet"):
        weights.load_controlnet(ref.state_dict(), weights.load_checkpoint(ref.state_dict(), CONFIG))


# -- ControlNet data (data.py): a condition image beside each image, cropped like it, cached beside its latent ------
def write_png(path, h, w, rgb):
    Image.new("RGB", (w, h), rgb).save(path)


def test_conditions_beside_images_and_in_manifests(tmp_path):
    write_png(tmp_path / "a.png", 64, 128, (255, 0, 0))
    write_png(tmp_path / "a.control.png", 64, 128, (0, 0, 255))
    write_png(tmp_path / "b.jpg", 96, 96, (0, 255, 0))
    write_png(tmp_path / "b.control.png", 96, 96, (255, 255, 255))
    for name in "ab":
        (tmp_path / f"{name}.txt").write_text(f"caption {name}")
    records, _ = data.scan(str(tmp_path), control=True)  # the .control.png files are conditions, not images
    assert [os.path.basename(r["image"]) for r in records] == ["a.png", "b.jpg"]
    assert [os.path.basename(r["control"]) for r in records] == ["a.control.png", "b.control.png"]
    item = data.ImageDataset(records, sizes.bucket_table(256))[0]
    assert item["control"].shape == item["image"].shape == (3, 176, 352)  # the bucket's size, cropped alike
    assert torch.allclose(item["control"][:, 5, 5], torch.tensor([-1.0, -1.0, 1.0]))  # blue: its own pixels
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(dict(image="a.png", caption="x", control="b.control.png")))
    with pytest.raises(ValueError, match="is 96x96 but its image .*a.png is 128x64: make them the same size"):
        data.scan(str(manifest), control=True)
    manifest.write_text(json.dumps(dict(image="a.png", caption="x")))
    with pytest.raises(ValueError, match='line 1: a ControlNet needs each image\'s condition image: add "control"'):
        data.scan(str(manifest), control=True)
    os.remove(tmp_path / "b.control.png")
    with pytest.raises(ValueError, match="b.jpg has no condition image .*b.control.png"):
        data.scan(str(tmp_path), control=True)
    (tmp_path / "a.control.txt").write_text("caption")
    assert len(data.scan(str(tmp_path))[0]) == 3  # without --controlnet a .control.png is an image like any other


def test_control_latents_are_cached_beside_the_image_latents(tmp_path):
    for i, rgb in enumerate([(255, 0, 0), (0, 255, 0)]):
        write_png(tmp_path / f"{i}.png", 64, 64, rgb)
        write_png(tmp_path / f"{i}.control.png", 64, 64, tuple(255 - v for v in rgb))
        (tmp_path / f"{i}.txt").write_text("word")
    records, _ = data.scan(str(tmp_path), control=True)
    table = {"1.0": (64, 64)}
    enc_img = lambda x: torch.nn.functional.avg_pool2d(x, 8)  # stand-in "VAE": the mean colour per 8×8
    enc_cap = lambda caps: (torch.ones(len(caps), 4, 3), torch.ones(len(caps), 4, dtype=torch.long))
    fp, cache = data.fingerprint(records, table, "vae", "t5", 4), str(tmp_path / "cache")
    data.build_cache(cache, records, table, fp, enc_img, enc_cap, data.cache_problems(cache, 2, fp))
    data.write_cache_index(cache, fp)
    item = data.CachedDataset(cache)[1]
    assert torch.allclose(item["latent"][:, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))  # green
    assert torch.allclose(item["control_latent"][:, 0, 0], torch.tensor([1.0, -1.0, 1.0]))  # its condition: magenta
    os.utime(tmp_path / "1.control.png", (0, 0))  # a changed condition invalidates the cache
    assert data.fingerprint(data.scan(str(tmp_path), control=True)[0], table, "vae", "t5", 4) != fp


# -- training (train.py --controlnet): only the copies learn, saved alone; resume, EMA, previews ---------------------
class Paired(torch.utils.data.Dataset):
    """The quick start's shapes, each with a condition image (here its negative: any image of the same size)."""

    def __init__(self):
        import quickstart
        self.shapes, self.buckets = quickstart.ShapesDataset(16, 64), ["1.0"] * 64

    def __len__(self):
        return 64

    def __getitem__(self, i):
        item = self.shapes[i]
        return dict(item, control=-item["image"])


def test_train_py_trains_only_the_copies_and_resumes_exactly(tmp_path, monkeypatch):
    import quickstart
    import train
    monkeypatch.setattr(quickstart, "DIT", {**quickstart.DIT, "depth": 3, "hidden_size": 32, "num_heads": 2})
    flags = ["--image-size", "16", "--batch-size", "4", "--log-every", "1", "--warmup", "1", "--save-every", "2"]
    base_run = tmp_path / "base"
    quickstart.train(flags + ["--out", str(base_run), "--steps", "2", "--preview-every", "0"])
    base = weights.load_checkpoint(str(base_run / "step_0000002" / "ema.safetensors"))
    def cn(out, *extra):
        args = cli.parse_train_args(flags + ["--out", str(out), "--init", str(base_run), "--controlnet", "2", "--lr",
                                             "1e-3", "--ema", "0.5", *map(str, extra)], quickstart.DEFAULTS, False, True)
        return train.main(args, Paired(), quickstart.components(str(out)))
    straight = cn(tmp_path / "a", "--steps", 4, "--preview-every", 4,
                  "--preview-prompts", "a red circle on a blue background|a green square on a white background")
    assert all(torch.equal(v, straight.base_model.state_dict()[k]) for k, v in base.state_dict().items())  # frozen
    assert any(not torch.equal(a, b) for a, b in zip(straight.controlnet.state_dict().values(),
                                                      controlnet.ControlPixArt(base, 2).controlnet.state_dict().values()))
    step = tmp_path / "a" / "step_0000004"
    assert sorted(os.listdir(step)) == ["controlnet.safetensors", "controlnet_ema.safetensors", "preview.png", "trainer.pt"]
    prompts = ["a red circle on a blue background", "a green square on a white background"]
    margin = 12 + max(round(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(p)) for p in prompts)  # the labels
    assert Image.open(step / "preview.png").size == (margin + 5 * 128, 2 * 128)  # the condition left of 4 samples
    cn(tmp_path / "b", "--steps", 2)
    resumed = cn(tmp_path / "b", "--steps", 4, "--resume")
    assert all(torch.equal(v, resumed.controlnet.state_dict()[k]) for k, v in straight.controlnet.state_dict().items())
    loaded = weights.load_controlnet(str(tmp_path / "b"), base)  # a run folder: its latest EMA copies
    ema = weights.read_safetensors(tmp_path / "b" / "step_0000004" / "controlnet_ema.safetensors")[0]
    assert all(torch.equal(v, ema["controlnet." + k]) for k, v in loaded.controlnet.state_dict().items())
    import export  # a ControlNet run exports as diffusers' research adapter: the same copies
    assert export.main([str(tmp_path / "b"), str(tmp_path / "adapter")]) == 0
    exported = weights.load_controlnet(str(tmp_path / "adapter"), base)
    assert all(torch.equal(v, exported.controlnet.state_dict()[k]) for k, v in loaded.controlnet.state_dict().items())


def test_sample_py_controls_as_the_sampler_with_the_condition_resized_and_encoded(tmp_path, monkeypatch):
    """sample.py --controlnet RUN --control IMAGE against the sampler called here on the condition resized and scaled
    by this test (pixel space: the 'encoding' is ×4); --control-scale 0 draws the base model's image."""
    import numpy as np
    import quickstart
    import sample
    import t5 as t5lib
    import train
    from tokenizer import Tokenizer
    monkeypatch.setattr(quickstart, "DIT", {**quickstart.DIT, "depth": 3, "hidden_size": 32, "num_heads": 2})
    flags = ["--image-size", "16", "--batch-size", "4", "--warmup", "1", "--save-every", "2", "--steps", "2",
             "--preview-every", "0"]
    quickstart.train(flags + ["--out", str(tmp_path / "base"), "--lr", "0.05"])  # a base whose output is not ~0
    args = cli.parse_train_args(flags + ["--out", str(tmp_path / "cn"), "--init", str(tmp_path / "base"), "--controlnet",
                                         "1", "--lr", "0.1"], quickstart.DEFAULTS, need_data=False, own_components=True)
    train.main(args, Paired(), quickstart.components(str(tmp_path / "cn")))
    outline = Image.new("RGB", (32, 32))  # twice the model's size: resized to 16 × 16
    ImageDraw.Draw(outline).ellipse([4, 6, 20, 22], outline="white", width=2)
    outline.save(tmp_path / "outline.png")
    prompt = "a red circle on a blue background"
    run = lambda *extra: sample.main(["--model", str(tmp_path / "base"), prompt, "--steps", "3", "--seed", "5",
                                      "--out", str(tmp_path / "out"), *extra])
    assert run("--controlnet", str(tmp_path / "cn"), "--control", str(tmp_path / "outline.png")) == 0
    assert run("--controlnet", str(tmp_path / "cn"), "--control", str(tmp_path / "outline.png"), "--control-scale", "0") == 0
    assert run() == 0
    controlled, scale0, plain = (np.asarray(Image.open(tmp_path / "out" / f"0000{i}-5.png")) for i in range(3))
    assert "ControlNet: " in Image.open(tmp_path / "out" / "00000-5.png").text["parameters"]
    assert np.array_equal(scale0, plain) and not np.array_equal(controlled, plain)
    # the same image from the sampler, the condition prepared here
    base = weights.load_checkpoint(str(tmp_path / "base" / "step_0000002" / "ema.safetensors"))
    model = weights.load_controlnet(str(tmp_path / "cn"), base)
    c = torch.from_numpy(np.asarray(outline.resize((16, 16), Image.BICUBIC), dtype=np.float32)).permute(2, 0, 1)[None]
    c = (c / 127.5 - 1) * 4.0  # the quick start's pixel space "encodes" an image as the image × 4
    t5 = weights.load_t5(str(tmp_path / "base" / "text_encoder"), dtype=torch.float32)
    tok = Tokenizer(str(tmp_path / "base" / "tokenizer" / "spiece.model"))
    (y, mask), (y0, mask0) = t5lib.encode(t5, tok, [prompt]), t5lib.encode(t5, tok, [""])
    noise = torch.randn((1, 3, 16, 16), generator=torch.Generator().manual_seed(5))
    x = diffusion.sample(lambda *a: model(*a, control=c), noise, y, mask, y0, mask0, "dpm", 3, 4.5, clip_x0=4.0,
                         progress=False)
    expected = ((x[0] / 4.0 * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(expected - controlled).max() <= 1  # 1/255: rounding


def test_edge_map_finds_a_step_edge_and_the_flags_go_together(tmp_path):
    import numpy as np
    import sample
    photo = np.zeros((32, 32, 3), np.uint8)
    photo[:, 16:] = 200  # one vertical edge between columns 15 and 16
    edges = np.asarray(data.edge_map(Image.fromarray(photo)))[:, :, 0]
    assert set(np.unique(edges)) == {0, 255}  # white lines on black
    assert edges[4:-4, 14:18].any(1).all()  # every row has a line at the edge (PIL's Laplacian is clipped at 0:
    assert not edges[:, :12].any() and not edges[:, 20:].any()  # the bright side only) and nothing away from it
    Image.fromarray(photo).save(tmp_path / "photo.png")
    for flags, message in ((["--control", str(tmp_path / "photo.png")], "--controlnet and --control go together"),
                           (["--control-scale", "0.5"], "--control-scale needs --controlnet and --control"),
                           (["--controlnet", str(tmp_path / "nope"), "--control", str(tmp_path / "photo.png")], "does not exist"),
                           (["--controlnet", str(tmp_path), "--control", str(tmp_path / "missing.png")], "cannot read it")):
        args = cli.sample_parser(sample.__doc__).parse_args(["a prompt", *flags])
        with pytest.raises(ValueError, match=message):
            cli.check_sample_args(args)
