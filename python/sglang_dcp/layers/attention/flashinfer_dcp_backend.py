"""DCP on SGLang's flashinfer backend (CUDA): FlashInfer partial-attention kernels.

FlashInfer reads the KV pool per token (page size 1), so a rank's local KV is described by
``kv_indptr`` over the local lengths ``L // D + (rank < L % D)`` and ``kv_indices`` of
local rows ``req_to_token[req, rank + j*D] // D`` (``dcp_kv_indices_triton``). Its LSE is
base 2.

* Decode: ``BatchDecodeWithPagedKVCacheWrapper`` planned with ``D * Hq`` query heads (the
  gathered heads, multiplied once here) over the local lengths; tensor-core decode is
  chosen for ``D * Hq`` heads per KV head.
* Extend: ``BatchPrefillWithRaggedKVCacheWrapper`` (``Hq`` heads) for the new tokens
  (``NewTokenPass``: causal, or a verify pass's tree mask) and
  ``BatchPrefillWithPagedKVCacheWrapper`` (non-causal, ``D * Hq`` heads) over the local
  prefix.
* Draft decode step: the decode wrapper over one "request" per draft branch, whose local
  rows are the request's local prefix rows followed by the branch's slots stored here
  (``draft_step_kv_indices``).
* CUDA graphs (decode only): one decode wrapper per captured batch size over persistent
  ``kv_indptr``/``kv_indices``/``kv_last_page_len`` buffers. Before each replay the
  indices kernel rewrites those buffers in place and ``fast_decode_plan`` re-plans from
  the local host ``indptr``, so no per-step DCP metadata is baked into a graph.
"""

import math
from typing import Dict

import torch
from flashinfer import (
    BatchDecodeWithPagedKVCacheWrapper,
    BatchPrefillWithPagedKVCacheWrapper,
    BatchPrefillWithRaggedKVCacheWrapper,
    fast_decode_plan,
)

from sglang.srt.environ import envs
from sglang.srt.layers.attention.flashinfer_backend import should_use_tensor_core
from sglang.srt.layers.dp_attention import get_attention_tp_size

from sglang_dcp.layers.attention.dcp_backend import DCPAttnBackend
from sglang_dcp.layers.attention.triton_ops import dcp_kv_indices_triton
from sglang_dcp.mem_cache.layout import local_seq_lens, owner_rank, physical_row


# As in SGLang's flashinfer backend: FA2 kernels for paged KV (the automatic choice is FA3
# on Hopper), the automatic choice for the ragged new-token pass.
PAGED_KERNEL_BACKEND = "fa2"
# FlashInfer may read a tile of indices past the last one; SGLang pads its buffers the same way.
KV_INDICES_PADDING = 256


