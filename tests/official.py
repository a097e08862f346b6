"""The released PixArt-Σ .pth layout (official PixArtMS), written from a diffusers PixArtTransformer2DModel state
dict by a mapping of the tests' own: nothing here comes from sigma.py, so loading the result with
weights.load_checkpoint and comparing with diffusers' forward checks how sigma reads the official format
(tests/data/pixart_sigma_xl2_keys.json holds the official names and shapes this mapping must produce)."""
import torch

# diffusers module -> official module, outside the blocks
TOP = {"pos_embed.proj": "x_embedder.proj",
       "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
       "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
       "adaln_single.linear": "t_block.1",
       "caption_projection.linear_1": "y_embedder.y_proj.fc1",
       "caption_projection.linear_2": "y_embedder.y_proj.fc2",
       "proj_out": "final_layer.linear"}
# inside transformer_blocks.i / blocks.i
BLOCK = {"attn1.to_out.0": "attn.proj", "attn2.to_q": "cross_attn.q_linear", "attn2.to_out.0": "cross_attn.proj",
         "ff.net.0.proj": "mlp.fc1", "ff.net.2": "mlp.fc2"}
# the official model fuses these Linears, concatenated on the output dimension in this order
FUSED = {"attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v")}


def official_layout(sd, y_embedding, pos_embed):
    """diffusers state dict -> the official .pth state dict, plus its two buffers: the null caption
    `y_embedder.y_embedding` (L, caption channels) and `pos_embed` (1, T, D) of the training grid."""
    out, used = {}, set()

    def take(key):
        used.add(key)
        return sd[key]

    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    for s in ("weight", "bias"):
        out.update({f"{official}.{s}": take(f"{name}.{s}") for name, official in TOP.items()})
    out["final_layer.scale_shift_table"] = take("scale_shift_table")
    for i in range(depth):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        out[ours + "scale_shift_table"] = take(theirs + "scale_shift_table")
        for s in ("weight", "bias"):
            out.update({f"{ours}{official}.{s}": take(f"{theirs}{name}.{s}") for name, official in BLOCK.items()})
            out.update({f"{ours}{official}.{s}": torch.cat([take(f"{theirs}{p}.{s}") for p in parts])
                        for official, parts in FUSED.items()})
    assert used == set(sd), f"diffusers tensors left unmapped: {sorted(set(sd) - used)}"
    return {**out, "y_embedder.y_embedding": y_embedding, "pos_embed": pos_embed}
