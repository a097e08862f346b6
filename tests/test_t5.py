"""t5.py against transformers: the bucket function, the encoder on random weights (and end to end with the
tokenizer, tests/test_tokenizer.py), loading the released layout."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import T5Config as HFConfig
from transformers import T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

import t5
import weights
from test_tokenizer import tokenizers  # noqa: F401 (the fixture test_encode_end_to_end reads prompts with)

TINY = dict(vocab_size=512, d_model=64, d_ff=96, num_heads=4, d_kv=16, num_layers=3)


def reference_encoder(**config):
    """transformers' T5 v1.1 encoder, fp32, eval, with random weights at T5's init scales (q at (D·d_kv)^-½,
    other matrices at fan_in^-½), but norm weights and the position-bias table far from their flat init so
    that they matter. Built on the meta device and drawn once: the XXL-width test would init twice otherwise."""
    with torch.device("meta"):
        model = T5EncoderModel(HFConfig(feed_forward_proj="gated-gelu", **config))
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name or name == "shared.weight":
                p.normal_(0, 1.0)
            else:
                p.normal_(0, (p.shape[1] * (config["d_kv"] if name.endswith(".q.weight") else 1)) ** -0.5)
    model.set_input_embeddings(model.shared)  # to_empty untied encoder.embed_tokens from shared
    return model


def ours_from(ref, config):
    """Our encoder sharing the reference's tensors (no copy: the XXL-width test fits in little memory)."""
    with torch.device("meta"):
        model = t5.T5Encoder(t5.T5Config(**config))
    sd = {k: v for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied to shared
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def padded_batch(vocab, lengths, L=300):
    ids = torch.randint(3, vocab, (len(lengths), L))
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()  # (N, L)
    ids[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = 1  # the eos, as the tokenizer puts it
    return ids.masked_fill(mask == 0, 0), mask


# ---------------------------------------------------------------------------------------- buckets

@pytest.mark.parametrize("rel, bucket", [(-1, 1), (-9, 8), (-16, 10), (-64, 14), (0, 0), (1, 17), (16, 26),
                                         (127, 31), (128, 31), (5000, 31), (-5000, 15)])
def test_bucket_reference_values(rel, bucket):
    assert t5.relative_position_bucket(torch.tensor([rel])).item() == bucket


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (64, 256), (16, 32)])
def test_bucket_matches_transformers(num_buckets, max_distance):
    rel = torch.arange(-2000, 2001)
    ref = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=num_buckets,
                                                max_distance=max_distance)
    assert torch.equal(t5.relative_position_bucket(rel, num_buckets, max_distance), ref)


# ---------------------------------------------------------------------------------------- encoder

def test_encoder_matches_transformers_with_padding_and_log_buckets():
    ref = reference_encoder(**TINY)
    ours = ours_from(ref, TINY)
    ids, mask = padded_batch(TINY["vocab_size"], [300, 171, 37, 1])  # 300 > 128: reaches the last bucket
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    valid = mask.bool()
    assert want.abs().amax() > 0.5  # a real signal, not a collapsed one
    scale = want[valid].abs().max()  # fp32 against transformers: 1e-5 of the features' magnitude
    assert (got - want)[valid].abs().max() <= 1e-5 * scale
    # padded rows still attend to the valid keys in both implementations, so they agree too
    assert (got - want)[~valid].abs().max() <= 1e-5 * scale
    # and the mask matters: the same ids without it give different features at the valid positions
    with torch.no_grad():
        assert (ours(ids, torch.ones_like(mask)) - want)[valid].abs().max() > 1e-2


def test_encoder_matches_transformers_at_xxl_width():
    config = dict(vocab_size=32128, d_model=4096, d_ff=10240, num_heads=64, d_kv=64, num_layers=2)
    ref = reference_encoder(**config)
    ours = ours_from(ref, config)
    ids, mask = padded_batch(config["vocab_size"], [230])  # one prompt: padding and buckets up to 229
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    assert got.shape == (1, 300, 4096)
    assert (got - want)[mask.bool()].abs().max() <= 1e-5 * want[mask.bool()].abs().max()  # of the features' magnitude


def test_encode_end_to_end(tokenizers):
    ours_tok, ref_tok = tokenizers
    ref = reference_encoder(**TINY)
    model = ours_from(ref, TINY)
    prompts = ["a red cat under the blue sky", "", "東京 夜景 at night"]
    y, mask = t5.encode(model, ours_tok, prompts)
    batch = ref_tok(prompts, padding="max_length", max_length=300, truncation=True, return_tensors="pt")
    with torch.no_grad():
        want = ref(**batch).last_hidden_state
    assert y.shape == (3, 300, TINY["d_model"]) and torch.equal(mask, batch["attention_mask"])
    assert (y - want)[mask.bool()].abs().max() <= 1e-5 * want[mask.bool()].abs().max()  # fp32: of the features' magnitude


# ---------------------------------------------------------------------------------------- loading