def exclusive_cumsum(lens: torch.Tensor) -> torch.Tensor:
    """``[0, l0, l0 + l1, ...]`` as int32 (an indptr)."""
    indptr = lens.new_zeros(lens.shape[0] + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(lens, dim=0)
    return indptr


def local_kv_indices(
    req_to_token, req_pool_indices, lens, lens_cpu, dcp_size, dcp_rank, kv_indptr=None, kv_indices=None
):
    """FlashInfer's view of the first ``lens`` tokens of each request stored on ``dcp_rank``.

    Returns ``(indptr on host, indptr, indices)`` over the local lengths; the indices are
    written into ``kv_indptr``/``kv_indices`` when given (CUDA-graph buffers), else into a
    new tensor with ``KV_INDICES_PADDING`` spare entries.
    """
    local_lens = local_seq_lens(lens.to(torch.int32), dcp_size, dcp_rank)
    indptr_cpu = exclusive_cumsum(local_seq_lens(lens_cpu.to(torch.int32), dcp_size, dcp_rank))
    if kv_indptr is None:
        kv_indptr = exclusive_cumsum(local_lens)
        kv_indices = torch.empty(
            int(indptr_cpu[-1]) + KV_INDICES_PADDING, dtype=torch.int32, device=lens.device
        )
    else:
        kv_indptr = kv_indptr[: local_lens.shape[0] + 1]
        kv_indptr[1:] = torch.cumsum(local_lens, dim=0)
    dcp_kv_indices_triton(
        req_to_token, req_pool_indices, local_lens, kv_indptr, kv_indices, dcp_size, dcp_rank
    )
    return indptr_cpu, kv_indptr, kv_indices


def draft_step_kv_indices(req_to_token, req_pool_indices, seq_lens, seq_lens_cpu, branch_slots, dcp_size, dcp_rank):
    """FlashInfer's view of one draft decode step on ``dcp_rank``: query ``b * topk + t`` reads
    the rows stored here of request ``b``'s first ``seq_lens[b]`` tokens, then of the logical
    ``branch_slots [B, topk, s]`` of its branch. Returns ``(indptr on host, indices)``."""
    batch, topk, _ = branch_slots.shape
    owned = owner_rank(branch_slots, dcp_size) == dcp_rank
    prefix_lens = local_seq_lens(seq_lens[:batch].to(torch.int32), dcp_size, dcp_rank).repeat_interleave(topk)
    prefix_lens_cpu = local_seq_lens(seq_lens_cpu[:batch].to(torch.int32), dcp_size, dcp_rank).repeat_interleave(topk)
    indptr_cpu = exclusive_cumsum(prefix_lens_cpu + owned.sum(-1).flatten().cpu().to(torch.int32))
    kv_indptr = indptr_cpu.to(branch_slots.device, non_blocking=True)
    kv_indices = torch.empty(
        int(indptr_cpu[-1]) + KV_INDICES_PADDING, dtype=torch.int32, device=branch_slots.device
    )
    dcp_kv_indices_triton(
        req_to_token, req_pool_indices[:batch].repeat_interleave(topk), prefix_lens, kv_indptr,
        kv_indices, dcp_size, dcp_rank,
    )
    # the branch's rows after the prefix rows, in step order
    branch_start = (kv_indptr[:-1] + prefix_lens).view(batch, topk, 1)
    dest = branch_start + torch.cumsum(owned, dim=-1) - 1
    kv_indices[dest[owned]] = physical_row(branch_slots[owned], dcp_size).to(torch.int32)
    return indptr_cpu, kv_indices


class NewTokenPass:
    """The ragged pass of an extend's new tokens over their own K/V (``Hq`` heads): causal, or
    under a verify pass's tree mask (``[B, N, N]`` bool, FlashInfer's custom mask).

    One wrapper per mask kind, as SGLang keeps its verify wrappers apart: a wrapper fixes its
    kernel at its first plan (``auto`` picks fa3 on Hopper for a causal pass, and fa3 has no
    custom masks) and keeps a custom mask until a plan gives another, so a causal pass after
    a verify on a shared wrapper would run under the stale tree mask. The masked wrapper is
    planned with device indptrs: FlashInfer packs the mask on the device with them."""

    def __init__(self, workspace: torch.Tensor):
        self.causal_wrapper = BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD")
        self.masked_wrapper = BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend="fa2")
        self.wrapper = self.causal_wrapper

    def plan(self, new_lens, tree_masks, num_qo_heads, num_kv_heads, head_dim, q_dtype):
        """``new_lens``: new tokens per request (host ints); ``tree_masks``: ``None`` (causal)
        or the verify pass's ``[B, N, N]`` masks on the device."""
        indptr = exclusive_cumsum(torch.tensor(new_lens, dtype=torch.int32))
        if tree_masks is None:
            self.wrapper, mask = self.causal_wrapper, None
        else:
            self.wrapper, mask = self.masked_wrapper, tree_masks.reshape(-1)
            indptr = indptr.to(tree_masks.device)
        self.wrapper.plan(
            indptr, indptr, num_qo_heads, num_kv_heads, head_dim, custom_mask=mask,
            causal=mask is None, q_data_type=q_dtype, kv_data_type=q_dtype,
        )

    def run(self, q, k, v, sm_scale, logits_soft_cap):
        """``(o [T, Hq, dv], base-2 lse [T, Hq])`` of ``q [T, Hq, d]`` over ``k, v [T, Hkv, d]``."""
        return self.wrapper.forward_return_lse(
            q.contiguous(), k.contiguous(), v.contiguous(),
            causal=self.wrapper is self.causal_wrapper, sm_scale=sm_scale,
            logits_soft_cap=logits_soft_cap,
        )


