"""Speculative forward modes for SGLang's stock torch_native attention backend (dcp 1, CPU).

Stock torch_native runs extend and decode only. The speculative passes add:

* TARGET_VERIFY: the ``N`` draft tokens of request ``b`` (committed length ``L``) are written
  at ``out_cache_loc``, which holds ``req_to_token[r_b, L : L + N]``, and draft token ``i``
  attends to key ``j`` of ``req_to_token[r_b, : L + N]`` where the verify's ``custom_mask``
  says so: request after request, ``N`` rows of ``L + N`` booleans (prefix, then the tree);
* the draft's decode steps (``TorchNativeDraftStepBackend``): query ``b * topk + t`` of
  step ``s`` attends to ``req_to_token[r_b, :L]`` and to its branch's slots so far,
  ``out_cache_loc[b, t, : s + 1]`` of the draft's ``[B, topk, steps]`` layout
  (``eagle_utils.per_step_draft_out_cache_loc``);
* DRAFT_EXTEND(_V2) is a causal extend, which stock torch_native runs as it is.
"""

from typing import List

import torch
from torch.nn.functional import scaled_dot_product_attention

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc


def attend(q: torch.Tensor, slots: torch.Tensor, layer, backend, mask=None) -> torch.Tensor:
    """``q [T, Hq, d]`` over the cached K/V at ``slots``, optionally masked by ``mask [T, len(slots)]``
    (True: attend); returns ``[T, Hq, dv]``. K/V are read as the cache stores them, as stock
    torch_native does."""
    pool = backend.token_to_kv_pool
    k = pool.get_key_buffer(layer.layer_id)[slots].to(q.dtype)
    v = pool.get_value_buffer(layer.layer_id)[slots].to(q.dtype)
    out = scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num,
        scale=layer.scaling,
    )
    return out.squeeze(0).transpose(0, 1)


def store_new_kv(backend, layer, forward_batch, k, v, save_kv_cache: bool) -> None:
    if save_kv_cache and k is not None and v is not None:
        backend.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)


def verify_mask_rows(forward_batch) -> List[torch.Tensor]:
    """Per request, its ``[N, L + N]`` rows of the verify's ``custom_mask``."""
    num_draft = forward_batch.spec_info.draft_token_num
    mask = forward_batch.spec_info.custom_mask.reshape(-1)
    rows, offset = [], 0
    for length in forward_batch.seq_lens[: forward_batch.batch_size].tolist():
        width = length + num_draft
        rows.append(mask[offset : offset + num_draft * width].view(num_draft, width).bool())
        offset += num_draft * width
    return rows


def verify_with_tree_mask(original, backend, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
    """Around ``TorchNativeAttnBackend.forward_extend``: TARGET_VERIFY attends through the
    verify's tree mask (module docstring); any other mode runs stock."""
    if not forward_batch.forward_mode.is_target_verify():
        return original(backend, q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
    store_new_kv(backend, layer, forward_batch, k, v, save_kv_cache)
    num_draft = forward_batch.spec_info.draft_token_num
    q = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
    o = q.new_empty((q.shape[0], layer.tp_q_head_num, layer.v_head_dim))
    req_to_token = backend.req_to_token_pool.req_to_token
    for b, (row, mask) in enumerate(zip(forward_batch.req_pool_indices.tolist(), verify_mask_rows(forward_batch))):
        span = slice(b * num_draft, (b + 1) * num_draft)
        slots = req_to_token[row, : mask.shape[1]]
        o[span] = attend(q[span], slots, layer, backend, mask)
    return o.view(-1, layer.tp_q_head_num * layer.v_head_dim)


class TorchNativeDraftStepBackend(TorchNativeAttnBackend):
    """One decode step of the draft model; its steps run under DCP's multi-step wrapper
    (``DCPMultiStepDraftBackend``), which sets each step's ``branch_slots [B, topk, s + 1]``."""

    branch_slots: torch.Tensor

    def init_draft_step_metadata(self, forward_batch, branch_slots: torch.Tensor) -> None:
        self.branch_slots = branch_slots

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        store_new_kv(self, layer, forward_batch, k, v, save_kv_cache)
        batch, topk, _ = self.branch_slots.shape
        q = q.reshape(batch, topk, layer.tp_q_head_num, layer.qk_head_dim)
        o = q.new_empty((batch, topk, layer.tp_q_head_num, layer.v_head_dim))
        req_to_token = self.req_to_token_pool.req_to_token
        rows = forward_batch.req_pool_indices.tolist()
        for b, (row, length) in enumerate(zip(rows, forward_batch.seq_lens[:batch].tolist())):
            prefix = req_to_token[row, :length]
            for t in range(topk):
                slots = torch.cat([prefix, self.branch_slots[b, t].to(prefix.dtype)])
                o[b, t] = attend(q[b, t].unsqueeze(0), slots, layer, self).squeeze(0)
        return o.view(-1, layer.tp_q_head_num * layer.v_head_dim)
