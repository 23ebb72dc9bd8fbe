"""Plain-PyTorch twins of the kernels: the reference semantics, and the CPU path.

Shapes (Hq query heads, Hkv key/value heads, D head_dim, T query tokens):
    q        [T, Hq, D]   queries, already rotated at their own positions
    k, v     [T, Hkv, D]  new keys (rotated) / values to store
    k_cache  [num_blocks, block_size, Hkv, D]   (v_cache alike)
    inv_freq fp32 [D/2]   the model's rope inverse frequencies (scaling already applied)
See `nanodance.attention_metadata` for the metadata contract.

Diff kernels (the KV collector and the `pic` baseline), N tokens addressed by flat pool slot
(slot = block * block_size + offset):
    key_deviation  k_fresh [N, Hkv, D], src_slots int64 [N], delta int32 [N] -> fp32 [N]
    rotate_copy    src_slots / dst_slots int64 [N], delta int32 [N]; in place on the caches
    per_block_sum  fp32 [N] per-token values, int64 [N] block index -> fp32 [num_blocks]
"""
from __future__ import annotations

from dataclasses import dataclass

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


PAD_POS = 2**30  # a key position no query can reach


@dataclass
class KVGather:
    """Dense gather indices for the torch attention path (one per step, shared by layers).

    slots   int64 [B, L]  flat pool slot of each key (0 for padding)
    pos     int32 [B, L]  key position in the sequence (huge for padding, so it is masked)
    delta   int32 [B, L]  rope delta of the view that holds the key
    any_delta bool        False when every delta is 0 (skip the rotation entirely)
    """

    slots: torch.Tensor
    pos: torch.Tensor
    delta: torch.Tensor
    any_delta: bool


def kv_gather(meta: AttentionMetadata) -> KVGather:
    """The step's gather indices, built on first use and kept in `meta.step_cache` for every layer."""
    g = meta.step_cache.get("kv_gather")
    if g is None:
        g = meta.step_cache["kv_gather"] = build_kv_gather(meta.views, meta.num_views, meta.block_size,
                                                           meta.max_kv_len)
    return g


def build_kv_gather(views: torch.Tensor, num_views: torch.Tensor, block_size: int, max_kv_len: int) -> KVGather:
    """Expand view rows into per-key slot/position/delta rows (vectorized, no Python per key)."""
    device = views.device
    B, V, _ = views.shape
    L = max(max_kv_len, 1)
    block, lo, hi, pos0, delta = views.long().unbind(-1)  # each [B, V]
    valid_view = torch.arange(V, device=device)[None, :] < num_views.long()[:, None]
    length = torch.where(valid_view, hi - lo, torch.zeros_like(hi))
    start = torch.cumsum(length, dim=1) - length  # offset of each view in the gathered keys
    # For each key column j, find its view: the last view whose start <= j.
    j = torch.arange(L, device=device)
    owner = torch.searchsorted(torch.cumsum(length, dim=1), j[None, :].expand(B, L).contiguous(), right=True)
    total = length.sum(dim=1, keepdim=True)
    valid = j[None, :] < total
    owner = owner.clamp(max=V - 1)
    offset = j[None, :] - torch.gather(start, 1, owner)
    slot = torch.gather(block * block_size + lo, 1, owner) + offset
    pos = torch.gather(pos0, 1, owner) + offset
    dlt = torch.gather(delta, 1, owner)
    slots = torch.where(valid, slot, torch.zeros_like(slot))
    pos = torch.where(valid, pos, torch.full_like(pos, PAD_POS)).to(torch.int32)
    dlt = torch.where(valid, dlt, torch.zeros_like(dlt)).to(torch.int32)
    return KVGather(slots=slots, pos=pos, delta=dlt, any_delta=bool((dlt != 0).any()))


def store_kv_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Scatter k/v rows into flat pool slots; slot -1 rows are skipped."""
    keep = slot_mapping >= 0
    if bool(keep.all()):  # the usual case: skip the boolean-mask copies
        slots = slot_mapping.long()
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))
        return
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: AttentionMetadata, inv_freq: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of each query over its sequence's views, causal by position. Returns [T, Hq, D].

    Keys of views with a non-zero delta are rotated forward by the delta (in fp32, then back to
    the dtype of the computation) which is the same as rotating the query by -delta.
    A query that sees no key at all gets a zero output row (the Triton kernel does the same).
    """
    T, Hq, D = q.shape
    B = meta.num_seqs
    g = kv_gather(meta)
    Hkv = k_cache.shape[2]
    m = _step_masks(meta, g, T)
    k = k_cache.view(-1, Hkv, D)[m.slots]  # [B, L, Hkv, D]
    v = v_cache.view(-1, Hkv, D)[m.slots]
    if m.zero_padding:
        # Zero the padding keys/values: NaN garbage there would leak through the masked softmax
        # (NaN * 0 = NaN in the P @ V product).
        k = k.masked_fill(~m.valid[:, :, None, None], 0)
        v = v.masked_fill(~m.valid[:, :, None, None], 0)
    if g.any_delta:
        cos, sin = rope_cos_sin(g.delta, inv_freq)  # [B, L, D]
        k = rotate(k.float(), cos[:, :, None], sin[:, :, None])
    # Pad the ragged queries into [B, Qmax] (a plain view when there is nothing to pad).
    if m.dense_q:
        qp = q.view(B, -1, Hq, D)
    else:
        qp = q.new_zeros(B, max(meta.max_seqlen_q, 1), Hq, D)
        qp[m.seq, m.row] = q
    out = torch.nn.functional.scaled_dot_product_attention(
        qp.transpose(1, 2), k.to(q.dtype).transpose(1, 2), v.to(q.dtype).transpose(1, 2),
        attn_mask=m.attn_mask, scale=scale, enable_gqa=(Hq != Hkv))  # [B, Hq, Q, D]
    out = out.transpose(1, 2)  # [B, Q, Hq, D]
    if m.any_empty:
        out = out.masked_fill(m.sees_nothing[..., None], 0.0)
    return out.reshape(T, Hq, D) if m.dense_q else out[m.seq, m.row]


