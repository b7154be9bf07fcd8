"""Moving K/V between logical slots of a KV pool under DCP (speculative decoding).

SGLang moves K/V inside a pool, by logical slots, in two places: after a verify pass over a
tree (EAGLE with topk > 1, NGRAM) the accepted path's K/V move from their tree slots to the
request's next slots (``spec_utils.move_accept_tokens_to_target_kvcache``); with page size > 1
and topk > 1 each draft branch's first page gets a copy of the prefix's last partial page
(``base_spec_worker.duplicate_prefix_tail_to_draft_branches``). Under DCP slot ``loc`` is row
``loc // D`` of rank ``loc % D``: a move between slots of two owners crosses ranks (the accepted
tree node ``j`` at depth ``i`` moves from the owner of position ``seq_len + j`` to that of
``seq_len + i``), and the target's owner does not hold the source row.

``move_kv_in_group``: every rank of the group sees the same (target, source) pairs. Each rank
reads the source rows it owns, every layer's K and V as raw bytes; if any move crosses ranks,
one all-gather over the DCP group hands every rank each source row from its owner; each rank
then writes the targets it owns. All sources are read before any target is written: the moves
of one call are simultaneous, as in SGLang's kernels.
"""

import torch

from sglang_dcp.distributed.parallel_state import all_gather_along_dim
from sglang_dcp.mem_cache.layout import owner_rank, physical_row


def rows_as_bytes(buffer: torch.Tensor) -> torch.Tensor:
    """A pool buffer ``[rows, ...]`` viewed as ``uint8 [rows, row_bytes]`` (no copy)."""
    return buffer.view(buffer.shape[0], -1).view(torch.uint8)


def move_kv_in_group(pool, tgt_loc: torch.Tensor, src_loc: torch.Tensor, group) -> None:
    """``kv[tgt_loc[i]] = kv[src_loc[i]]`` for every layer of ``pool`` (an ``MHATokenToKVPool``
    of physical rows), for logical slots striped over ``group`` (module doc)."""
    buffers = [rows_as_bytes(b) for b in (*pool.k_buffer, *pool.v_buffer)]
    if not buffers or tgt_loc.numel() == 0:
        return
    num_ranks, rank = group.world_size, group.rank_in_group
    tgt, src = tgt_loc.reshape(-1).long(), src_loc.reshape(-1).long()
    src_owner, tgt_owner = owner_rank(src, num_ranks), owner_rank(tgt, num_ranks)
    # every buffer's row side by side (K and V rows may differ in size)
    ends = torch.tensor([b.shape[1] for b in buffers]).cumsum(0).tolist()
    columns = [slice(end - b.shape[1], end) for b, end in zip(buffers, ends)]

    owned_src = src_owner == rank
    src_rows = physical_row(src[owned_src], num_ranks)
    moved = buffers[0].new_zeros((src.numel(), ends[-1]))
    for buffer, cols in zip(buffers, columns):
        moved[owned_src, cols] = buffer[src_rows]
    crosses = src_owner != tgt_owner
    if bool(crosses.any()):  # the same on every rank: they all see the same slots
        gathered = all_gather_along_dim(group, moved[crosses].unsqueeze(0), dim=0)
        # gathered [D, moves, bytes]: each crossing move's row from its source's owner
        moves = torch.arange(gathered.shape[1], device=gathered.device)
        moved[crosses] = gathered[src_owner[crosses], moves]

    owned_tgt = tgt_owner == rank
    tgt_rows = physical_row(tgt[owned_tgt], num_ranks)
    for buffer, cols in zip(buffers, columns):
        buffer[tgt_rows] = moved[owned_tgt, cols]
