"""T5's tokenizer (Raffel et al., arXiv 1910.10683): a sentencepiece unigram model, run by sentencepiece.

It reads either file a T5 tokenizer folder holds:
  - spiece.model: the sentencepiece model itself (the released PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers);
  - tokenizer.json: what transformers (5.x) writes instead, e.g. in a pipeline saved by diffusers'
    PixArtSigmaPipeline.save_pretrained, which then holds no spiece.model. It carries the same model: the
    Unigram pieces and scores (the 100 sentinels appended), the unk id, sentencepiece's precompiled
    normalization charsmap (base64) and the Metaspace "▁" word prefix. From those we write the sentencepiece
    ModelProto back (a few protobuf fields, serialized by hand below: protobuf is no dependency) and load it
    into sentencepiece, so both files run the same engine.

    tokenizer = Tokenizer("pixart_sigma_sdxlvae_T5_diffusers/tokenizer")  # or a path to either file
    ids, mask = tokenizer(["a cat on a mat", ""])  # (2, 300), (2, 300)
"""
import base64
import json
import os
import re
import struct
import warnings

import sentencepiece
import torch

FILES = ("spiece.model", "tokenizer.json")  # the first one found is read


def find(path):
    """A tokenizer file, or a folder holding one of FILES -> the file's path."""
    files = [os.path.join(path, f) for f in FILES] if os.path.isdir(path) else [path]
    for file in files:
        if os.path.isfile(file):
            return file
    raise FileNotFoundError(f"no tokenizer at {path}: expected spiece.model or tokenizer.json (or a folder with one), "
                            "as in the tokenizer/ folder of PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers or of a "
                            "pipeline saved by diffusers")


# ------------------------------------------------------------------------- tokenizer.json -> ModelProto

def varint(n):  # protobuf's base-128 integer, low 7 bits first; the high bit says "more follows"
    return bytes([n & 127 | 128]) + varint(n >> 7) if n > 127 else bytes([n])


def length_delimited(field, data):  # wire type 2: strings, bytes and nested messages
    return varint(field << 3 | 2) + varint(len(data)) + data


# field numbers of sentencepiece's sentencepiece_model.proto: ModelProto.pieces = 1, .normalizer_spec = 3;
# SentencePiece.piece = 1 (string), .score = 2 (float: wire type 5, fixed32), .type = 3 (enum: wire type 0)
NORMAL, UNKNOWN, CONTROL = 1, 2, 3  # ModelProto.SentencePiece.Type


def piece_message(piece, score, kind):
    return (length_delimited(1, piece.encode()) + varint(2 << 3 | 5) + struct.pack("<f", score)
            + varint(3 << 3) + varint(kind))


def model_proto(path):
    """tokenizer.json of a T5 tokenizer -> (serialized sentencepiece ModelProto, {added token: id})."""
    spec = json.load(open(path, encoding="utf-8"))
    model, added = spec.get("model") or {}, spec.get("added_tokens") or []

    def parts(key):  # a normalizer or pre-tokenizer: alone, or the members of a Sequence
        part = spec.get(key) or {}
        return part.get("normalizers") or part.get("pretokenizers") or [part]

    # transformers 5's T5Tokenizer takes the charsmap alone too (older files may add white-space rules, which it drops)
    charsmaps = [n["precompiled_charsmap"] for n in parts("normalizer") if n.get("type") == "Precompiled"]
    prefix = [m.get("prepend_scheme", "always" if m.get("add_prefix_space", True) else "never")
              for m in parts("pre_tokenizer") if m.get("type") == "Metaspace" and m.get("replacement") == "▁"]
    checks = [(model.get("type") == "Unigram", "a Unigram model"), (model.get("unk_id") is not None, "an unk_id"),
              (not model.get("byte_fallback"), "no byte fallback"),
              (charsmaps, "a Precompiled normalizer (sentencepiece's charsmap)"),
              (prefix == ["always"], "one Metaspace pre-tokenizer that prepends ▁ to every word ('always')"),
              (not any(t.get(k) for t in added for k in ("lstrip", "rstrip", "single_word", "normalized")),
               "added tokens matched as written (no lstrip, rstrip, single_word, normalized)")]
    if missing := [what for ok, what in checks if not ok]:
        raise ValueError(f"{path} is not a T5 tokenizer as transformers writes it, which has {'; '.join(missing)}; "
                         "pass a T5 spiece.model or tokenizer.json")
    # added tokens (pad, eos, the sentinels) are cut out of the text before sentencepiece runs, as transformers
    # does: CONTROL pieces, which sentencepiece never emits from text; unk_id is its one UNKNOWN piece
    control = {t["id"] for t in added}
    pieces = b"".join(length_delimited(1, piece_message(piece, score, UNKNOWN if i == model["unk_id"] else
                                                        CONTROL if i in control else NORMAL))
                      for i, (piece, score) in enumerate(model["vocab"]))
    # NormalizerSpec: precompiled_charsmap = 2, add_dummy_prefix = 3 (Metaspace's ▁ before the first word),
    # remove_extra_whitespaces = 4 (transformers splits words on white space), escape_whitespaces = 5 (" " -> ▁)
    normalizer = length_delimited(2, base64.b64decode(charsmaps[0]))
    normalizer += b"".join(varint(f << 3) + b"\x01" for f in (3, 4, 5))  # wire type 0, true
    return pieces + length_delimited(3, normalizer), {t["content"]: t["id"] for t in added}


