"""An independent full-materialization HyperCloning reference, in plain torch block algebra.

It builds each whole destination tensor from the whole source tensor by assembling clone blocks
(no index maps, no slices, no planner), so agreement with megaclone's per-rank output is evidence,
not a tautology. Exact variants only: 'symmetric' and 'diagonal'.
"""

from __future__ import annotations

import torch


def blocks(w: torch.Tensor, c_out: int, c_in: int, diagonal: bool) -> torch.Tensor:
    """[c_out*O, c_in*I] from [O, I]: block (bo, bi) is W/c_in (symmetric), or under the diagonal
    variant W iff bi == bo when both axes grow by one factor (paper section 3.4; symmetric otherwise)."""
    diagonal = diagonal and c_out == c_in > 1
    out_rows = []
    for bo in range(c_out):
        row = []
        for bi in range(c_in):
            if diagonal:
                row.append(w if bi == bo else torch.zeros_like(w))
            else:
                row.append(w / c_in)
        out_rows.append(torch.cat(row, dim=1))
    return torch.cat(out_rows, dim=0)


def pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    if w.shape[0] >= rows:
        return w[:rows]
    return torch.cat([w, torch.zeros((rows - w.shape[0],) + tuple(w.shape[1:]), dtype=w.dtype)])


def expand_reference(src: dict[str, torch.Tensor], s, d, variant: str) -> dict[str, torch.Tensor]:
    """Destination tensors (torch_dist keys, layers stacked) for source spec ``s`` grown to ``d``."""
    diag = variant == "diagonal"
    n = d.hidden_size // s.hidden_size
    k = d.num_attention_heads // s.num_attention_heads
    m = d.ffn_hidden_size // s.ffn_hidden_size
    out: dict[str, torch.Tensor] = {}
    L = "decoder.layers."

    def per_layer(key, fn):
        out[key] = torch.stack([fn(src[key][i]) for i in range(src[key].shape[0])])

    for key, w in src.items():
        if "norm" in key or key.endswith(".bias") and ("linear_proj" in key or "linear_fc2" in key):
            tiled = w.repeat(*([1] * (w.dim() - 1)), n)
            if key.startswith("decoder.final_layernorm") and not d.untie_embeddings_and_output_weights:
                tiled = tiled / n
            out[key] = tiled
    e = src["embedding.word_embeddings.weight"]
    out["embedding.word_embeddings.weight"] = pad_rows(e, d.padded_vocab_size).repeat(1, n)
    if "embedding.position_embeddings.weight" in src:
        out["embedding.position_embeddings.weight"] = src["embedding.position_embeddings.weight"].repeat(1, n)
    if "output_layer.weight" in src:
        out["output_layer.weight"] = blocks(pad_rows(src["output_layer.weight"], d.padded_vocab_size), 1, n, diag)

    # fused QKV: whole query groups repeat k times (block-major); inputs are hidden (c_in = n)
    per_layer(f"{L}self_attention.linear_qkv.weight", lambda w: blocks(w, k, n, diag))
    if f"{L}self_attention.linear_qkv.bias" in src:
        per_layer(f"{L}self_attention.linear_qkv.bias", lambda b: b.repeat(k))
    # proj: outputs hidden (c_out = n), inputs are heads (c_in = k)
    per_layer(f"{L}self_attention.linear_proj.weight", lambda w: blocks(w, n, k, diag))

    def fc1(w):
        if not s.swiglu:
            return blocks(w, m, n, diag)
        gate, up = w.chunk(2, dim=0)
        return torch.cat([blocks(gate, m, n, diag), blocks(up, m, n, diag)])

    per_layer(f"{L}mlp.linear_fc1.weight", fc1)
    if f"{L}mlp.linear_fc1.bias" in src:
        per_layer(f"{L}mlp.linear_fc1.bias",
                  lambda b: torch.cat([c.repeat(m) for c in b.chunk(2)]) if s.swiglu else b.repeat(m))
    per_layer(f"{L}mlp.linear_fc2.weight", lambda w: blocks(w, n, m, diag))
    return out


def deepen_reference(wide: dict, layers: int, factor: int, placement: str, init: str) -> dict:
    """The depth-grown model from the (width-grown) one, written out layer by layer: interleave puts
    copies 1..factor-1 of layer l right after it, top repeats the stack; identity zeroes every copy's
    attention output and second MLP projection (weights and biases)."""
    order = ([(l, c) for l in range(layers) for c in range(factor)] if placement == "interleave"
             else [(l, c) for c in range(factor) for l in range(layers)])
    out = {}
    for key, t in wide.items():
        if not key.startswith("decoder.layers."):
            out[key] = t
            continue
        residual = "linear_proj." in key or "linear_fc2." in key
        out[key] = torch.stack([torch.zeros_like(t[l]) if c and init == "identity" and residual else t[l]
                                for l, c in order])
    return out


def zero_sum_violation(noisy: torch.Tensor, base: torch.Tensor, c_out_rows: int, c_in: int) -> float:
    """max |sum over input blocks of (noisy - base)| for a [R, c_in*I] matrix (0 when noise is zero-sum)."""
    delta = (noisy - base).double()
    cols = delta.shape[-1] // c_in
    return delta.reshape(*delta.shape[:-1], c_in, cols).sum(dim=-2).abs().max().item()