SMALL = dict(vocab_size=128, d_model=32, d_ff=48, num_heads=4, d_kv=8, num_layers=2)
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def write_text_encoder(folder, sd, config, drop=(), extra=None, tied_copy=False):
    """The released text_encoder/ layout: config.json, model.safetensors.index.json and 2 fp32 shards."""
    sd = {k: v.clone() for k, v in sd.items() if k not in drop and (tied_copy or k != "encoder.embed_tokens.weight")}
    sd |= extra or {}
    keys = sorted(sd)
    split = {k: SHARDS[i >= len(keys) // 2] for i, k in enumerate(keys)}
    os.makedirs(folder, exist_ok=True)
    for shard in SHARDS:
        save_file({k: sd[k] for k in keys if split[k] == shard}, os.path.join(folder, shard), metadata={"format": "pt"})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    json.dump({"metadata": {"total_size": total}, "weight_map": split}, open(os.path.join(folder, "model.safetensors.index.json"), "w"))
    config.to_json_file(os.path.join(folder, "config.json"))
    return folder


@pytest.fixture
def released(tmp_path):
    ref = reference_encoder(**SMALL)
    return ref, ref.state_dict(), tmp_path


@pytest.mark.bf16_attention  # conftest.py
@pytest.mark.parametrize("tied_copy", [False, True])
def test_load_sharded_folder_into_bf16(released, tied_copy):
    ref, sd, tmp = released
    folder = write_text_encoder(str(tmp / "text_encoder"), sd, ref.config, tied_copy=tied_copy)
    model = weights.load_t5(folder, dtype=torch.bfloat16)
    assert model.config == t5.T5Config(**SMALL)
    got = model.state_dict()
    for k, v in got.items():  # every tensor present, converted to bf16 exactly as torch rounds it
        assert v.dtype == torch.bfloat16 and torch.equal(v, sd[k].to(torch.bfloat16)), k
    ids, mask = padded_batch(SMALL["vocab_size"], [300, 90])
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        fp32 = weights.load_t5(folder, dtype=torch.float32)(ids, mask)
        bf16 = model(ids, mask).float()
    assert (fp32 - want)[mask.bool()].abs().max() <= 1e-5 * want[mask.bool()].abs().max()  # of the features' magnitude
    assert (bf16 - want)[mask.bool()].norm() / want[mask.bool()].norm() < 3e-2  # relative: bf16's eps 7.8e-3, 2 layers


def test_load_folder_saved_by_transformers(released):
    ref, sd, tmp = released
    ref.save_pretrained(str(tmp / "saved"), max_shard_size="40KB")  # its own index + shards + config.json
    assert len([f for f in os.listdir(tmp / "saved") if f.endswith(".safetensors")]) >= 2
    model = weights.load_t5(str(tmp / "saved"), dtype=torch.float32)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_load_single_file(released):
    ref, sd, tmp = released
    sd = {k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}
    decoder = {"decoder.final_layer_norm.weight": torch.ones(32), "lm_head.weight": torch.zeros(128, 32)}
    save_file(sd | decoder, str(tmp / "t5.safetensors"))  # a whole T5 file: the decoder is ignored
    ref.config.to_json_file(str(tmp / "config.json"))
    model = weights.load_t5(str(tmp / "t5.safetensors"), dtype=torch.float32)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_load_reports_missing_shard(released):
    ref, sd, tmp = released
    folder = write_text_encoder(str(tmp / "te"), sd, ref.config)
    os.remove(os.path.join(folder, SHARDS[1]))
    with pytest.raises(FileNotFoundError, match=f"expects shard {SHARDS[1]}.*does not exist"):
        weights.load_t5(folder)


def test_load_reports_missing_unexpected_and_misshaped_keys(released):
    ref, sd, tmp = released
    gone = "encoder.block.1.layer.1.layer_norm.weight"
    folder = write_text_encoder(str(tmp / "a"), sd, ref.config, drop=[gone],
                                extra={"encoder.block.0.layer.0.SelfAttention.q.bias": torch.zeros(32)})
    with pytest.raises(ValueError) as err:
        weights.load_t5(folder)
    assert f"missing keys: {gone} (32,)" in str(err.value)
    assert "unexpected keys: encoder.block.0.layer.0.SelfAttention.q.bias" in str(err.value)
    config = HFConfig(feed_forward_proj="gated-gelu", **(SMALL | {"d_ff": 64}))  # config.json disagrees with the weights
    folder = write_text_encoder(str(tmp / "b"), sd, config)
    with pytest.raises(ValueError, match=r"DenseReluDense.wi_0.weight: checkpoint \(48, 32\) vs model \(64, 32\)"):
        weights.load_t5(folder)
    with pytest.raises(ValueError, match="overflow float16"):
        weights.load_t5(folder, dtype=torch.float16)
    with pytest.raises(FileNotFoundError, match="expected a .safetensors file or a folder"):
        weights.load_t5(str(tmp / "nowhere"))
