"""tokenizer.py vs transformers' T5Tokenizer on a sentencepiece model the test trains, read from its spiece.model
and from the tokenizer.json transformers saves of it: identical ids and masks; truncation; bad tokenizer folders."""
import json
import os
import random

import pytest
import sentencepiece
import torch
from transformers import T5Tokenizer

import tokenizer


def precompiled_charsmap(proto):
    """ModelProto.normalizer_spec (field 3) .precompiled_charsmap (field 2), read from the protobuf wire format."""
    def fields(buf):
        i = 0
        while i < len(buf):
            key, i = varint(buf, i)
            if key & 7 == 0:
                _, i = varint(buf, i)
            elif key & 7 in (1, 5):
                i += 8 if key & 7 == 1 else 4
            else:
                n, i = varint(buf, i)
                yield key >> 3, buf[i:i + n]
                i += n

    def varint(buf, i):
        value, shift = 0, 0
        while True:
            value |= (buf[i] & 127) << shift
            shift, i = shift + 7, i + 1
            if buf[i - 1] < 128:
                return value, i

    spec = next(v for k, v in fields(proto) if k == 3)
    return next(v for k, v in fields(spec) if k == 2)

def reference_tokenizer(folder):
    """transformers' T5Tokenizer as diffusers loads it: from_pretrained(tokenizer folder with spiece.model).
    That conversion parses the model with protobuf; without protobuf installed, build the same tokenizer
    from the same parts (pieces and scores, the 100 sentinels appended in reverse, the NFKC charsmap)."""
    try:
        import google.protobuf  # noqa: F401
        return T5Tokenizer.from_pretrained(folder)
    except ImportError:
        sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(folder, "spiece.model"))
        vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
        vocab += [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]
        return T5Tokenizer(vocab=vocab, extra_ids=100,
                           _spm_precompiled_charsmap=precompiled_charsmap(sp.serialized_model_proto()))

WORDS = ("a photo of an astronaut riding a horse on the moon red cat sitting under blue sky city street at "
         "night neon lights oil painting portrait café naïve résumé über straße Tokyo 東京 夜景 собака дом").split()

@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """A unigram sentencepiece model trained here with T5's special ids, and transformers' tokenizer on it."""
    rng = random.Random(0)
    syllables = "ka ri to mu ne sa lo pe di gu ba zo fi ve xa qu".split()
    words = WORDS + ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) for _ in range(3000)]
    folder = tmp_path_factory.mktemp("tokenizer")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(folder / "spiece"), vocab_size=300, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)  # T5: nmt_nfkc rules
    return tokenizer.Tokenizer(str(folder / "spiece.model")), reference_tokenizer(str(folder))

@pytest.fixture(scope="module")
def saved_folder(tokenizers, tmp_path_factory):
    """The same tokenizer as transformers 5 saves it: tokenizer.json + tokenizer_config.json, no spiece.model."""
    folder = tmp_path_factory.mktemp("saved")
    tokenizers[1].save_pretrained(str(folder))
    assert (folder / "tokenizer.json").is_file() and not (folder / "spiece.model").exists()
    return folder

@pytest.fixture(scope="module")
def saved_tokenizers(saved_folder):
    """Ours and transformers' T5Tokenizer.from_pretrained (as diffusers loads a pipeline folder) on that folder."""
    return tokenizer.Tokenizer(str(saved_folder)), T5Tokenizer.from_pretrained(str(saved_folder))

ALPHABET = list("abcdefkmnoprstuvxyz ,.!?'\"-") + [
    "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x00", "\x1c", "\x7f", "\x85", "\xa0", "\xad", "\u1680", "\u180e",
    "\u2000", "\u200a", "\u200b", "\u2028", "\u2029", "\u202f", "\u205f", "\u2060", "\u3000", "\ufeff", "\u2581",
    "é", "e\u0301", "ß", "İ", "ǅ", "ﬁ", "①", "Ｔ", "東", "京", "🐱", "</s>", "<pad>", "<unk>", "<s>",
    "<extra_id_7>", "<extra_id_07>", "<extra_id_100>", "ka", "ri", "to", "mu"]

