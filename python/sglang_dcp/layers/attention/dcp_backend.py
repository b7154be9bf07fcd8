"""One DCP attention code path; subclasses supply only the partial-attention kernels.

Per layer, on DCP rank ``r`` of a group of ``D`` ranks that hold the same KV head:

* KV write: logical slot ``loc`` goes to row ``loc // D`` if ``loc % D == r``, else to
  the dump row (``layout.local_write_rows``). The rows are the same for every layer of a
  forward pass: computed at its first layer (inside a captured CUDA graph too), reused after.
  An FP8 cache stores ``kv / scale`` and every read multiplies by ``scale``
  (``kv_cache_scales``); the store divides ``k``/``v`` in place, so extend writes after its
  new-token pass has read them.
* Decode: all-gather Q over the group along heads (``Hq -> D*Hq``), partial attention with
  LSE over the tokens stored here, ``dcp_merge`` (one all-to-all of the packed partials
  and a local merge back to the ``Hq`` heads of this rank, in the model dtype).
* Extend: the new tokens attend causally to their own K/V with this rank's ``Hq`` heads
  (every rank has them); if any request has a cached prefix, gathered Q attends
  non-causally to the prefix tokens stored here, ``dcp_merge`` combines the group, and
  ``merge_states`` combines the two parts. A prefill without prefix communicates nothing.
* ``--dcp-comm lse`` (layers with ``has_group_heads``, see ``model_executor.group_heads``):
  Q arrives with the ``D*Hq`` heads of the whole group, computed here, so nothing is
  gathered. Decode: partial attention of all ``D*Hq`` heads over the tokens stored here,
  ``scale_by_group_lse`` (one all-gather of the LSEs, each partial scaled by its weight),
  and ``[T, D*Hq*dv]`` goes to ``o_proj`` over the group's columns, whose TP all-reduce
  sums the group. Extend: ``extend_group_heads``, the same way.

Speculative decoding (``speculative.py`` explains the draft-KV design) adds three passes,
each one of the two above with other key sets:

* Target verify: an extend whose new tokens are the ``N`` draft tokens of each request, a tree:
  draft token ``i`` sees draft token ``j`` where the verify mask says so (``verify_tree_masks``),
  and the whole committed prefix ``seq_lens`` through the sharded prefix pass.
* Draft extend: an extend of the draft model (its own KV pool, striped like the target's).
* Draft decode: step ``s`` of the draft's ``topk`` branches, one query per branch; query
  ``(b, t)`` sees the prefix of request ``b`` and the tokens branch ``t`` wrote in steps
  ``0..s``: a decode over per-query key sets (``DCPMultiStepDraftBackend``).

Subclasses implement ``init_forward_metadata`` (and ``init_draft_step_metadata``) and the three
``partial_*`` kernels, each returning ``(o [T, H, dv], lse [T, H])`` with LSE in base
``lse_base``.
"""

import math
from typing import Callable, List, Optional, Tuple

import torch

from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from sglang_dcp.distributed.parallel_state import all_gather_along_dim, get_dcp_group
from sglang_dcp.layers.attention.merge import dcp_merge, merge_states, scale_by_group_lse
from sglang_dcp.mem_cache.layout import local_write_rows
from sglang_dcp.model_executor.group_heads import has_group_heads


def kv_cache_scales(layer) -> Tuple[Optional[float], Optional[float]]:
    """``(k_scale, v_scale)`` of a layer's FP8 KV cache, or ``None`` each: the one value that
    the store divides by and every read multiplies by. Quantized checkpoints set both
    ``k_scale`` and ``k_scale_float``; ``--quantization-param-path`` sets only ``k_scale``
    (a float), which stock SGLang then divides by on store but never multiplies by on read."""
    return tuple(
        getattr(layer, f"{kv}_scale_float") if getattr(layer, f"{kv}_scale_float") is not None
        else getattr(layer, f"{kv}_scale")
        for kv in ("k", "v")
    )


def extend_lens(forward_batch) -> Tuple[List[int], List[int]]:
    """``(cached prefix, new tokens)`` per request of an extend-like pass. A verify pass
    extends the committed ``seq_lens`` by ``draft_token_num`` tree tokens per request (its
    ``extend_*`` fields are not set); an extend or draft extend by ``extend_seq_lens`` after
    ``extend_prefix_lens``."""
    if forward_batch.forward_mode.is_target_verify():
        num_draft = forward_batch.spec_info.draft_token_num
        return forward_batch.seq_lens_cpu.tolist(), [num_draft] * forward_batch.batch_size
    return list(forward_batch.extend_prefix_lens_cpu), list(forward_batch.extend_seq_lens_cpu)


