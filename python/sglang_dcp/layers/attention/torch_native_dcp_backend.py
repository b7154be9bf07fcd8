"""DCP on SGLang's torch_native backend: PyTorch partial-attention kernels (CPU).

Each kernel loops over the requests of the batch and calls ``attention_with_lse``; K/V
of cached tokens are read from this rank's physical rows (``layout.local_token_rows``, and
for a draft branch ``layout.local_slot_rows``) and multiplied by the cache's scales (FP8), as
FlashInfer does with ``k_scale``/``v_scale``.
Like SGLang's torch_native backend, new tokens attend to their K/V as the cache stores them
(rounded to the cache dtype).
"""

import math
from typing import List, Optional, Tuple

import torch

from sglang_dcp.layers.attention.dcp_backend import DCPAttnBackend
from sglang_dcp.mem_cache.layout import local_slot_rows, local_token_rows


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool,
    mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q [Tq, Hq, d]`` over ``k [Tk, Hkv, d], v [Tk, Hkv, dv]``.

    Query head ``h`` reads KV head ``h // (Hq / Hkv)``; ``causal`` (``Tq == Tk``) lets
    query ``i`` see keys ``<= i``; ``mask [Tq, Tk]`` (bool) lets query ``i`` see key ``j``
    where ``mask[i, j]``. Returns float32 ``o [Tq, Hq, dv]`` and natural-log ``lse [Tq, Hq]``;
    a query that sees no key gets ``o = 0`` and ``lse = -inf``.
    """
    num_q, num_heads = q.shape[0], q.shape[1]
    if k.shape[0] == 0:
        return (
            q.new_zeros((num_q, num_heads, v.shape[-1]), dtype=torch.float32),
            q.new_full((num_q, num_heads), -math.inf, dtype=torch.float32),
        )
    group = num_heads // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if causal:
        future = torch.ones(num_q, k.shape[0], dtype=torch.bool, device=q.device).triu(1)
        scores.masked_fill_(future, -math.inf)
    if mask is not None:
        scores.masked_fill_(~mask, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.nan_to_num(torch.exp(scores - lse.unsqueeze(-1)), nan=0.0)
    return torch.einsum("hqk,khd->qhd", probs, v), lse.transpose(0, 1)


def stored_to_float(kv: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
    """Cached ``k`` or ``v`` as float32: ``stored * scale`` (an FP8 cache stores ``kv / scale``)."""
    return kv.float() if scale is None else kv.float() * scale


class TorchNativeDCPAttnBackend(DCPAttnBackend):
    lse_base = math.e

    def __init__(self, model_runner):
        super().__init__(model_runner)
        self.local_rows: List[torch.Tensor] = []

    def support_triton(self):
        return False

    def init_forward_metadata(self, forward_batch):
        """Rows of the tokens stored here: all cached tokens (decode) or the prefix (extend,
        verify, draft extend)."""
        if forward_batch.forward_mode.is_decode_or_idle():
            cached_lens = forward_batch.seq_lens_cpu.tolist()
        else:
            self.init_extend_shape(forward_batch)
            cached_lens = self.prefix_lens
        self.local_rows = self._prefix_rows(forward_batch, cached_lens)

    def init_draft_step_metadata(self, forward_batch, branch_slots):
        """Per draft branch: the request's committed rows stored here, then its branch's."""
        prefix_rows = self._prefix_rows(forward_batch, forward_batch.seq_lens_cpu.tolist())
        topk = branch_slots.shape[1]
        self.local_rows = [
            torch.cat([prefix_rows[query // topk], local_slot_rows(slots, self.dcp_size, self.dcp_rank)])
            for query, slots in enumerate(branch_slots.reshape(-1, branch_slots.shape[-1]))
        ]

    def _prefix_rows(self, forward_batch, lens) -> List[torch.Tensor]:
        return [
            local_token_rows(self.req_to_token[req], length, self.dcp_size, self.dcp_rank)
            for req, length in zip(forward_batch.req_pool_indices.tolist(), lens)
        ]

    def as_stored(self, kv: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
        """``kv`` as a read of the cache returns it: stored in the cache dtype, scaled back."""
        stored = (kv.float() if scale is None else kv.float() / scale).to(self.token_to_kv_pool.dtype)
        return stored_to_float(stored, scale)

    def _attend_cached(self, q_all, layer, query_lens):
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        k_scale, v_scale = self.kv_scales(layer)
        parts = [
            attention_with_lse(
                q_req,
                stored_to_float(k_cache[rows], k_scale),
                stored_to_float(v_cache[rows], v_scale),
                layer.scaling,
                causal=False,
            )
            for q_req, rows in zip(q_all.split(query_lens), self.local_rows)
        ]
        return torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts])

    def partial_decode(self, q_all, layer, forward_batch):
        return self._attend_cached(q_all, layer, [1] * q_all.shape[0])

    def partial_extend_prefix(self, q_all, layer, forward_batch):
        return self._attend_cached(q_all, layer, self.new_lens)

    def partial_extend_new(self, q, k, v, layer, forward_batch):
        if self.scaled_kv_cache:  # as SGLang's torch_native: new tokens read as stored
            k_scale, v_scale = self.kv_scales(layer)
            k, v = self.as_stored(k, k_scale), self.as_stored(v, v_scale)
        lens = self.new_lens
        masks = [None] * len(lens) if self.tree_masks is None else list(self.tree_masks)
        parts = [
            attention_with_lse(q_req, k_req, v_req, layer.scaling, causal=mask is None, mask=mask)
            for q_req, k_req, v_req, mask in zip(q.split(lens), k.split(lens), v.split(lens), masks)
        ]
        return torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts])
