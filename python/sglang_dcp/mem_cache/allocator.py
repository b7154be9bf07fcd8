"""The logical-slot allocator of DCP: SGLang's paged allocator, widened by D.

It hands out logical slots in pages of ``page_size * D`` over ``N * D`` slots while each
rank's physical pool keeps ``N`` rows of ``page_size``-row pages (``layout`` maps slot
``loc`` to rank ``loc % D``, row ``loc // D``). SGLang launches Triton kernels in
``alloc_extend``/``alloc_decode``; this class computes the same slots in PyTorch on CPU,
and for ``alloc_extend`` also where the logical page is not a power of two (e.g. D = 3):
SGLang's extend kernel spans a page with ``tl.arange``, which needs one.

Every rank of a DCP group runs its own replica of this allocator (each scheduler takes the
same decisions); ``check_replicas_at_idle`` compares the replicas across the group, on a
gloo group of its own whose short timeout turns ranks out of step into an error.
"""

import logging
from typing import Optional

import torch

from sglang.srt.distributed.parallel_state import GroupCoordinator
from sglang.srt.environ import envs
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.utils import get_num_new_pages, next_power_of_2
from sglang.srt.utils.common import raise_error_or_warn

from sglang_dcp.distributed.parallel_state import get_replica_check_group
from sglang_dcp.mem_cache.host_pool import host_slot_leak, striped_host_pool

logger = logging.getLogger(__name__)


def extend_slots(
    prefix_lens_cpu: torch.Tensor,
    seq_lens_cpu: torch.Tensor,
    last_loc: torch.Tensor,
    new_pages: torch.Tensor,
    page_size: int,
) -> torch.Tensor:
    """The slots of every request's new tokens, positions ``prefix_len <= p < seq_len``, in
    request order: ``last_loc + 1 + (p - prefix_len)`` while ``p`` is in the request's last
    partly filled page, then ``new_pages[k] * page_size + p % page_size`` for its ``k``-th new
    page (requests take ``new_pages`` in order, ``ceil(seq_len / page_size) -
    ceil(prefix_len / page_size)`` each).

    The index arithmetic runs on the CPU lengths; the device sees one copy of ``[2, T]``
    indices and one gather from ``[last_loc + 1, new_pages * page_size]``: no device value is
    read back (SGLang's ``alloc_extend_naive`` branches on device scalars per request)."""
    extend_lens = seq_lens_cpu - prefix_lens_cpu
    num_tokens = int(extend_lens.sum())
    req = torch.repeat_interleave(torch.arange(len(extend_lens)), extend_lens, output_size=num_tokens)
    first_token = torch.cumsum(extend_lens, 0) - extend_lens
    prefix = prefix_lens_cpu[req]
    pos = prefix + torch.arange(num_tokens) - first_token[req]
    first_new_page = (prefix_lens_cpu + page_size - 1) // page_size
    pages = (seq_lens_cpu + page_size - 1) // page_size - first_new_page
    first_page = torch.cumsum(pages, 0) - pages
    in_last_page = pos < first_new_page[req] * page_size
    base_index = torch.where(
        in_last_page, req, len(extend_lens) + first_page[req] + pos // page_size - first_new_page[req]
    )
    offset = torch.where(in_last_page, pos - prefix, pos % page_size)
    indices = torch.stack([base_index, offset])
    if last_loc.device.type == "cuda":
        indices = indices.pin_memory()
    base_index, offset = indices.to(last_loc.device, non_blocking=True)
    base = torch.cat([last_loc.to(torch.int64) + 1, new_pages * page_size])
    return base[base_index] + offset