_shared_workspace = None


def float_workspace(device, new: bool = False) -> torch.Tensor:
    """FlashInfer's float workspace, shared by every DCP backend of the process unless ``new``
    (as SGLang's flashinfer backend shares one): it only holds a running kernel's scratch, and
    the target's and the draft's passes run one after another."""
    global _shared_workspace
    size = envs.SGLANG_FLASHINFER_WORKSPACE_SIZE.get()
    if new:
        return torch.empty(size, dtype=torch.uint8, device=device)
    if _shared_workspace is None:
        _shared_workspace = torch.empty(size, dtype=torch.uint8, device=device)
    return _shared_workspace


class FlashInferDCPAttnBackend(DCPAttnBackend):
    lse_base = 2.0

    def __init__(self, model_runner):
        super().__init__(model_runner)
        config = model_runner.model_config
        attn_tp_size = get_attention_tp_size()
        self.num_local_heads = config.num_attention_heads // attn_tp_size
        self.num_gathered_heads = self.num_local_heads * self.dcp_size
        self.num_kv_heads = config.get_num_kv_heads(attn_tp_size)
        self.head_dim = config.head_dim
        self.kv_dtype = model_runner.kv_cache_dtype
        self.q_dtype = model_runner.dtype
        self.max_local_context_len = math.ceil(config.context_len / self.dcp_size)
        self.decode_use_tensor_cores = should_use_tensor_core(
            kv_cache_dtype=self.kv_dtype,
            num_attention_heads=self.num_gathered_heads,
            num_kv_heads=self.num_kv_heads,
        )
        self.workspace = float_workspace(self.device, getattr(model_runner, "init_new_workspace", False))
        self.eager_decode_wrapper = self._new_decode_wrapper()
        self.new_token_pass = NewTokenPass(self.workspace)
        self.prefix_wrapper = BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend=PAGED_KERNEL_BACKEND
        )
        self.graph_decode_wrappers: Dict[int, BatchDecodeWithPagedKVCacheWrapper] = {}
        self.decode_wrapper = self.eager_decode_wrapper

    def _new_decode_wrapper(self, **graph_buffers) -> BatchDecodeWithPagedKVCacheWrapper:
        return BatchDecodeWithPagedKVCacheWrapper(
            self.workspace,
            "NHD",
            backend=PAGED_KERNEL_BACKEND,
            use_tensor_cores=self.decode_use_tensor_cores,
            use_cuda_graph=bool(graph_buffers),
            **graph_buffers,
        )

    # ---- metadata -------------------------------------------------------------------
    def _local_kv(self, req_pool_indices, lens, lens_cpu, kv_indptr=None, kv_indices=None):
        return local_kv_indices(
            self.req_to_token, req_pool_indices, lens, lens_cpu, self.dcp_size, self.dcp_rank,
            kv_indptr, kv_indices,
        )

    def _decode_plan_args(self):
        return dict(
            num_qo_heads=self.num_gathered_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            page_size=1,
            data_type=self.kv_dtype,
            q_data_type=self.q_dtype,
            non_blocking=True,
        )

    def init_forward_metadata(self, forward_batch):
        if forward_batch.forward_mode.is_decode_or_idle():
            self.decode_wrapper = self.eager_decode_wrapper
            bs = forward_batch.batch_size
            indptr_cpu, _, kv_indices = self._local_kv(
                forward_batch.req_pool_indices, forward_batch.seq_lens,
                forward_batch.seq_lens_cpu,
            )
            self.decode_wrapper.plan(
                indptr_cpu, kv_indices, torch.ones(bs, dtype=torch.int32),
                **self._decode_plan_args(),
            )
        else:
            self.init_extend_shape(forward_batch)
            self._plan_extend(forward_batch)

    def init_draft_step_metadata(self, forward_batch, branch_slots):
        self.decode_wrapper = self.eager_decode_wrapper
        indptr_cpu, kv_indices = draft_step_kv_indices(
            self.req_to_token, forward_batch.req_pool_indices, forward_batch.seq_lens,
            forward_batch.seq_lens_cpu, branch_slots, self.dcp_size, self.dcp_rank,
        )
        self.decode_wrapper.plan(
            indptr_cpu, kv_indices, torch.ones(indptr_cpu.shape[0] - 1, dtype=torch.int32),
            **self._decode_plan_args(),
        )

    def _plan_extend(self, forward_batch):
        bs = forward_batch.batch_size
        self.new_token_pass.plan(
            self.new_lens, self.tree_masks, self.num_local_heads, self.num_kv_heads,
            self.head_dim, self.q_dtype,
        )
        if not any(self.prefix_lens):
            return
        qo_indptr_cpu = exclusive_cumsum(torch.tensor(self.new_lens, dtype=torch.int32))
        prefix_lens_cpu = torch.tensor(self.prefix_lens, dtype=torch.int32)
        indptr_cpu, _, kv_indices = self._local_kv(
            forward_batch.req_pool_indices, prefix_lens_cpu.to(self.device), prefix_lens_cpu,
        )
        self.prefix_wrapper.plan(
            qo_indptr_cpu, indptr_cpu, kv_indices, torch.ones(bs, dtype=torch.int32),
            self.num_gathered_heads, self.num_kv_heads, self.head_dim, 1, causal=False,
            q_data_type=self.q_dtype, kv_data_type=self.kv_dtype,
        )

    # ---- CUDA graphs (decode) -------------------------------------------------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        self.graph_kv_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=self.device)
        self.graph_kv_last_page_len = torch.ones(max_bs, dtype=torch.int32, device=self.device)
        self.graph_kv_indices = torch.zeros(
            max_bs * self.max_local_context_len + KV_INDICES_PADDING,
            dtype=torch.int32,
            device=self.device,
        )

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        assert forward_batch.forward_mode.is_decode_or_idle(), "DCP captures decode graphs only"
        bs = forward_batch.batch_size
        if in_capture:
            self.graph_decode_wrappers[bs] = self._new_decode_wrapper(
                paged_kv_indptr_buffer=self.graph_kv_indptr[: bs + 1],
                paged_kv_indices_buffer=self.graph_kv_indices,
                paged_kv_last_page_len_buffer=self.graph_kv_last_page_len[:bs],
            )
        self.decode_wrapper = self.graph_decode_wrappers[bs]
        indptr_cpu, kv_indptr, kv_indices = self._local_kv(
            forward_batch.req_pool_indices[:bs], forward_batch.seq_lens[:bs],
            forward_batch.seq_lens_cpu[:bs], self.graph_kv_indptr, self.graph_kv_indices,
        )
        last_page_len = self.graph_kv_last_page_len[:bs]
        if in_capture:  # the first plan builds the kernel module that fast_decode_plan reuses
            self.decode_wrapper.plan(
                indptr_cpu, kv_indices[: int(indptr_cpu[-1])], last_page_len.cpu(),
                **self._decode_plan_args(),
            )
        else:
            fast_decode_plan(
                self.decode_wrapper, kv_indptr, kv_indices, last_page_len,
                global_override_indptr_cpu=indptr_cpu, **self._decode_plan_args(),
            )

    def get_cuda_graph_seq_len_fill_value(self):
        return 1

    # ---- kernels --------------------------------------------------------------------
    def partial_decode(self, q_all, layer, forward_batch):
        k_scale, v_scale = self.kv_scales(layer)
        return self.decode_wrapper.forward_return_lse(
            q_all,
            self.token_to_kv_pool.get_kv_buffer(layer.layer_id),
            sm_scale=layer.scaling,
            logits_soft_cap=layer.logit_cap,
            k_scale=k_scale,
            v_scale=v_scale,
        )

    def partial_extend_new(self, q, k, v, layer, forward_batch):
        return self.new_token_pass.run(q, k, v, layer.scaling, layer.logit_cap)

    def partial_extend_prefix(self, q_all, layer, forward_batch):
        k_scale, v_scale = self.kv_scales(layer)
        return self.prefix_wrapper.forward_return_lse(
            q_all,
            self.token_to_kv_pool.get_kv_buffer(layer.layer_id),
            causal=False,
            sm_scale=layer.scaling,
            logits_soft_cap=layer.logit_cap,
            k_scale=k_scale,
            v_scale=v_scale,
        )
