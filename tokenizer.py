"""T5's tokenizer (Raffel et al., arXiv 1910.10683): a sentencepiece unigram model, run by sentencepiece.

    tokenizer = Tokenizer("pixart_sigma_sdxlvae_T5_diffusers/tokenizer/spiece.model")  # or its folder
    ids, mask = tokenizer(["a cat on a mat", ""])  # (2, 300), (2, 300)
"""
import os
import re
import warnings

import sentencepiece
import torch


class Tokenizer:
    """T5's sentencepiece tokenizer with the ids and mask of transformers' T5Tokenizer(padding="max_length",
    max_length=300, truncation=True): eos </s> (1) appended, no bos, padded with <pad> (0), cut to 299 tokens
    + eos; mask 1 on real tokens and the eos. Like transformers, the strings </s>, <pad>, <unk>, <extra_id_N>
    in a prompt become those ids, and U+0085/1680/2028/2029 (white space that sentencepiece's NFKC leaves
    alone, but transformers' pre-tokenizer splits on) separate words."""

    SPECIAL = re.compile(r"(</s>|<pad>|<unk>|<extra_id_[1-9]?\d>)")
    SPACES = re.compile("[\x85\u1680\u2028\u2029]")

    def __init__(self, spiece_model_path, max_length=300):
        path = spiece_model_path
        if os.path.isdir(path):
            path = os.path.join(path, "spiece.model")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no sentencepiece model at {path}; pass the tokenizer/spiece.model file "
                                    "(or its folder) of PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self.max_length = max_length
        n = self.sp.get_piece_size()  # T5: 32000; the 100 sentinels follow in reverse: <extra_id_0> = 32099
        self.special = {p: self.sp.piece_to_id(p) for p in ("<pad>", "</s>", "<unk>")}
        if list(self.special.values()) != [0, 1, 2]:
            raise ValueError(f"{path} is not a T5 sentencepiece model: <pad>, </s>, <unk> have ids "
                             f"{list(self.special.values())}, T5 needs 0, 1, 2")
        self.special |= {f"<extra_id_{i}>": n + 99 - i for i in range(100)}

    def encode(self, text):
        """Token ids of one prompt, without the eos."""
        chunks = self.SPECIAL.split(self.SPACES.sub(" ", text))  # odd positions are special-token strings
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
