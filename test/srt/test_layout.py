"""Layout math and the logical-slot allocator (fast, no SGLang engine)."""

import random

import pytest
import torch

from sglang_dcp.mem_cache.allocator import DCPTokenToKVPoolAllocator, extend_slots
from sglang_dcp.mem_cache.layout import (
    DUMP_ROW,
    local_seq_lens,
    local_token_rows,
    local_write_rows,
    owner_rank,
    physical_row,
)

DCP_SIZES = [1, 2, 3, 4]
PAGE_SIZES = [1, 2, 16]


@pytest.mark.parametrize("dcp", DCP_SIZES)
def test_owner_and_row_partition_the_slots(dcp):
    loc = torch.arange(1000)
    owners, rows = owner_rank(loc, dcp), physical_row(loc, dcp)
    assert torch.equal(rows * dcp + owners, loc)  # (owner, row) <-> loc is a bijection
    for r in range(dcp):
        assert torch.equal(rows[owners == r], torch.arange((owners == r).sum()))


@pytest.mark.parametrize("dcp", DCP_SIZES)
def test_local_seq_lens_sum_to_global(dcp):
    seq_lens = torch.arange(0, 50)
    per_rank = torch.stack([local_seq_lens(seq_lens, dcp, r) for r in range(dcp)])
    assert torch.equal(per_rank.sum(0), seq_lens)
    for r in range(dcp):
        expected = torch.tensor([len(range(r, int(n), dcp)) for n in seq_lens])
        assert torch.equal(per_rank[r], expected)