class DCPTokenToKVPoolAllocator(PagedTokenToKVPoolAllocator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_triton_kernels(self.device != "cpu")

    def use_triton_kernels(self, triton: bool) -> None:
        """Decode with SGLang's Triton kernel if ``triton``; extend too if the logical page is
        a power of two (the extend kernel spans a page with ``tl.arange``)."""
        self.decode_in_torch = not triton
        self.extend_in_torch = not triton or next_power_of_2(self.page_size) != self.page_size

    def alloc_extend(
        self,
        prefix_lens,
        prefix_lens_cpu,
        seq_lens,
        seq_lens_cpu,
        last_loc,
        extend_num_tokens,
        num_new_pages=None,
    ):
        if not self.extend_in_torch:
            return super().alloc_extend(
                prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu,
                last_loc, extend_num_tokens, num_new_pages,
            )
        if num_new_pages is None:
            num_new_pages = get_num_new_pages(
                seq_lens=seq_lens_cpu, page_size=self.page_size, prefix_lens=prefix_lens_cpu
            )
        if self.need_sort and num_new_pages > len(self.free_pages):
            self.merge_and_sort_free()
        if num_new_pages > len(self.free_pages):
            return None
        out_indices = extend_slots(
            prefix_lens_cpu, seq_lens_cpu, last_loc, self.free_pages[:num_new_pages], self.page_size
        )
        self.free_pages = self.free_pages[num_new_pages:]
        return out_indices

    def alloc_decode(self, seq_lens, seq_lens_cpu, last_loc):
        if not self.decode_in_torch:
            return super().alloc_decode(seq_lens, seq_lens_cpu, last_loc)
        # The new token sits at position seq_len - 1; it opens a page iff that is a page start.
        opens_page = (seq_lens - 1) % self.page_size == 0
        num_new_pages = int(opens_page.sum())
        if self.need_sort and num_new_pages > len(self.free_pages):
            self.merge_and_sort_free()
        if num_new_pages > len(self.free_pages):
            return None
        out_indices = (last_loc + 1).to(torch.int64)
        out_indices[opens_page] = self.free_pages[:num_new_pages] * self.page_size
        self.free_pages = self.free_pages[num_new_pages:]
        return out_indices


def free_pages_digest(allocator: PagedTokenToKVPoolAllocator) -> torch.Tensor:
    """``[available_size, sum(free), sum((i + 1) * free[i])]`` of the free-page list: equal
    on two replicas iff (up to checksum collisions) they hold the same free pages in the
    same order (the next allocation takes the first ones)."""
    free = allocator.free_pages.to(device="cpu", dtype=torch.int64)
    position = torch.arange(1, len(free) + 1, dtype=torch.int64)
    return torch.stack([
        torch.tensor(allocator.available_size(), dtype=torch.int64),
        free.sum(),
        (free * position).sum(),
    ])


def replica_disagreement(
    allocator: PagedTokenToKVPoolAllocator, group: GroupCoordinator, host_pool=None
) -> Optional[str]:
    """All-gather ``free_pages_digest`` (and, with HiCache's striped ``host_pool``, its count of
    free host slots) over the DCP group's replica-check group; ``None`` if every rank holds the
    same, else a message with each rank's digest. Raises if a rank does not arrive within the
    group's timeout (``parallel_state.REPLICA_CHECK_TIMEOUT_S``). A rank's host slots are its
    own storage, so only their number must agree (the same decisions ahead), not which."""
    digest = free_pages_digest(allocator)
    if host_pool is not None:
        digest = torch.cat([digest, torch.tensor([host_pool.available_size()], dtype=torch.int64)])
    gathered = [torch.empty_like(digest) for _ in range(group.world_size)]
    try:
        torch.distributed.all_gather(gathered, digest, group=get_replica_check_group())
    except RuntimeError as e:  # gloo's timeout (DistBackendError) or a peer gone
        raise RuntimeError(
            f"DCP allocator-replica check: not every rank of DCP group {group.ranks} reached "
            f"it; their schedulers are out of step: {e}"
        ) from e
    if all(torch.equal(g, gathered[0]) for g in gathered):
        return None
    per_rank = ", ".join(
        f"rank {rank}: available={int(d[0])} checksums=({int(d[1])}, {int(d[2])})"
        + (f" host available={int(d[3])}" if host_pool is not None else "")
        for rank, d in zip(group.ranks, gathered)
    )
    return f"DCP allocator replicas disagree at idle (the KV slots of some rank are leaked or reused): {per_rank}"


_checked_at_forward_ct: Optional[int] = None


def check_replicas_at_idle(scheduler, group: GroupCoordinator) -> None:
    """Once per idle period (the first fully idle loop after a forward pass; every rank of
    the group reaches it in the same iteration), require the DCP group's allocator replicas
    to agree (and, with HiCache, no host slot to have leaked). Strict like SGLang's idle
    memory check (``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE``): raises, else warns."""
    global _checked_at_forward_ct
    if scheduler.forward_ct == _checked_at_forward_ct or not scheduler.is_fully_idle():
        return
    first = _checked_at_forward_ct is None
    _checked_at_forward_ct = scheduler.forward_ct
    tree_cache = scheduler.tree_cache
    message = replica_disagreement(scheduler.token_to_kv_pool_allocator, group, striped_host_pool(tree_cache))
    message = message or host_slot_leak(tree_cache)
    if message is not None:
        raise_error_or_warn(
            scheduler.invariant_checker,
            envs.SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE.get(),
            "count_memory_leak_warnings",
            message,
        )
    elif first:
        logger.info("DCP allocator replicas agree at idle; checked again after every busy period")
