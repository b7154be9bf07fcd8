"""Triton kernels of the CUDA DCP path.

* ``scale_own_partial_triton``: the DCP correction step in one pass. For each (token, head)
  it reads the D base-2 LSEs, forms ``lse = log2 sum_r 2^lse_r`` and
  ``w = 2^(lse_own - lse)`` (0 for an empty shard or when every shard is empty) and
  writes ``w * o_own`` in float32, laid out by owner (head ``h = c*Hq + j`` of token ``t``
  to ``out[c, t, j]``, ready for the reduce-scatter), plus ``lse``.
* ``dcp_kv_indices_triton``: for each request ``b``, the physical rows of the tokens
  stored on this rank, ``req_to_token[req_b, rank + j*D] // D`` for ``j < local_len_b``,
  written at ``kv_indices[kv_indptr[b]:]``.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _scale_own_partial_kernel(
    o_ptr,
    lse_all_ptr,
    out_ptr,
    lse_out_ptr,
    num_tokens,
    num_heads,
    rank,
    head_dim,
    NUM_RANKS: tl.constexpr,
    RANKS_P2: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # t * H + h
    num_rows = num_tokens * num_heads
    ranks = tl.arange(0, RANKS_P2)
    lse = tl.load(lse_all_ptr + ranks * num_rows + row, mask=ranks < NUM_RANKS, other=-float("inf"))
    lse_max = tl.max(lse, axis=0)
    finite_max = tl.where(lse_max == -float("inf"), 0.0, lse_max)
    total = tl.sum(tl.exp2(lse - finite_max), axis=0)
    own = tl.load(lse_all_ptr + rank * num_rows + row)
    weight = tl.where(total > 0.0, tl.exp2(own - finite_max) / total, 0.0)
    tl.store(lse_out_ptr + row, finite_max + tl.log2(total))
    # h = owner * Hq + j  ->  out row (owner * T + t) * Hq + j
    heads_per_rank = num_heads // NUM_RANKS
    token = row // num_heads
    head = row % num_heads
    owner = head // heads_per_rank
    out_row = (owner * num_tokens + token) * heads_per_rank + head % heads_per_rank
    dims = tl.arange(0, BLOCK_D)
    in_dim = dims < head_dim
    o = tl.load(o_ptr + row * head_dim + dims, mask=in_dim, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_row * head_dim + dims, tl.where(weight > 0.0, o * weight, 0.0), mask=in_dim)


def scale_own_partial_triton(o: torch.Tensor, lse2_all: torch.Tensor, rank: int):
    """``o [T, H, dv]``, base-2 ``lse2_all [D, T, H]`` -> (``w_rank * o`` fp32 by owner
    ``[D, T, H/D, dv]``, ``lse [T, H]``)."""
    num_ranks, tokens, heads = lse2_all.shape
    assert heads % num_ranks == 0 and o.shape[:2] == (tokens, heads), (o.shape, lse2_all.shape)
    head_dim = o.shape[-1]
    o = o.contiguous()
    lse2_all = lse2_all.float().contiguous()
    out = torch.empty((num_ranks, tokens, heads // num_ranks, head_dim), dtype=torch.float32, device=o.device)
    lse_out = torch.empty((tokens, heads), dtype=torch.float32, device=o.device)
    if tokens * heads:
        _scale_own_partial_kernel[(tokens * heads,)](
            o, lse2_all, out, lse_out, tokens, heads, rank, head_dim,
            NUM_RANKS=num_ranks,
            RANKS_P2=triton.next_power_of_2(num_ranks),
            BLOCK_D=triton.next_power_of_2(head_dim),
        )
    return out, lse_out


@triton.jit
def _dcp_kv_indices_kernel(
    req_to_token_ptr,
    req_pool_indices_ptr,
    local_lens_ptr,
    kv_indptr_ptr,
    kv_indices_ptr,
    req_to_token_stride,
    dcp_rank,
    DCP_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    req = tl.load(req_pool_indices_ptr + b).to(tl.int64)
    num_local = tl.load(local_lens_ptr + b)
    out_start = tl.load(kv_indptr_ptr + b)
    row_start = req_to_token_ptr + req * req_to_token_stride + dcp_rank
    for start in range(0, num_local, BLOCK):
        j = start + tl.arange(0, BLOCK)
        valid = j < num_local
        loc = tl.load(row_start + j * DCP_SIZE, mask=valid, other=0)
        tl.store(kv_indices_ptr + out_start + j, loc // DCP_SIZE, mask=valid)


def dcp_kv_indices_triton(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    local_lens: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    dcp_size: int,
    dcp_rank: int,
) -> None:
    """Fill ``kv_indices`` with each request's local physical rows (see module doc)."""
    batch = req_pool_indices.shape[0]
    if batch:
        _dcp_kv_indices_kernel[(batch,)](
            req_to_token, req_pool_indices, local_lens, kv_indptr, kv_indices,
            req_to_token.stride(0), dcp_rank, DCP_SIZE=dcp_size, BLOCK=512,
        )