@pytest.mark.parametrize("dcp", DCP_SIZES)
def test_local_write_rows_keep_only_owned_tokens(dcp):
    loc = torch.randint(dcp * 4, 10_000, (300,))
    for r in range(dcp):
        rows = local_write_rows(loc, dcp, r)
        owned = loc % dcp == r
        assert torch.equal(rows[owned], loc[owned] // dcp)
        assert torch.all(rows[~owned] == DUMP_ROW)


def make_allocator(rows_per_rank, page, dcp):
    return DCPTokenToKVPoolAllocator(
        rows_per_rank * dcp, page_size=page * dcp, dtype=torch.bfloat16,
        device="cpu", kvcache=None, need_sort=False,
    )


def extend(alloc, prefix_lens, seq_lens, last_loc):
    prefix = torch.tensor(prefix_lens)
    seqs = torch.tensor(seq_lens)
    return alloc.alloc_extend(
        prefix, prefix, seqs, seqs, torch.tensor(last_loc), int((seqs - prefix).sum())
    )


@pytest.mark.parametrize("dcp", DCP_SIZES)
@pytest.mark.parametrize("page", PAGE_SIZES)
def test_allocation_interleaves_tokens_round_robin(dcp, page):
    """Every request's token at position p gets a slot with slot % D == p % D, and each
    rank's rows of one request are distinct and never the dump page."""
    alloc = make_allocator(rows_per_rank=64 * page, page=page, dcp=dcp)
    seq_lens = [1, 7, 33, 2 * page * dcp + 1]
    slots = extend(alloc, [0] * 4, seq_lens, [-1] * 4)
    per_req = slots.split(seq_lens)
    table = []
    for length, req_slots in zip(seq_lens, per_req):
        positions = torch.arange(length)
        assert torch.equal(req_slots % dcp, positions % dcp)
        assert torch.all(req_slots >= page * dcp)  # logical page 0 is never handed out
        table.append(req_slots)
    # decode: each request grows by 3 tokens
    for _ in range(3):
        last = torch.stack([t[-1] for t in table])
        lens = torch.tensor([len(t) + 1 for t in table])
        new = alloc.alloc_decode(lens, lens, last)
        table = [torch.cat([t, new[i : i + 1]]) for i, t in enumerate(table)]
    all_slots = torch.cat(table)
    assert len(torch.unique(all_slots)) == len(all_slots)
    for req_slots in table:
        assert torch.equal(req_slots % dcp, torch.arange(len(req_slots)) % dcp)
        for r in range(dcp):
            rows = local_token_rows(req_slots, len(req_slots), dcp, r)
            assert len(rows) == len(range(r, len(req_slots), dcp))
            assert torch.all(rows >= page)  # physical rows [0, page) belong to page 0


@pytest.mark.parametrize("dcp", DCP_SIZES)
@pytest.mark.parametrize("page", PAGE_SIZES)
def test_alloc_free_restores_every_page(dcp, page):
    alloc = make_allocator(rows_per_rank=16 * page, page=page, dcp=dcp)
    total = alloc.available_size()
    assert total == 16 * page * dcp
    slots = extend(alloc, [0, 0], [5, page * dcp + 3], [-1, -1])
    assert alloc.available_size() < total
    alloc.free(slots)
    assert alloc.available_size() == total
    assert extend(alloc, [0], [total + 1], [-1]) is None  # over capacity: refused


@pytest.mark.parametrize("dcp", [2, 4])
def test_prefix_reuse_continues_the_interleave(dcp):
    """A request that reuses a cached prefix (radix hit) extends from its last slot."""
    page = 2
    alloc = make_allocator(rows_per_rank=64, page=page, dcp=dcp)
    prefix = extend(alloc, [0], [page * dcp * 2], [-1])  # two whole logical pages
    tail = extend(alloc, [len(prefix)], [len(prefix) + 9], [int(prefix[-1])])
    full = torch.cat([prefix, tail])
    assert torch.equal(full % dcp, torch.arange(len(full)) % dcp)
    assert len(torch.unique(full)) == len(full)


def random_extend_batch(rng, page, num_reqs):
    """Prefix and sequence lengths (prefixes page-aligned or not, extends within or past their
    last page) with each request's last slot in a page of its own, and enough free pages."""
    prefix_lens = [rng.choice([0, rng.randrange(1, 4 * page)]) for _ in range(num_reqs)]
    seq_lens = [p + rng.choice([1, page - p % page, rng.randrange(1, 5 * page)]) for p in prefix_lens]
    last_loc = [(1000 + i) * page + (p - 1) % page if p else -1 for i, p in enumerate(prefix_lens)]
    free_pages = torch.randperm(900)[: 5 * num_reqs + 8] + 1
    return (torch.tensor(prefix_lens), torch.tensor(seq_lens), torch.tensor(last_loc), free_pages)


@pytest.mark.parametrize("page", [1, 2, 3, 6, 16, 48])
def test_extend_slots_match_sglang(page):
    """``extend_slots`` hands out exactly the slots of SGLang's ``alloc_extend_naive``."""
    from sglang.srt.mem_cache.allocator.paged import alloc_extend_naive

    rng = random.Random(page)
    for num_reqs in (1, 2, 7, 40):
        prefix_lens, seq_lens, last_loc, free_pages = random_extend_batch(rng, page, num_reqs)
        expected = torch.empty(int((seq_lens - prefix_lens).sum()), dtype=torch.int64)
        alloc_extend_naive(prefix_lens, seq_lens, last_loc, free_pages, expected, page, "cpu")
        got = extend_slots(prefix_lens, seq_lens, last_loc, free_pages, page)
        assert torch.equal(got, expected), (page, num_reqs)


def test_extend_reads_no_device_value():
    """The allocator's extend path with every device tensor on the meta device (which has no
    values): it must run, so it reads no device value back to the host (on CUDA: no sync)."""
    page, dcp = 2, 3
    alloc = DCPTokenToKVPoolAllocator(
        64 * dcp * page, page_size=page * dcp, dtype=torch.bfloat16, device="meta",
        kvcache=None, need_sort=False,
    )  # fmt: skip
    alloc.use_triton_kernels(False)
    prefix_lens, seq_lens, last_loc, _ = random_extend_batch(random.Random(0), page * dcp, 16)
    meta = lambda t: t.to("meta")  # noqa: E731
    out = alloc.alloc_extend(meta(prefix_lens), prefix_lens, meta(seq_lens), seq_lens, meta(last_loc),
                             int((seq_lens - prefix_lens).sum()))  # fmt: skip
    assert out.device.type == "meta" and out.shape == (int((seq_lens - prefix_lens).sum()),)
