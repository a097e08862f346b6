"""sizes.py: aspect-ratio binning and the resize back against diffusers' own functions, generation sizes, and what a
size costs (FLOPs against torch's count, memory against the measured peak, refusals that name a size that fits)."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (ASPECT_RATIO_256_BIN, ASPECT_RATIO_512_BIN,
                                                                     ASPECT_RATIO_1024_BIN)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

import sigma
import sizes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("sample_size,table", [(32, ASPECT_RATIO_256_BIN), (64, ASPECT_RATIO_512_BIN),
                                                (128, ASPECT_RATIO_1024_BIN), (256, ASPECT_RATIO_2048_BIN)])
def test_binning_matches_diffusers(sample_size, table):
    """The bucket diffusers' pipeline picks (its table for the transformer's sample_size) for every size up to
    1.5x the training area; above that ours keeps the bucket's shape at the requested area."""
    config = dataclasses.replace(sigma.CONFIGS["1024"], sample_size=sample_size)
    trained = 8 * sample_size
    checked = 0
    for height in range(64, 2 * trained + 1, 8 * max(1, trained // 256)):
        for width in range(64, 2 * trained + 1, 8 * max(1, trained // 256)):
            expected = PixArtImageProcessor.classify_height_width_bin(height, width, ratios=table)
            got = sizes.generation_size(height, width, config)
            if height * width <= 1.5 * trained**2:
                assert got == expected, (height, width)
                checked += 1
            else:  # diffusers' bucket scaled to the requested area, rounded up to whole patches (16 px)
                scale = (height * width / (expected[0] * expected[1])) ** 0.5
                assert all(0 <= g - scale * e < 16 and g % 16 == 0 for g, e in zip(got, expected)), (height, width)
    assert checked > 1000

def test_generation_size_without_binning_and_with_kv_compression():
    config = sigma.CONFIGS["2K"]
    assert sizes.generation_size(1000, 1504, config, binning=False) == (1008, 1504)  # whole 2x2 patches
    kv = dataclasses.replace(config, kv_compress_layers=sigma.KV_DEEP_HALF)
    assert sizes.generation_size(1000, 1504, kv, binning=False) == (1024, 1504)  # token grid divisible by 2
    assert sizes.generation_size(4096, 4096, config) == (4096, 4096)  # 2K bucket 1.0, scaled to 4096²
    assert sizes.parse_size("4096") == (4096, 4096) and sizes.parse_size("1344x768") == (768, 1344)
    assert sizes.parse_size("2k") == (2048, 2048)

@pytest.mark.parametrize("config,side,factor", [
    (sigma.SigmaConfig(depth=4, hidden_size=128, num_heads=4, in_channels=3, caption_channels=64, caption_tokens=16,
                       sample_size=16), 128, 1),  # the quick start's DiT in pixel space, 8x its side
    (sigma.SigmaConfig(depth=2, hidden_size=64, num_heads=2, caption_channels=32, caption_tokens=20, sample_size=16,
                       kv_compress_layers=(1,)), 256, 8)])  # latents, KV compression in one of two blocks
def test_size_cost_counts_the_flops_torch_counts(config, side, factor):
    """sizes.dit_cost's FLOPs against torch's FlopCounterMode over a real forward (attention by the math kernel,
    whose products it counts), within 5%: what it leaves out (embedders, final layer) is that small."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    model, h = sigma.PixArtSigma(config).eval(), side // factor
    args = (torch.randn(2, config.in_channels, h, h), torch.full((2,), 5), torch.randn(2, config.caption_tokens,
            config.caption_channels), torch.ones(2, config.caption_tokens))
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(*args)
    tokens, _, flops = sizes.dit_cost(config, side, side, factor, 2, 4)
    assert tokens == (h // 2) ** 2 and flops == pytest.approx(counter.get_total_flops(), rel=0.05)

def test_size_cost_refuses_and_names_a_size_that_fits():
    """The largest size the refusal names passes the check, a size 10% larger on each side is refused, and with
    force=True only said; when not even the training bucket fits, the refusal says so."""
    config = sigma.CONFIGS["2K"]
    check = lambda hw, free, force=False: sizes.check_cost(config, hw, sizes.generation_size(*hw, config), 8, True, 2, 2,
                                                           free, 1e14, 20, force)
    with pytest.raises(ValueError, match="it would not fit; the largest size of this shape that fits in memory and in an "
                                         "hour is about") as e:
        check((4096, 3072), 2 * 2**30)
    w, h = map(int, str(e.value).split("hour is about ")[1].split()[0].split("x"))
    assert 0.25 < w * h / (4096 * 3072) < 1 and abs(w / h - 3072 / 4096) < 0.02
    assert check((h, w), 2 * 2**30) is not None  # above the training size: said, not refused
    with pytest.raises(ValueError, match="would not fit"):
        check((int(h * 1.1) // 16 * 16, int(w * 1.1) // 16 * 16), 2 * 2**30)
    assert "it may not fit" in check((4096, 3072), 2 * 2**30, force=True)
    assert check((2048, 2048), 2 * 2**30) is None  # the training size: nothing to say
    with pytest.raises(ValueError, match="it would not fit; not even the smallest size of this shape fits"):
        check((4096, 3072), 2**30)  # the 2048² bucket alone takes 1.1 GiB

def test_size_cost_refuses_over_an_hour_and_names_a_size_that_fits():
    """The quick start's pixel-space DiT at 1000², with memory to spare and the device's rate injected so that 20 steps
    take 0.99 or 1.01 hours (the FLOPs: dit_cost's count, checked against torch's above): said, or refused naming a
    size that passes (and one 10% larger on each side that does not); with force=True only said."""
    config = sigma.SigmaConfig(depth=3, hidden_size=128, num_heads=4, in_channels=3, out_channels=6, caption_channels=64,
                               caption_tokens=16, sample_size=16)
    flops = sizes.dit_cost(config, 1000, 1000, 1, 2, 4)[2]  # per step, 2 rows (CFG)
    check = lambda hw, hours, force=False: sizes.check_cost(config, hw, sizes.generation_size(*hw, config, False, 1), 1,
                                                            False, 2, 4, 2**50,
                                                            20 * flops / (hours * 3600), 20, force)
    assert "at least 59 min for 20 steps" in check((1000, 1000), 0.99)  # under the hour: said (far above 16²), not refused
    with pytest.raises(ValueError, match="at least 61 min for 20 steps: it would take over an hour; the largest size of "
                                         "this shape that fits in memory and in an hour is about") as e:
        check((1000, 1000), 1.01)
    side = int(str(e.value).split("in an hour is about ")[1].split("x")[0])
    assert 980 <= side < 1000  # time grows a little faster than the tokens (attention: T²): 1/1.01 of the time is > 99.5% of the side
    assert "over an hour" not in check((side, side), 1.01)
    with pytest.raises(ValueError, match="it would take over an hour"):
        check((int(side * 1.1), int(side * 1.1)), 1.01)
    assert "it may take over an hour (the largest size" in check((1000, 1000), 1.01, force=True)

@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak memory read from Linux's /proc")
def test_size_cost_memory_is_the_measured_peak():
    """sizes.dit_cost's activation memory against the peak resident memory a forward adds (fresh process, Linux's
    VmHWM reset first), at 16K tokens of the quick start's width: within 0.6-1.5x (measured 1.0x)."""
    code = """if True:
        import sys, torch
        sys.path.insert(0, sys.argv[1])
        import sigma, sizes
        torch.set_num_threads(1)
        config = sigma.SigmaConfig(depth=1, hidden_size=128, num_heads=4, in_channels=3, caption_channels=64,
                                   caption_tokens=16, sample_size=16)
        model, status = sigma.PixArtSigma(config).eval(), lambda key: int(open("/proc/self/status").read().split(key)[1].split()[0])
        x, t, y, mask = torch.randn(2, 3, 256, 256), torch.full((2,), 5), torch.randn(2, 16, 64), torch.ones(2, 16)
        with torch.no_grad():
            model(x[..., :16, :16], t, y, mask)
            before = status("VmRSS:")
            open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from here
            model(x, t, y, mask)
        print((status("VmHWM:") - before) * 1024 / sizes.dit_cost(config, 256, 256, 1, 2, 4)[1])"""
    ratio = float(subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, check=True).stdout)
    assert 0.6 <= ratio <= 1.5, ratio

def test_resize_and_crop_matches_diffusers():
    x = torch.randn(2, 3, 208, 304)
    for h, w in [(256, 384), (200, 240), (208, 304), (100, 400)]:
        assert torch.equal(sizes.resize_and_crop(x, h, w), PixArtImageProcessor.resize_and_crop_tensor(x, w, h))