# ------------------------------------------------------------------------------------------ tokenizer

class Tokenizer:
    """T5's sentencepiece tokenizer with the ids and mask of transformers' T5Tokenizer(padding="max_length",
    max_length=300, truncation=True): eos </s> (1) appended, no bos, padded with <pad> (0), cut to 299 tokens
    + eos; mask 1 on real tokens and the eos. Like transformers, the strings </s>, <pad>, <unk>, <extra_id_N>
    in a prompt become those ids, and U+0085/1680/2028/2029 (white space that sentencepiece's NFKC leaves
    alone, but transformers' pre-tokenizer splits on) separate words. Pad, eos and the sentinels stay control
    pieces, which sentencepiece never matches inside text, as in T5's spiece.model: where NFKC makes one out of
    other characters (fullwidth ＜pad＞) they stay text, as in sentencepiece itself and transformers 4's
    T5Tokenizer; transformers 5's Unigram (the tokenizers library: no control pieces) emits the token there."""

    SPACES = re.compile("[\x85\u1680\u2028\u2029]")

    def __init__(self, path, max_length=300):
        file = find(path)
        self.max_length = max_length
        if file.endswith(".json"):
            proto, self.special = model_proto(file)
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        else:  # spiece.model holds T5's 32000 pieces; transformers appends the 100 sentinels in reverse
            self.sp = sentencepiece.SentencePieceProcessor(model_file=file)
            n = self.sp.get_piece_size()
            self.special = {p: self.sp.piece_to_id(p) for p in ("<pad>", "</s>", "<unk>")}
            self.special |= {f"<extra_id_{i}>": n + 99 - i for i in range(100)}  # <extra_id_0> = 32099
        ids = [self.special.get(p) for p in ("<pad>", "</s>", "<unk>")]
        if ids != [0, 1, 2]:
            raise ValueError(f"{file} is not a T5 tokenizer: <pad>, </s>, <unk> have ids {ids}, T5 needs 0, 1, 2")
        # transformers cuts added tokens out of the raw text, the longest first where two start at one place
        self.split = re.compile("(" + "|".join(map(re.escape, sorted(self.special, key=len, reverse=True))) + ")")

    def encode(self, text):
        """Token ids of one prompt, without the eos."""
        chunks = self.split.split(self.SPACES.sub(" ", text))  # odd positions are added-token strings
        return [i for j, c in enumerate(chunks) for i in ([self.special[c]] if j % 2 else self.sp.encode(c))]

    def __call__(self, prompts):  # list of str -> ids (N, max_length) long, mask (N, max_length) long
        prompts = [prompts] if isinstance(prompts, str) else prompts
        ids = torch.full((len(prompts), self.max_length), self.special["<pad>"], dtype=torch.long)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for n, prompt in enumerate(prompts):
            tokens = self.encode(prompt)
            if len(tokens) > self.max_length - 1:
                warnings.warn(f"prompt {n} has {len(tokens) + 1} tokens with the eos; T5 keeps the first "
                              f"{self.max_length - 1} and the eos: {prompt[:60]!r}...")
                tokens = tokens[: self.max_length - 1]
            tokens.append(self.special["</s>"])
            ids[n, : len(tokens)] = torch.tensor(tokens)
            mask[n, : len(tokens)] = 1
        return ids, mask
