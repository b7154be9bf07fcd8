"""Where a logical KV slot lives under decode context parallelism (DCP).

The allocator, radix cache and scheduler hand out *logical* slots ``loc`` in pages of
``page_size * D`` slots (D = dcp size). Slot ``loc`` is stored on DCP rank ``loc % D``
at physical row ``loc // D`` of that rank's KV pool. Because pages are ``page_size * D``
long and page-aligned, ``loc % D == position % D`` for every token of a request, so a
request's tokens are interleaved round-robin over the group: rank ``r`` holds positions
``r, r + D, r + 2D, ...``, i.e. ``local_len(L, r) = L // D + (r < L % D)`` of a
sequence of ``L`` tokens.

Physical rows ``[0, page_size)`` belong to logical page 0, which the allocator never
hands out; row 0 is where a rank writes the K/V of tokens it does not own.
"""

import torch

# Physical row that absorbs the K/V writes of tokens owned by another rank.
DUMP_ROW = 0


def owner_rank(loc: torch.Tensor, dcp_size: int) -> torch.Tensor:
    """The DCP rank that stores logical slot ``loc``: ``loc % D``."""
    return loc % dcp_size


def physical_row(loc: torch.Tensor, dcp_size: int) -> torch.Tensor:
    """The row of the owner's KV pool that holds logical slot ``loc``: ``loc // D``."""
    return loc // dcp_size


def local_write_rows(loc: torch.Tensor, dcp_size: int, dcp_rank: int) -> torch.Tensor:
    """Rows this rank writes for slots ``loc``: ``loc // D`` where ``loc % D == rank``,
    else ``DUMP_ROW``. Fixed shape, so it is safe inside a CUDA graph."""
    owned = owner_rank(loc, dcp_size) == dcp_rank
    return torch.where(owned, physical_row(loc, dcp_size), DUMP_ROW)


def local_seq_lens(seq_lens: torch.Tensor, dcp_size: int, dcp_rank: int) -> torch.Tensor:
    """Tokens of each sequence stored on ``dcp_rank``: ``L // D + (rank < L % D)``."""
    return seq_lens // dcp_size + (dcp_rank < seq_lens % dcp_size).to(seq_lens.dtype)


def local_token_rows(
    req_to_token_row: torch.Tensor, seq_len: int, dcp_size: int, dcp_rank: int
) -> torch.Tensor:
    """Physical rows of one request's first ``seq_len`` tokens that live on ``dcp_rank``,
    in position order: ``req_to_token[p] // D`` for ``p = rank, rank + D, ... < seq_len``."""
    return physical_row(req_to_token_row[dcp_rank:seq_len:dcp_size], dcp_size)


def local_slot_rows(slots: torch.Tensor, dcp_size: int, dcp_rank: int) -> torch.Tensor:
    """Physical rows of the logical ``slots`` that live on ``dcp_rank``, in their order (any
    slots, e.g. a draft branch's, whose positions need not follow the request's layout)."""
    return physical_row(slots[owner_rank(slots, dcp_size) == dcp_rank], dcp_size)


def local_page_rows(slots: torch.Tensor, dcp_size: int, dcp_rank: int) -> torch.Tensor:
    """Physical rows of ``dcp_rank`` among ``slots`` made of whole logical pages (runs of
    ``P * D`` slots from a multiple of ``P * D``, as the paged allocators and the radix cache
    hand them out), in their order: ``slots.view(-1, D)[:, rank] // D``. Every ``D``-th slot is
    the rank's, so no mask selects them and no device value is read (``local_slot_rows``
    takes any slots, with a mask). Rows of one logical page fill one physical page."""
    return physical_row(slots.reshape(-1, dcp_size)[:, dcp_rank], dcp_size)
