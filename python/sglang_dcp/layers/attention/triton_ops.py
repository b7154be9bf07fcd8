"""Triton kernels of the CUDA DCP path.

* ``pack_by_owner_triton`` and ``merge_packed_triton``: the two local steps of
  ``merge.dcp_merge`` around its all-to-all. Pack copies head ``h = c*Hq + j`` of token
  ``t`` (``o`` and base-2 ``lse``) to ``(t, j)`` of chunk ``c`` of the exchange buffer
  (``merge.PartialLayout``). Merge reads, for each own ``(t, j)``, the D partials
  ``(o_r, lse_r)`` received from the ranks, forms ``lse = log2 sum_r 2^lse_r`` and
  ``o = sum_r 2^(lse_r - lse) o_r`` in float32 (weight 0 for an empty shard; ``o = 0``,
  ``lse = -inf`` when every shard is empty) and writes ``o`` in the output dtype.
* ``scale_by_lse_triton``: the one local step of ``merge.scale_by_group_lse`` after its
  LSE all-gather. For each ``(t, h)`` it reads the group's base-2 ``lse_c`` (``c < D``),
  forms ``lse = log2 sum_c 2^lse_c`` and writes ``o * 2^(lse_r - lse)`` of this rank ``r``
  in the output dtype (0 for weight 0: an empty shard here, or every shard empty).
* ``dcp_kv_indices_triton``: for each request ``b``, the physical rows of the tokens
  stored on this rank, ``req_to_token[req_b, rank + j*D] // D`` for ``j < local_len_b``,
  written at ``kv_indices[kv_indptr[b]:]``.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _pack_by_owner_kernel(
    o_ptr,
    lse_ptr,
    buf_o_ptr,
    buf_lse_ptr,
    num_heads,
    head_dim,
    buf_o_chunk_stride,
    buf_lse_chunk_stride,
    NUM_RANKS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # t * H + h, H = D * Hq
    heads_per_rank = num_heads // NUM_RANKS
    token = row // num_heads
    head = row % num_heads
    owner = head // heads_per_rank
    own_row = token * heads_per_rank + head % heads_per_rank
    tl.store(buf_lse_ptr + owner * buf_lse_chunk_stride + own_row, tl.load(lse_ptr + row))
    dims = tl.arange(0, BLOCK_D)
    in_dim = dims < head_dim
    o = tl.load(o_ptr + row * head_dim + dims, mask=in_dim)
    tl.store(buf_o_ptr + owner * buf_o_chunk_stride + own_row * head_dim + dims, o, mask=in_dim)


@triton.jit
def _lse_max_and_total(lse_ptr, rank_stride, row, NUM_RANKS: tl.constexpr, RANKS_P2: tl.constexpr):
    """Over the ranks' base-2 ``lse_c`` at ``lse_ptr + c * rank_stride + row``: ``m`` = their
    max (0 if every one is ``-inf``) and ``sum_c 2^(lse_c - m)`` (0 if every one is ``-inf``)."""
    ranks = tl.arange(0, RANKS_P2)
    lse = tl.load(lse_ptr + ranks * rank_stride + row, mask=ranks < NUM_RANKS, other=-float("inf"))
    lse_max = tl.max(lse, axis=0)
    finite_max = tl.where(lse_max == -float("inf"), 0.0, lse_max)
    return finite_max, tl.sum(tl.exp2(lse - finite_max), axis=0)


@triton.jit
def _merge_packed_kernel(
    buf_o_ptr,
    buf_lse_ptr,
    out_ptr,
    lse_out_ptr,
    head_dim,
    buf_o_chunk_stride,
    buf_lse_chunk_stride,
    NUM_RANKS: tl.constexpr,
    RANKS_P2: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # t * Hq + j
    finite_max, total = _lse_max_and_total(buf_lse_ptr, buf_lse_chunk_stride, row, NUM_RANKS, RANKS_P2)
    tl.store(lse_out_ptr + row, finite_max + tl.log2(total))
    dims = tl.arange(0, BLOCK_D)
    in_dim = dims < head_dim
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r in tl.static_range(NUM_RANKS):
        lse_r = tl.load(buf_lse_ptr + r * buf_lse_chunk_stride + row)
        weight = tl.where(total > 0.0, tl.exp2(lse_r - finite_max) / total, 0.0)
        o = tl.load(buf_o_ptr + r * buf_o_chunk_stride + row * head_dim + dims, mask=in_dim, other=0.0)
        acc += tl.where(weight > 0.0, o.to(tl.float32) * weight, 0.0)
    tl.store(out_ptr + row * head_dim + dims, acc, mask=in_dim)


def pack_by_owner_triton(o: torch.Tensor, lse2: torch.Tensor, layout, num_ranks: int) -> torch.Tensor:
    """``o [T, D*Hq, dv]``, base-2 ``lse2 [T, D*Hq]`` -> a new exchange buffer (see module doc)."""
    tokens, heads, head_dim = o.shape
    assert heads == num_ranks * layout.heads and lse2.shape == (tokens, heads), (o.shape, lse2.shape)
    buf = layout.new_buffer(num_ranks, o.device)
    buf_o, buf_lse = layout.views(buf)
    if tokens:
        _pack_by_owner_kernel[(tokens * heads,)](
            o.contiguous(), lse2.float().contiguous(), buf_o, buf_lse, heads, head_dim,
            buf_o.stride(0), buf_lse.stride(0),
            NUM_RANKS=num_ranks,
            BLOCK_D=triton.next_power_of_2(head_dim),
        )
    return buf


def merge_packed_triton(buf: torch.Tensor, layout, out_dtype: torch.dtype):
    """The D received partials in ``buf`` -> (``o [T, Hq, dv]`` in ``out_dtype``, base-2
    ``lse [T, Hq]``) (see module doc)."""
    buf_o, buf_lse = layout.views(buf)
    num_ranks, tokens, heads, head_dim = buf_o.shape
    out = torch.empty((tokens, heads, head_dim), dtype=out_dtype, device=buf.device)
    lse_out = torch.empty((tokens, heads), dtype=torch.float32, device=buf.device)
    if tokens:
        _merge_packed_kernel[(tokens * heads,)](
            buf_o, buf_lse, out, lse_out, head_dim, buf_o.stride(0), buf_lse.stride(0),
            NUM_RANKS=num_ranks,
            RANKS_P2=triton.next_power_of_2(num_ranks),
            BLOCK_D=triton.next_power_of_2(head_dim),
        )
    return out, lse_out


@triton.jit
def _scale_by_lse_kernel(
    o_ptr,
    lse_all_ptr,
    out_ptr,
    rank,
    num_rows,
    head_dim,
    NUM_RANKS: tl.constexpr,
    RANKS_P2: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # t * H + h
    finite_max, total = _lse_max_and_total(lse_all_ptr, num_rows, row, NUM_RANKS, RANKS_P2)
    lse_r = tl.load(lse_all_ptr + rank * num_rows + row)
    weight = tl.where(total > 0.0, tl.exp2(lse_r - finite_max) / total, 0.0)
    dims = tl.arange(0, BLOCK_D)
    in_dim = dims < head_dim
    o = tl.load(o_ptr + row * head_dim + dims, mask=in_dim, other=0.0)
    out = tl.where(weight > 0.0, o.to(tl.float32) * weight, 0.0)
    tl.store(out_ptr + row * head_dim + dims, out.to(out_ptr.dtype.element_ty), mask=in_dim)


def scale_by_lse_triton(
    o: torch.Tensor, lse2_all: torch.Tensor, rank: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """This rank's ``o [T, H, dv]`` scaled by its weight among the group's base-2
    ``lse2_all [D, T, H]``, in ``out_dtype`` (see module doc)."""
    tokens, heads, head_dim = o.shape
    num_ranks = lse2_all.shape[0]
    assert lse2_all.shape == (num_ranks, tokens, heads), (o.shape, lse2_all.shape)
    out = torch.empty((tokens, heads, head_dim), dtype=out_dtype, device=o.device)
    if tokens:
        _scale_by_lse_kernel[(tokens * heads,)](
            o.contiguous(), lse2_all.float().contiguous(), out, rank, tokens * heads, head_dim,
            NUM_RANKS=num_ranks,
            RANKS_P2=triton.next_power_of_2(num_ranks),
            BLOCK_D=triton.next_power_of_2(head_dim),
        )
    return out


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