PROMPTS = [
    "a photo of an astronaut riding a horse on the moon",  # ordinary
    "A Red Cat, sitting (under) the 'blue' sky!",
    "café naïve résumé über straße ﬁne ① Ｔｏｋｙｏ 東京の夜景 🐱 e\u0301",  # unicode: NFKC, unknown chars, emoji
    "   a\t\tred \n\n cat\u00a0under\u3000the  sky\u2028at\x85night   ",  # whitespace-heavy
    "", " ", "\n\t",  # empty
    "a cat </s> a dog <extra_id_0> <pad> x<unk>y",  # special-token strings in the text
]

@pytest.mark.parametrize("source", ["tokenizers", "saved_tokenizers"])  # from spiece.model, from tokenizer.json
def test_tokenizer_matches_transformers(source, request):
    ours, ref = request.getfixturevalue(source)
    rng = random.Random(1)
    fuzz = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40))) for _ in range(1000)]
    prompts = PROMPTS + fuzz
    ids, mask = ours(prompts)
    want = ref(prompts, padding="max_length", max_length=300, truncation=True, return_tensors="pt")
    assert ids.shape == mask.shape == (len(prompts), 300)
    wrong = [p for n, p in enumerate(prompts) if ids[n].tolist() != want["input_ids"][n].tolist()
             or mask[n].tolist() != want["attention_mask"][n].tolist()]
    assert not wrong, f"{len(wrong)} of {len(prompts)} prompts differ, e.g. {wrong[:3]}"
    assert ids[4, :2].tolist() == [1, 0] and mask[4, :2].tolist() == [1, 0]  # "" -> eos only

@pytest.mark.parametrize("source", ["tokenizers", "saved_tokenizers"])
def test_tokenizer_truncates_overlong_prompt_keeping_eos(source, request):
    ours, ref = request.getfixturevalue(source)
    prompt = " ".join(WORDS * 20)  # ~800 words
    with pytest.warns(UserWarning, match="keeps the first 299"):
        ids, mask = ours([prompt, "a cat"])
    want = ref([prompt, "a cat"], padding="max_length", max_length=300, truncation=True, return_tensors="pt")
    assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])
    assert ids[0, -1] == 1 and mask[0].all()

def test_tokenizer_json_file_and_bad_tokenizer_folders(tokenizers, saved_folder, saved_tokenizers, tmp_path):
    """tokenizer.json itself reads as its folder; a folder with neither file, or a tokenizer.json that is not
    T5's kind: one error naming the file and what is expected."""
    prompts = ["a red cat", "東京 </s> <extra_id_3> x<unk>y"]
    ids = tokenizer.Tokenizer(str(saved_folder / "tokenizer.json"))(prompts)[0]
    assert torch.equal(ids, saved_tokenizers[1](prompts, padding="max_length", max_length=300, return_tensors="pt")["input_ids"])
    # where NFKC makes "<pad>", "</s>" or a sentinel out of other characters, these stay control pieces that
    # sentencepiece never matches in text, as in spiece.model (transformers 5 matches them; the T5 PixArt used did not)
    text = "＜pad＞ a﹤/s﹥ ＜extra_id_3＞"
    assert saved_tokenizers[0].encode(text) == tokenizers[0].sp.encode(text)
    with pytest.raises(FileNotFoundError, match=f"no tokenizer at {tmp_path}: expected spiece.model or tokenizer.json"):
        tokenizer.Tokenizer(str(tmp_path))
    spec = json.load(open(saved_folder / "tokenizer.json"))
    for change, message in [({"normalizer": None}, "a Precompiled normalizer"),
                            ({"model": spec["model"] | {"type": "BPE"}}, "a Unigram model"),
                            ({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never"}},
                             "prepends ▁ to every word")]:
        json.dump(spec | change, open(tmp_path / "tokenizer.json", "w"))
        with pytest.raises(ValueError, match=f"tokenizer.json is not a T5 tokenizer .*{message}"):
            tokenizer.Tokenizer(str(tmp_path))
