"""The DCP group, its collectives and the allocator-replica check on gloo, with 2 and 4
processes (CPU); a rank that never reaches the replica check makes it fail within its
timeout."""

import math
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, dcp, port, errors):
    os.environ["SGLANG_NCCL_SO_PATH"] = "/nonexistent/libnccl.so.2"
    try:
        from sglang.srt.distributed.parallel_state import (
            init_distributed_environment,
            initialize_model_parallel,
        )

        from sglang_dcp.distributed.parallel_state import (
            all_gather_along_dim,
            all_to_all_chunks,
            get_dcp_group,
            initialize_dcp_group,
        )
        from sglang_dcp.layers.attention.merge import dcp_merge
        from sglang_dcp.mem_cache.allocator import DCPTokenToKVPoolAllocator, replica_disagreement
        from sglang_dcp.layers.attention.torch_native_dcp_backend import attention_with_lse

        init_distributed_environment(
            world_size=world, rank=rank, local_rank=rank, backend="gloo",
            distributed_init_method=f"tcp://127.0.0.1:{port}",
        )
        initialize_model_parallel(tensor_model_parallel_size=world, backend="gloo")
        initialize_dcp_group(dcp)
        group = get_dcp_group()
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
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise


def late_rank_worker(rank, port, check_timeout_s, done, errors):
    """Rank 0 runs the allocator-replica check; rank 1 never does (it waits for rank 0)."""
    os.environ["SGLANG_NCCL_SO_PATH"] = "/nonexistent/libnccl.so.2"
    try:
        from sglang.srt.distributed.parallel_state import (
            init_distributed_environment,
            initialize_model_parallel,
        )

        from sglang_dcp.distributed.parallel_state import get_dcp_group, initialize_dcp_group
        from sglang_dcp.mem_cache.allocator import DCPTokenToKVPoolAllocator, replica_disagreement

        init_distributed_environment(
            world_size=2, rank=rank, local_rank=rank, backend="gloo",
            distributed_init_method=f"tcp://127.0.0.1:{port}",
        )  # fmt: skip
        initialize_model_parallel(tensor_model_parallel_size=2, backend="gloo")
        initialize_dcp_group(2, replica_check_timeout_s=check_timeout_s)
        if rank == 1:
            done.wait(timeout=600)
            return
        allocator = DCPTokenToKVPoolAllocator(32, page_size=2, dtype=torch.float32, device="cpu",
                                              kvcache=None, need_sort=False)  # fmt: skip
        start = time.monotonic()
        try:
            replica_disagreement(allocator, get_dcp_group())
            errors.put("rank 0: the check returned")
        except RuntimeError as e:
            errors.put(f"rank 0 after {time.monotonic() - start:.1f} s: {e}")
        done.set()
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise


def test_replica_check_fails_fast_when_a_rank_never_arrives():
    """Ranks out of step (one never reaches the idle check): the check raises within its
    timeout, naming itself, instead of waiting gloo's default 120 minutes."""
    ctx = mp.get_context("spawn")
    errors, done = ctx.SimpleQueue(), ctx.Event()
    port, check_timeout_s = free_port(), 3
    procs = [ctx.Process(target=late_rank_worker, args=(r, port, check_timeout_s, done, errors))
             for r in range(2)]  # fmt: skip
    for p in procs:
        p.start()
    procs[0].join(timeout=90)  # start-up (two spawned interpreters importing SGLang) + the check
    done.set()
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    print(messages)
    assert len(messages) == 1 and "DCP allocator-replica check: not every rank of DCP group [0, 1]" in messages[0], messages
    elapsed = float(messages[0].split(" after ")[1].split(" s:")[0])
    assert check_timeout_s <= elapsed < check_timeout_s + 10, messages


@pytest.mark.parametrize("world,dcp", [(2, 2), (4, 2), (4, 4)])
def test_dcp_collectives_on_gloo(world, dcp):
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, dcp, port, errors)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not messages, messages
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
