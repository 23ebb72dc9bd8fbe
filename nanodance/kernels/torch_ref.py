"""Plain-PyTorch twins of the kernels: the reference semantics, and the CPU path.

Shapes (Hq query heads, Hkv key/value heads, D head_dim, T query tokens):
    q        [T, Hq, D]   queries, already rotated at their own positions
    k, v     [T, Hkv, D]  new keys (rotated) / values to store
    k_cache  [num_blocks, block_size, Hkv, D]   (v_cache alike)
    inv_freq fp32 [D/2]   the model's rope inverse frequencies (scaling already applied)
See `nanodance.attention_metadata` for the metadata contract.
"""
from __future__ import annotations

import torch

from nanodance.attention_metadata import AttentionMetadata


def rope_cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of angle pos * inv_freq in fp32, each [*pos.shape, D] (rotate-half layout)."""
    angle = pos.to(torch.float32)[..., None] * inv_freq.to(torch.float32)
    angle = torch.cat([angle, angle], dim=-1)
    return angle.cos(), angle.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x * cos + rotate_half(x) * sin (Hugging Face convention)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def store_kv_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Scatter k/v rows into flat pool slots; slot -1 rows are skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: AttentionMetadata, inv_freq: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of each query over its sequence's views, causal by position. Returns [T, Hq, D].

    Keys of views with a non-zero delta are rotated forward by the delta (in fp32, then back to
    the cache dtype of the computation) which is the same as rotating the query by -delta.
    """
    T, Hq, D = q.shape
    B = meta.num_seqs
    g = meta.kv_gather()
    Hkv = k_cache.shape[2]
    k = k_cache.view(-1, Hkv, D)[g.slots]  # [B, L, Hkv, D]
    v = v_cache.view(-1, Hkv, D)[g.slots]
    if g.any_delta:
        cos, sin = rope_cos_sin(g.delta, inv_freq)  # [B, L, D]
        k = rotate(k.float(), cos[:, :, None], sin[:, :, None]).to(q.dtype)
    # Pad the ragged queries into [B, Qmax].
    cu = meta.cu_seqlens_q.long()
    counts = cu[1:] - cu[:-1]
    Q = meta.max_seqlen_q
    row = torch.arange(T, device=q.device) - torch.repeat_interleave(cu[:-1], counts, output_size=T)
    seq = torch.repeat_interleave(torch.arange(B, device=q.device), counts, output_size=T)
    qp = q.new_zeros(B, Q, Hq, D)
    qp[seq, row] = q
    qpos = torch.full((B, Q), -1, dtype=torch.long, device=q.device)
    qpos[seq, row] = meta.q_pos.long()
    mask = g.pos.long()[:, None, :] <= qpos[:, :, None]  # [B, Q, L]
    # Padding query rows would see no key at all (softmax of nothing is NaN): let them see all.
    mask = mask | (qpos[:, :, None] < 0)
    out = torch.nn.functional.scaled_dot_product_attention(
        qp.transpose(1, 2), k.to(q.dtype).transpose(1, 2), v.to(q.dtype).transpose(1, 2),
        attn_mask=mask[:, None], scale=scale, enable_gqa=(Hq != Hkv))  # [B, Hq, Q, D]
    return out.transpose(1, 2)[seq, row]