@dataclass
class _StepMasks:
    """What every layer of one step needs to lay out and mask its attention (built once)."""

    seq: torch.Tensor  # [T] sequence of each query row
    row: torch.Tensor  # [T] row of each query within its sequence
    slots: torch.Tensor  # [B, L] pool slots to gather (padding reads the row's first key: finite)
    valid: torch.Tensor  # [B, L] gathered key slot holds a key (not padding)
    sees_nothing: torch.Tensor  # [B, Q, 1] query rows with no visible key
    attn_mask: torch.Tensor | None  # [B, 1, Q, L], or None when every query sees every key
    zero_padding: bool  # some row has padding but no key to read instead: zero it after the gather
    any_empty: bool  # some query row sees no key
    dense_q: bool  # every sequence has max_seqlen_q queries: [T] reshapes to [B, Q]


def _step_masks(meta: AttentionMetadata, g, T: int) -> _StepMasks:
    """The step's masks and layout flags, built on a step's first layer and kept in
    `meta.step_cache` for the others. The flags let the common cases (a decode batch, one
    unpadded prompt) skip masking work that would change nothing."""
    cached = meta.step_cache.get("torch_masks")
    if cached is not None:
        return cached
    B, device = meta.num_seqs, meta.q_pos.device
    cu = meta.cu_seqlens_q.long()
    counts = cu[1:] - cu[:-1]
    Q = max(meta.max_seqlen_q, 1)
    row = torch.arange(T, device=device) - torch.repeat_interleave(cu[:-1], counts, output_size=T)
    seq = torch.repeat_interleave(torch.arange(B, device=device), counts, output_size=T)
    qpos = torch.full((B, Q), -1, dtype=torch.long, device=device)
    qpos[seq, row] = meta.q_pos.long()
    valid = g.pos != PAD_POS  # [B, L]; padding gathers slot 0, whose contents may be garbage
    mask = g.pos.long()[:, None, :] <= qpos[:, :, None]  # [B, Q, L]
    # Rows that see no key (padding rows, or a query before every key) would be NaN (softmax of
    # nothing): let them see everything, then zero them below.
    sees_nothing = ~mask.any(dim=-1, keepdim=True)  # [B, Q, 1]
    mask = mask | sees_nothing
    any_empty = bool(sees_nothing.any())
    # Padding slots re-read the row's first key (a written slot; the mask hides it) instead of
    # slot 0, whose contents may be garbage: then no per-layer zeroing of the gathered K/V.
    has_key = valid[:, :1]
    slots = torch.where(valid, g.slots, g.slots[:, :1]) if bool(has_key.all()) else g.slots
    masks = _StepMasks(seq=seq, row=row, slots=slots, valid=valid, sees_nothing=sees_nothing,
                       attn_mask=None if bool(mask.all()) else mask[:, None],
                       zero_padding=not bool(valid.all()) and not bool(has_key.all()),
                       any_empty=any_empty, dense_q=T == B * Q)
    meta.step_cache["torch_masks"] = masks
    return masks


def key_deviation_torch(k_fresh: torch.Tensor, k_cache: torch.Tensor, src_slots: torch.Tensor,
                        delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Per-token squared distance between fresh keys and reused cached keys. Returns fp32 [N].

    k_fresh [N, Hkv, D] was computed at the token's new position; the cached key at
    `src_slots[i]` was rotated at position (new position - delta[i]), so it is first rotated
    forward by delta[i] in fp32 to compare both in the same frame. A slot of -1 gives 0.
    """
    N, Hkv, D = k_fresh.shape
    valid = src_slots >= 0
    cached = k_cache.view(-1, Hkv, D)[src_slots.clamp(min=0).long()].float()  # [N, Hkv, D]
    cos, sin = rope_cos_sin(delta, inv_freq)  # [N, D]
    reused = rotate(cached, cos[:, None], sin[:, None])
    dev = (k_fresh.float() - reused).square().sum(dim=(1, 2))
    return torch.where(valid, dev, torch.zeros_like(dev))


def rotate_copy_torch(k_cache: torch.Tensor, v_cache: torch.Tensor, src_slots: torch.Tensor,
                      dst_slots: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> None:
    """Copy K (rotated forward by delta in fp32, rounded once) and V from src to dst slots, in place.

    The `pic` baseline's dense re-positioned copy. Rows with src or dst -1 are skipped. The dst
    slots must not overlap the src slots of other rows (the Triton kernel copies in parallel).
    """
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    keep = (src_slots >= 0) & (dst_slots >= 0)
    src, dst = src_slots[keep].long(), dst_slots[keep].long()
    kf, vf = k_cache.view(-1, Hkv, D), v_cache.view(-1, Hkv, D)
    cos, sin = rope_cos_sin(delta[keep], inv_freq)  # [n, D]
    k = rotate(kf[src].float(), cos[:, None], sin[:, None]).to(k_cache.dtype)
    v = vf[src]  # gathered before any write: read-all-then-write semantics
    kf[dst] = k
    vf[dst] = v


def per_block_sum(per_token: torch.Tensor, block_index: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Sum per-token values into per-block totals: fp32 [N], int64 [N] in [0, num_blocks) -> fp32 [num_blocks].

    The collector's unit of recompute is a block, so it ranks blocks by summed key deviation.
    """
    out = torch.zeros(num_blocks, dtype=torch.float32, device=per_token.device)
    return out.index_add_(0, block_index.long(), per_token.float())
