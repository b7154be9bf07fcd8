"""The DCP group, its collectives and the allocator-replica check (device allocator and
HiCache's striped host pool) on gloo, with 2 and 4 processes (CPU); a rank that never reaches
the replica check makes it fail within its timeout."""

import math
import time

import pytest
import torch
import torch.multiprocessing as mp

from sglang_dcp.test.gloo_group import run_in_dcp_groups


def worker(rank, group, world, dcp):
    from sglang_dcp.distributed.parallel_state import all_gather_along_dim, all_to_all_chunks
    from sglang_dcp.layers.attention.merge import dcp_merge
    from sglang_dcp.layers.attention.torch_native_dcp_backend import attention_with_lse
    from sglang_dcp.mem_cache.allocator import DCPTokenToKVPoolAllocator, replica_disagreement

    r = group.rank_in_group
    assert group.ranks == list(range(rank - rank % dcp, rank - rank % dcp + dcp))
    assert r == rank % dcp

    # all-gather along dim 1: rank-major concatenation
    x = torch.full((3, 2, 5), float(rank))
    gathered = all_gather_along_dim(group, x, dim=1)
    expected = torch.cat([torch.full((3, 2, 5), float(g)) for g in group.ranks], dim=1)
    assert torch.equal(gathered, expected)

    # all-to-all of chunks: chunk c of rank s arrives at rank c as chunk s
    sent = torch.stack([torch.full((2, 3), 10.0 * r + c) for c in range(dcp)]).to(torch.uint8)
    received = all_to_all_chunks(group, sent)
    assert torch.equal(received, torch.stack([torch.full((2, 3), 10.0 * s + r) for s in range(dcp)]).to(torch.uint8))

    # dcp_merge: partial attention over each rank's token shard == full attention
    gen = torch.Generator().manual_seed(0)  # same problem on every rank
    heads_per_rank, tokens, dim = 3, 4, 8
    q_all = torch.randn(tokens, heads_per_rank * dcp, dim, generator=gen)
    keys = 7 * dcp - 3  # uneven shards; rank r owns positions r, r + D, ...
    k, v = torch.randn(keys, 1, dim, generator=gen), torch.randn(keys, 1, dim, generator=gen)
    o_full, lse_full = attention_with_lse(q_all, k, v, 0.5, causal=False)
    o_part, lse_part = attention_with_lse(q_all, k[r::dcp], v[r::dcp], 0.5, causal=False)
    own = slice(r * heads_per_rank, (r + 1) * heads_per_rank)
    for base in (2.0, math.e):
        lse_in = lse_part if base == math.e else lse_part * math.log2(math.e)
        o, lse = dcp_merge(group, o_part, lse_in, base, out_dtype=torch.float32)
        lse_out = lse if base == math.e else lse / math.log2(math.e)
        assert torch.allclose(o, o_full[:, own], atol=1e-5), (o - o_full[:, own]).abs().max()
        assert torch.allclose(lse_out, lse_full[:, own], atol=1e-5)

    # allocator replicas: equal free-page lists agree; a page one rank alone gave out, or
    # the same pages in another order (the next allocation differs), do not
    def allocator():
        return DCPTokenToKVPoolAllocator(16 * dcp, page_size=dcp, dtype=torch.float32,
                                         device="cpu", kvcache=None, need_sort=False)

    assert replica_disagreement(allocator(), group) is None
    for diverge in (lambda pages: pages[1:], lambda pages: pages.flip(0)):
        alloc = allocator()
        if r == dcp - 1:
            alloc.free_pages = diverge(alloc.free_pages)
        message = replica_disagreement(alloc, group)
        assert message is not None and "replicas disagree" in message, message

    # HiCache: the striped host pool takes D and the rank from the DCP group; the host pools'
    # free counts must agree too (not which slots: each rank's host rows are its own)
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.memory_pool_host import MHATokenToKVPoolHost

    from sglang_dcp.mem_cache.host_pool import StripedHostPool

    device = MHATokenToKVPool(64, 2, torch.float32, 1, 4, 1, "cpu", False)
    host = StripedHostPool.build(MHATokenToKVPoolHost, device, 2.0, 0, 2 * dcp, "page_first", pin_memory=False)
    assert (host.dcp_size, host.dcp_rank, host.page_size, host.size) == (dcp, r, 2 * dcp, 130 * dcp)
    assert replica_disagreement(allocator(), group, host) is None
    if r == dcp - 1:
        host.alloc(2 * dcp)
    message = replica_disagreement(allocator(), group, host)
    assert message is not None and f"host available={130 * dcp - 2 * dcp}" in message, message


def late_rank_worker(rank, group, check_timeout_s, done):
    """Rank 0 runs the allocator-replica check; rank 1 never does (it waits for rank 0)."""
    from sglang_dcp.mem_cache.allocator import DCPTokenToKVPoolAllocator, replica_disagreement

    if rank == 1:
        done.wait(timeout=600)
        return
    allocator = DCPTokenToKVPoolAllocator(32, page_size=2, dtype=torch.float32, device="cpu",
                                          kvcache=None, need_sort=False)  # fmt: skip
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"DCP allocator-replica check: not every rank of DCP group \[0, 1\]"):
            replica_disagreement(allocator, group)
    finally:
        done.set()
    elapsed = time.monotonic() - start
    print(f"the replica check failed after {elapsed:.1f} s (timeout {check_timeout_s} s)")
    assert check_timeout_s <= elapsed < check_timeout_s + 10, elapsed


def test_replica_check_fails_fast_when_a_rank_never_arrives():
    """Ranks out of step (one never reaches the idle check): the check raises within its
    timeout, naming itself, instead of waiting gloo's default 120 minutes."""
    check_timeout_s = 3
    done = mp.get_context("spawn").Event()
    run_in_dcp_groups(late_rank_worker, 2, 2, check_timeout_s, done, timeout=90,
                      group_kwargs={"replica_check_timeout_s": check_timeout_s})  # fmt: skip


@pytest.mark.parametrize("world,dcp", [(2, 2), (4, 2), (4, 4)])
def test_dcp_collectives_on_gloo(world, dcp):
    run_in_dcp_groups(worker, world, dcp, world, dcp)