def verify_tree_masks(forward_batch) -> torch.Tensor:
    """The draft-token part of a verify pass's mask: bool ``[B, N, N]``, ``[b, i, j]`` whether
    draft token ``i`` of request ``b`` sees draft token ``j``.

    SGLang's ``custom_mask`` holds, request after request, the ``[N, seq_len + N]`` rows of
    draft tokens over (committed prefix, draft tokens), flattened; every draft token sees the
    whole prefix, so only the last ``N`` columns of each request carry the tree:
    ``mask[off_b + i * (L_b + N) + L_b + j]`` with ``off_b = sum_{c < b} N * (L_c + N)``."""
    spec_info = forward_batch.spec_info
    num_draft = spec_info.draft_token_num
    seq_lens = forward_batch.seq_lens[: forward_batch.batch_size].to(torch.int64)
    row_len = seq_lens + num_draft
    offsets = torch.cumsum(num_draft * row_len, dim=0) - num_draft * row_len
    steps = torch.arange(num_draft, device=seq_lens.device)
    index = (
        (offsets + seq_lens).view(-1, 1, 1)
        + steps.view(1, -1, 1) * row_len.view(-1, 1, 1)
        + steps.view(1, 1, -1)
    )
    return spec_info.custom_mask.reshape(-1)[index]


