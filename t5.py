"""The frozen text encoder of PixArt-Σ (arXiv 2403.04692): the T5 v1.1 XXL encoder (its tokenizer: tokenizer.py).

PixArt-Σ conditions on the last hidden state of T5-XXL's encoder (Raffel et al., arXiv 1910.10683, the
"v1.1" checkpoints), 300 tokens per prompt (PixArt-α: 120). How the v1.1 encoder differs from a textbook one:
  - no absolute positions: a learned scalar per (head, relative-position bucket) is added to the attention
    scores; the table lives in block 0 and all 24 blocks reuse its bias. Buckets are exact for |k−q| < 8,
    log-spaced up to 128, one set per direction;
  - attention scores are NOT scaled by 1/√d_kv (T5 folds the scale into the init of q);
  - pre-norm RMSNorm (no mean, no bias, mean square in fp32) and a final RMSNorm; no bias in any Linear;
  - gated-GELU feed-forward wo(gelu_tanh(wi_0 x) · wi_1 x) (original T5: wo(relu(wi x))).
Letters: N batch, L text tokens (300), D d_model (4096), H heads (64), F d_ff (10240).
Modules are named after the checkpoint keys (shared, encoder.block.i.layer.0.SelfAttention.q, ...), so
loading the released text_encoder/ folder is the identity (weights.load_t5 reads its fp32 shards into bf16).

    from tokenizer import Tokenizer
    tokenizer = Tokenizer("pixart_sigma_sdxlvae_T5_diffusers/tokenizer")
    model = weights.load_t5("pixart_sigma_sdxlvae_T5_diffusers/text_encoder", dtype=torch.bfloat16, device="cuda")
    y, mask = encode(model, tokenizer, ["a cat on a mat", ""])  # (2, 300, 4096), (2, 300); "" = null caption

CPU dtype: bf16 is the default on CPU too. Measured (bench/benchmark.py t5) on the project's 2-core AMD EPYC
with AVX512-BF16, torch 2.13, 2 of T5-XXL's layers, 2 prompts × 300 tokens: fp32 10.2–13.5 s, bf16 4.2–6.0 s
(bf16/fp32 0.40–0.46 in each of 4 runs), and bf16 halves the memory (T5-XXL 9.5 GB vs 19 GB). On a CPU
without native bf16 matmuls fp32 may be faster: pass dtype=torch.float32 there.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class T5Config:  # field names as in transformers' T5Config / the released config.json
    vocab_size: int = 32128  # 32000 sentencepiece pieces + 100 sentinels, padded to a multiple of 128
    d_model: int = 4096
    d_ff: int = 10240
    num_heads: int = 64
    d_kv: int = 64  # per-head width; num_heads * d_kv need not equal d_model in T5
    num_layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6


def relative_position_bucket(rel, num_buckets=32, max_distance=128):
    """Bidirectional T5 bucket of rel = key position − query position (long tensor, any shape)."""
    half = num_buckets // 2  # buckets [0, 16) for keys at or before the query, [16, 32) for keys after it
    bucket = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2  # |rel| < 8 gets a bucket of its own ...
    log = exact + (torch.log(rel.clamp(min=exact).float() / exact)  # ... larger |rel| a log-spaced one
                   / math.log(max_distance / exact) * (half - exact)).long()
    return bucket + torch.where(rel < exact, rel, log.clamp(max=half - 1))  # everything ≥ 128 shares the last


class T5LayerNorm(nn.Module):  # RMSNorm: no mean, no bias; mean square in fp32 even for bf16 x
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # = weight · (x · rsqrt(mean(x²) + eps)) computed in fp32, rounded, then scaled
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(self.weight.dtype)


class T5Attention(nn.Module):
    def __init__(self, cfg, has_relative_attention_bias):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:  # block 0 only; its table serves all blocks
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def forward(self, x, bias):  # x (N, L, D), bias (N, H, L, L) = position bias + padding mask
        N, L, _ = x.shape
        q, k, v = (f(x).view(N, L, self.num_heads, -1).transpose(1, 2)  # (N, H, L, d_kv)
                   for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # T5: no 1/√d_kv
        return self.o(y.transpose(1, 2).reshape(N, L, -1))  # (N, L, D)


class T5DenseGatedActDense(nn.Module):  # the checkpoint calls it DenseReluDense even in the gated-GELU v1.1
    def __init__(self, cfg):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):  # (N, L, D)
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))  # (N, L, F) -> (N, L, D)


class T5Block(nn.Module):
    def __init__(self, cfg, has_relative_attention_bias):
        super().__init__()
        attn, ffn = nn.Module(), nn.Module()  # plain containers, so the keys read layer.0.SelfAttention...
        attn.SelfAttention = T5Attention(cfg, has_relative_attention_bias)
        attn.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        ffn.DenseReluDense = T5DenseGatedActDense(cfg)
        ffn.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.layer = nn.ModuleList([attn, ffn])

    def forward(self, x, bias):
        attn, ffn = self.layer
        x = x + attn.SelfAttention(attn.layer_norm(x), bias)  # pre-norm residual
        return x + ffn.DenseReluDense(ffn.layer_norm(x))


class T5Encoder(nn.Module):
    def __init__(self, config=T5Config()):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = nn.Module()
        self.encoder.block = nn.ModuleList([T5Block(config, i == 0) for i in range(config.num_layers)])
        self.encoder.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, ids, mask=None):  # ids (N, L) long, mask (N, L) 1 = real token -> (N, L, D)
        N, L = ids.shape
        x = self.shared(ids)  # (N, L, D)
        pos = torch.arange(L, device=ids.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.config.relative_attention_num_buckets,
                                           self.config.relative_attention_max_distance)  # (L, L): [q, k] -> k − q
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        bias = table(buckets).permute(2, 0, 1)[None]  # (1, H, L, L), computed once, shared by every block
        if mask is not None:  # padded keys get the most negative finite value (never -inf: no NaN rows)
            bias = bias + (1 - mask.to(bias.dtype))[:, None, None, :] * torch.finfo(bias.dtype).min  # (N, H, L, L)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


@torch.inference_mode()
def encode(model, tokenizer, prompts):
    """Prompts -> (features (N, L, D) in the model's dtype, mask (N, L)) on the model's device."""
    ids, mask = (t.to(next(model.parameters()).device) for t in tokenizer(prompts))
    return model(ids, mask), mask
