"""DCP's logical-slot allocator through SGLang's Triton allocator kernels, for every kind of
accepted ``(page, dcp)``: physical page ``P``, logical page ``P * D``.

Where ``P * D`` is a power of two, ``DCPTokenToKVPoolAllocator`` on CUDA runs SGLang's
``alloc_extend_kernel`` and ``alloc_decode_kernel``; they must hand out the same slots as the
PyTorch path that runs on CPU. Where it is not (D = 3), SGLang's extend kernel cannot run
(``tl.arange`` needs a power of two), so extend allocates in PyTorch on CUDA too, and decode
stays on SGLang's kernel. Each case replays the same requests on both: fresh prefills, decodes
that open new pages, chunked-prefill continuations from a partly filled page, frees.

Without a GPU the kernel cases run on CPU under Triton's interpreter (``TRITON_INTERPRET=1``,
as ``test_triton_interpreter.py`` runs them); the PyTorch-only cases need neither.
"""

import os
import random

import pytest
import torch

from sglang_dcp.mem_cache.allocator import DCPTokenToKVPoolAllocator

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRETED = not CUDA and os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not (CUDA or INTERPRETED), reason="needs a CUDA GPU or TRITON_INTERPRET=1")
pytestmark = pytest.mark.gpu

POWER_OF_TWO_PAGES = [(1, 2), (1, 4), (2, 2), (16, 2), (16, 4), (64, 2)]
OTHER_PAGES = [(1, 3), (16, 3), (3, 2)]  # (P, D) with P * D not a power of two


def allocator(page: int, dcp: int, triton: bool, rows_per_rank: int = 4096) -> DCPTokenToKVPoolAllocator:
    """With ``triton``, on the GPU or under the interpreter (CPU tensors, SGLang's kernels)."""
    alloc = DCPTokenToKVPoolAllocator(
        rows_per_rank * dcp, page_size=page * dcp, dtype=torch.bfloat16,
        device=DEVICE if triton else "cpu", kvcache=None, need_sort=False,
    )  # fmt: skip
    alloc.use_triton_kernels(triton)
    return alloc


def replay(alloc, seed: int = 0):
    """Requests through ``alloc``: prefills, decodes, chunk continuations, frees. Returns every
    slot tensor handed out (on CPU) and the free pages at the end."""
    rng = random.Random(seed)
    device = alloc.device
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=device)  # noqa: E731
    page = alloc.page_size
    slots_of = []  # per live request: its slots
    handed_out = []

    def extend(prefix_lens, seq_lens, last_loc):
        out = alloc.alloc_extend(
            as_tensor(prefix_lens), torch.tensor(prefix_lens), as_tensor(seq_lens),
            torch.tensor(seq_lens), as_tensor(last_loc), sum(seq_lens) - sum(prefix_lens),
        )  # fmt: skip
        assert out is not None
        handed_out.append(out.cpu())
        return out.cpu()

    for _ in range(4):
        # new requests, some of several pages, some less than one
        lens = [rng.choice([1, 2, page - 1 or 1, page, page + 1, 3 * page + 5]) for _ in range(rng.randint(1, 5))]
        new = extend([0] * len(lens), lens, [-1] * len(lens))
        slots_of += [list(s.tolist()) for s in new.split(lens)]
        # decodes of every live request (one opens a page after a prompt of page - 1 or page)
        for _ in range(rng.randint(1, 3)):
            seq_lens = [len(s) + 1 for s in slots_of]
            out = alloc.alloc_decode(as_tensor(seq_lens), torch.tensor(seq_lens), as_tensor([s[-1] for s in slots_of]))
            assert out is not None
            handed_out.append(out.cpu())
            for s, slot in zip(slots_of, out.tolist()):
                s.append(slot)
        # chunked-prefill continuations of some requests, from wherever their last page stands
        chosen = rng.sample(range(len(slots_of)), k=min(2, len(slots_of)))
        prefix = [len(slots_of[i]) for i in chosen]
        grow = [rng.choice([1, page, 2 * page + 3]) for _ in chosen]
        more = extend(prefix, [p + g for p, g in zip(prefix, grow)], [slots_of[i][-1] for i in chosen])
        for i, s in zip(chosen, more.split(grow)):
            slots_of[i] += s.tolist()
        # finish a request
        done = slots_of.pop(rng.randrange(len(slots_of)))
        alloc.free(as_tensor(done))
    all_slots = [slot for s in slots_of for slot in s]
    assert len(set(all_slots)) == len(all_slots)
    return handed_out, sorted(alloc.free_pages.cpu().tolist())


@needs_triton
@pytest.mark.parametrize("page, dcp", POWER_OF_TWO_PAGES, ids=str)
def test_sglang_kernels_allocate_like_pytorch(page, dcp):
    kernels = allocator(page, dcp, triton=True)
    assert not kernels.extend_in_torch and not kernels.decode_in_torch
    assert_same_allocations(replay(kernels), replay(allocator(page, dcp, triton=False)))


@needs_triton
@pytest.mark.parametrize("page, dcp", OTHER_PAGES, ids=str)
def test_other_logical_pages_extend_in_pytorch(page, dcp):
    """SGLang's extend kernel refuses the page; DCP extends in PyTorch and decodes with the kernel."""
    alloc = allocator(page, dcp, triton=True)
    assert alloc.extend_in_torch and not alloc.decode_in_torch
    assert_same_allocations(replay(alloc), replay(allocator(page, dcp, triton=False)))
    alloc.extend_in_torch = False
    with pytest.raises(Exception, match="power of 2|power of two"):
        alloc.alloc_extend(*(torch.tensor([n], device=DEVICE) for n in (0, 0, 5, 5, -1)), 5)


def assert_same_allocations(run, reference):
    (slots, free_pages), (ref_slots, ref_free_pages) = run, reference
    for a, b in zip(slots, ref_slots, strict=True):
        assert torch.equal(a, b)
    assert free_pages == ref_free_pages