class DCPAttnBackend(AttentionBackend):
    lse_base: float

    def __init__(self, model_runner):
        super().__init__()
        self.dcp_group = get_dcp_group()
        self.dcp_size = self.dcp_group.world_size
        self.dcp_rank = self.dcp_group.rank_in_group
        self.device = model_runner.device
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        # The store scales K/V only when it converts them (SGLang's set_kv_buffer)
        self.scaled_kv_cache = model_runner.kv_cache_dtype != model_runner.dtype
        self.first_layer_id = model_runner.start_layer
        self.write_rows = None  # of the current forward pass, set at its first layer
        # Where the speculative workers size a verify mask without seq_lens_sum
        self.max_context_len = model_runner.model_config.context_len
        # Extend-like passes: (cached prefix, new tokens) per request and, for a verify pass,
        # the draft tokens' tree masks (None: the new tokens are causal)
        self.prefix_lens: List[int] = []
        self.new_lens: List[int] = []
        self.tree_masks: Optional[torch.Tensor] = None

    def init_extend_shape(self, forward_batch) -> None:
        """``prefix_lens``, ``new_lens`` and ``tree_masks`` of an extend-like pass."""
        self.prefix_lens, self.new_lens = extend_lens(forward_batch)
        self.tree_masks = (
            verify_tree_masks(forward_batch) if forward_batch.forward_mode.is_target_verify() else None
        )

    def init_draft_step_metadata(self, forward_batch, branch_slots: torch.Tensor) -> None:
        """One draft decode step: query ``b * topk + t`` sees the committed ``seq_lens[b]``
        tokens of request ``b`` and the logical slots ``branch_slots[b, t]`` (its branch's
        tokens so far, this step's included)."""
        raise NotImplementedError()

    def update_verify_buffers_to_fill_after_draft(self, spec_info, cuda_graph_bs):
        """Nothing to redo: a verify pass reads its tree mask when its metadata is planned, at
        the pass itself (no verify buffers are handed to the draft, see the base class)."""

    # ---- kernels supplied by a subclass -------------------------------------------
    def partial_decode(self, q_all, layer, forward_batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """Gathered ``q_all [B, D*Hq, d]`` over the tokens stored on this rank (of each
        request, or of each draft branch in a draft decode step)."""
        raise NotImplementedError()

    def partial_extend_new(self, q, k, v, layer, forward_batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """Own heads ``q [T, Hq, d]`` over the batch's new tokens ``k, v [T, Hkv, d]``: causal
        per request, or under ``tree_masks`` (verify)."""
        raise NotImplementedError()

    def partial_extend_prefix(self, q_all, layer, forward_batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """Gathered ``q_all [T, D*Hq, d]``, non-causal over the prefix tokens stored here
        (``prefix_lens`` of each request)."""
        raise NotImplementedError()

    # ---- the DCP path ---------------------------------------------------------------
    def begin_layer(self, layer, k, save_kv_cache, forward_batch) -> None:
        """Refuse a layer DCP cannot run; at the first layer of a pass, its KV write rows.

        DCP runs causal decoder attention that stores its own new K/V (at owned rows only):
        a layer that passes ``k=None`` or ``save_kv_cache=False`` reads or writes K/V at
        logical slots elsewhere, and encoder-only attention is not causal."""
        if layer.attn_type != AttentionType.DECODER or k is None or not save_kv_cache:
            raise NotImplementedError(
                f"--dcp-size {self.dcp_size} runs causal decoder layers that store their own "
                f"K/V; layer {layer.layer_id} is {layer.attn_type.value} attention with "
                f"k={'None' if k is None else 'given'}, save_kv_cache={save_kv_cache}. "
                f"Use --dcp-size 1."
            )
        if layer.layer_id == self.first_layer_id:
            self.write_rows = local_write_rows(forward_batch.out_cache_loc, self.dcp_size, self.dcp_rank)

    def kv_scales(self, layer) -> Tuple[Optional[float], Optional[float]]:
        """The scales that this layer's cache is stored with (``None`` for an unscaled cache)."""
        return kv_cache_scales(layer) if self.scaled_kv_cache else (None, None)

    def write_kv(self, layer, k, v) -> None:
        """Store this rank's share of ``k``/``v``; scales them in place (FP8 cache)."""
        self.token_to_kv_pool.set_kv_buffer(
            layer, KVWriteLoc(self.write_rows), k, v, *self.kv_scales(layer)
        )

    def gather_heads(self, q: torch.Tensor, layer) -> torch.Tensor:
        q = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        return all_gather_along_dim(self.dcp_group, q, dim=1)

    def own_heads(self, x: torch.Tensor) -> slice:
        """This rank's heads among the group's ``x [T, D*Hq, ...]`` (rank-major)."""
        per_rank = x.shape[1] // self.dcp_size
        return slice(self.dcp_rank * per_rank, (self.dcp_rank + 1) * per_rank)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.begin_layer(layer, k, save_kv_cache, forward_batch)
        self.write_kv(layer, k, v)
        if has_group_heads(layer):
            q_all = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
            o, lse = self.partial_decode(q_all, layer, forward_batch)
            o = scale_by_group_lse(self.dcp_group, o, lse, self.lse_base, out_dtype=q.dtype)
        else:
            o, lse = self.partial_decode(self.gather_heads(q, layer), layer, forward_batch)
            o, _ = dcp_merge(self.dcp_group, o, lse, self.lse_base, out_dtype=q.dtype)
        return o.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.begin_layer(layer, k, save_kv_cache, forward_batch)
        group_heads = has_group_heads(layer)
        q = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        own = self.own_heads(q) if group_heads else slice(None)
        o, lse = self.partial_extend_new(
            q[:, own],
            k.reshape(-1, layer.tp_k_head_num, layer.qk_head_dim),
            v.reshape(-1, layer.tp_v_head_num, layer.v_head_dim),
            layer,
            forward_batch,
        )
        self.write_kv(layer, k, v)  # after the new-token pass: an FP8 store scales k, v in place
        has_prefix = any(self.prefix_lens)
        if group_heads:
            o = self.extend_group_heads(q, o, lse, own, has_prefix, layer, forward_batch)
        elif has_prefix:
            o_pre, lse_pre = self.partial_extend_prefix(
                self.gather_heads(q, layer), layer, forward_batch
            )
            o_pre, lse_pre = dcp_merge(
                self.dcp_group, o_pre, lse_pre, self.lse_base, out_dtype=torch.float32
            )
            o, lse = merge_states([o, o_pre], [lse, lse_pre], self.lse_base)
        return o.to(q.dtype).reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    def extend_group_heads(self, q_all, o_new, lse_new, own, has_prefix, layer, forward_batch):
        """Extend with the group's heads (``--dcp-comm lse``), the LSE way as in decode: this
        rank's partial for head ``h`` covers the prefix tokens stored here and, for its own
        heads only, the new tokens (every rank has their K/V, so exactly one rank counts
        them). ``scale_by_group_lse`` then makes the sum over the group the full attention.
        Without a prefix the own heads are final and the others 0: nothing to exchange."""
        o = o_new.new_zeros((*q_all.shape[:2], o_new.shape[-1]))
        lse = lse_new.new_full(q_all.shape[:2], -math.inf)
        o[:, own], lse[:, own] = o_new, lse_new
        if not has_prefix:
            return o
        o_pre, lse_pre = self.partial_extend_prefix(q_all, layer, forward_batch)
        o, lse = merge_states([o, o_pre], [lse, lse_pre], self.lse_base)
        return scale_by_group_lse(self.dcp_group, o, lse, self.lse_base, torch.float32)


class DCPMultiStepDraftBackend:
    """The draft model's decode steps under DCP, one DCP backend per step, with the interface
    of SGLang's multi-step draft backends: ``attn_backends[s]`` runs step ``s`` and
    ``init_forward_metadata`` plans every step before the first runs.

    The draft worker lays the steps' KV slots out as ``out_cache_loc [B, topk, steps]``
    (``eagle_utils.per_step_draft_out_cache_loc``), so step ``s`` of branch ``t`` of request
    ``b`` sees the slots ``[b, t, :s + 1]`` besides the request's committed tokens. Only
    ``steps - 1`` steps run the model: the last drafted token needs no forward."""

    def __init__(self, make_backend: Callable[[], DCPAttnBackend], topk: int, speculative_num_steps: int):
        self.topk = topk
        self.speculative_num_steps = speculative_num_steps
        self.attn_backends = [make_backend() for _ in range(speculative_num_steps - 1)]

    def init_forward_metadata(self, forward_batch) -> None:
        slots = forward_batch.out_cache_loc.view(
            forward_batch.batch_size, self.topk, self.speculative_num_steps
        )
        for step, backend in enumerate(self.attn_backends):
            backend.init_draft_step_metadata(forward_batch, slots[:, :, : step + 1])
