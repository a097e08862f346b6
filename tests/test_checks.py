"""The checks of a pair, each tested on both sides of its line: a state dict's keys against the model's (missing,
unexpected, misshaped: each alone), a sampling size against the training size (above and below, at each threshold),
a prompt's tokens against T5's limit (just below, at and above it), --caption-keys' weights against 0."""
import warnings

import pytest
import torch

import data
import quickstart
import sigma
import sizes
import weights
from tokenizer import Tokenizer

EXPECTED = {"a.weight": torch.zeros(4, 2), "b.bias": torch.zeros(3)}


@pytest.mark.parametrize("found,line", [
    ({"a.weight": torch.ones(4, 2), "b.bias": torch.ones(3)}, None),
    ({"a.weight": torch.ones(4, 2)}, "missing keys: b.bias (3,)"),
    ({"a.weight": torch.ones(4, 2), "b.bias": torch.ones(3), "c.extra": torch.ones(1)}, "unexpected keys: c.extra"),
    ({"a.weight": torch.ones(2, 4), "b.bias": torch.ones(3)}, "shape mismatches: a.weight: checkpoint (2, 4) vs model (4, 2)"),
], ids=["fits", "missing", "unexpected", "misshaped"])
def test_each_kind_of_key_mismatch_alone_is_refused(found, line):
    """Each kind of mismatch is an error on its own (a file with an extra tensor and nothing missing does not load
    silently), and the report names that kind only."""
    if line is None:
        return weights.check_keys(found, EXPECTED, "f", "m")
    with pytest.raises(ValueError) as e:
        weights.check_keys(found, EXPECTED, "f", "m")
    assert str(e.value).splitlines() == ["f does not fit m:", "  " + line]


def test_a_checkpoint_with_one_extra_tensor_is_refused():
    config = sigma.SigmaConfig(depth=1, hidden_size=32, num_heads=2, caption_channels=16, caption_tokens=8,
                               sample_size=8, pe_interpolation=1.0)
    sd = sigma.PixArtSigma(config).state_dict()
    weights.load_checkpoint(dict(sd), config)
    with pytest.raises(ValueError, match="unexpected keys: blocks.0.attn.extra$"):
        weights.load_checkpoint(dict(sd, **{"blocks.0.attn.extra": torch.zeros(1)}), config)


# a model trained at 256 px (latent 32, 2-px patches): 16-px steps of the token grid, 16² = 256 tokens
TRAINED = sigma.SigmaConfig(depth=2, hidden_size=32, num_heads=2, caption_tokens=8, sample_size=32, pe_interpolation=0.5)


@pytest.mark.parametrize("h,w,says", [
    (256, 256, None), (224, 224, None),              # the training size, a little below it: nothing to say
    (128, 128, None), (112, 112, "far"),             # 1/4 of its tokens: still nothing; below that: a warning
    (256, 272, None),                                # 1.06x its tokens: nothing yet (the line is at 1.1x)
    (272, 272, "larger"), (512, 512, "larger"),      # above 1.1x: on a larger grid; up to 4x: not far
    (528, 528, "far"),                               # above 4x: far, too
])
def test_a_size_far_from_the_training_size_is_said_above_and_below(h, w, says):
    note = sizes.check_cost(TRAINED, (h, w), sizes.generation_size(h, w, TRAINED, False), 8, False, 2, 4, 2**40, 1e12, 1)
    tokens = (h // 16) * (w // 16)
    if says is None:
        assert note is None
        return
    assert note.startswith(f"--size {w}x{h}: {tokens:,} tokens, {tokens / 256:.3g}x the 256 of its training size")
    assert ("far from what it was trained at: expect a poor image" in note) == (says == "far")
    assert ("the DiT runs on a larger grid" in note) == (tokens > 256)


@pytest.fixture(scope="module")
def shapes_tokenizer(tmp_path_factory):
    """The quick start's word-level tokenizer (one id per word) at T5's 300-token limit."""
    folder = tmp_path_factory.mktemp("components")
    return Tokenizer(quickstart.components(str(folder))["tokenizer"])


@pytest.mark.parametrize("words", [298, 299, 300, 301])
def test_prompts_just_below_at_and_above_the_token_limit(shapes_tokenizer, words):
    """n words + the eos in 300 places: up to 299 words all kept, silently; from 300 on the first 299 and the eos kept,
    with a warning (a prompt of exactly 300 tokens is cut, not a crash)."""
    red = shapes_tokenizer.encode("red")
    assert len(red) == 1
    kept = min(words, 299)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids, mask = shapes_tokenizer([" ".join(["red"] * words)])
    assert ids[0].tolist() == red * kept + [1] + [0] * (299 - kept)
    assert mask[0].tolist() == [1] * (kept + 1) + [0] * (299 - kept)
    said = [str(w.message) for w in caught]
    assert said == [] if words <= 299 else len(said) == 1 and said[0].startswith(f"prompt 0 has {words + 1} tokens")


@pytest.mark.parametrize("text,weights", [("caption:1,vlm:0", [1.0, 0.0]), ("caption", [1.0]), ("caption:0.5,vlm:1.5", [0.5, 1.5]),
                                          ("caption:0", None), ("caption:1,vlm:-1", None), ("caption:x", None)])
def test_caption_key_weights_from_zero_up_not_all_zero(text, weights):
    """A weight of 0 leaves a key out of the mix (allowed); negative, all 0 or not a number: refused in one line."""
    if weights is None:
        with pytest.raises(ValueError, match="--caption-keys .*: give KEY or KEY:WEIGHT,... with weights >= 0, not all 0"):
            data.caption_keys(text)
        return
    keys, got = data.caption_keys(text)
    assert keys == [k.partition(":")[0] for k in text.split(",")] and got.tolist() == weights
