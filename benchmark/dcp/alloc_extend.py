"""Time of one prefill batch's slot allocation where the logical page is not a power of two.

There (``--dcp 3``: logical pages 3, 48, ...) SGLang's Triton extend kernel cannot run, so
``DCPTokenToKVPoolAllocator.alloc_extend`` computes the slots in PyTorch. This times, for a
batch of ``R`` requests with random cached prefixes and new tokens, on ``--device``:

* before: SGLang's ``alloc_extend_naive`` (what the allocator called up to issue 21): a Python
  loop over the requests that branches on device scalars;
* after: ``extend_slots`` (index arithmetic on the CPU lengths, one gather on the device).

Both get the same inputs and must give the same slots. On CUDA it also counts the
synchronizations of each (``torch.cuda.set_sync_debug_mode``). Results go to
``$OUT/alloc_extend.json``.

    python benchmark/dcp/alloc_extend.py [--device cuda] [--page 3 48] [--requests 1 8 64 256]
"""

import argparse
import json
import os
import random
import time
import warnings

import torch

from sglang_dcp.mem_cache.allocator import extend_slots


def batch(rng: random.Random, page: int, num_reqs: int, device: str):
    """CPU and device lengths of ``num_reqs`` requests (cached prefixes of 0 to 4096 tokens,
    1 to 512 new ones), each request's last slot, and the free pages."""
    prefix = torch.tensor([rng.choice([0, rng.randrange(1, 4096)]) for _ in range(num_reqs)])
    seq = prefix + torch.tensor([rng.randrange(1, 513) for _ in range(num_reqs)])
    last_loc = torch.tensor([(100 + i) * 4096 // page * page + (p - 1) % page if p else -1
                             for i, p in enumerate(prefix.tolist())])  # fmt: skip
    num_pages = int(((seq + page - 1) // page - (prefix + page - 1) // page).sum())
    free_pages = (torch.randperm(4 * num_pages + 16) + 1).to(device)
    return prefix, seq, prefix.to(device), seq.to(device), last_loc.to(device), free_pages, num_pages


def before(prefix, seq, prefix_dev, seq_dev, last_loc, free_pages, num_pages, page):
    from sglang.srt.mem_cache.allocator.paged import alloc_extend_naive

    out = torch.empty(int((seq - prefix).sum()), dtype=torch.int64, device=last_loc.device)
    alloc_extend_naive(prefix_dev, seq_dev, last_loc, free_pages, out, page, last_loc.device)
    return out


def after(prefix, seq, prefix_dev, seq_dev, last_loc, free_pages, num_pages, page):
    return extend_slots(prefix, seq, last_loc, free_pages[:num_pages], page)


def timed(fn, args, device: str, repeats: int):
    """``(output, mean seconds per call, synchronizations per call)``."""
    cuda = device == "cuda"
    out = fn(*args)  # warm-up
    syncs = 0
    if cuda:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            fn(*args)
            torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    if cuda:
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) / repeats, syncs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--page", type=int, nargs="+", default=[3, 48], help="logical pages (P * D)")
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    rows = []
    print(f"{'page':>4} {'reqs':>4} {'tokens':>6} {'before us':>10} {'after us':>9} {'syncs before':>12} {'after':>5}")
    for page in args.page:
        for num_reqs in args.requests:
            inputs = batch(random.Random(num_reqs), page, num_reqs, args.device)
            old, t_old, s_old = timed(before, (*inputs, page), args.device, args.repeats)
            new, t_new, s_new = timed(after, (*inputs, page), args.device, args.repeats)
            assert torch.equal(old, new), (page, num_reqs)
            rows.append(dict(page=page, requests=num_reqs, tokens=len(new), before_s=t_old, after_s=t_new,
                             syncs_before=s_old, syncs_after=s_new))  # fmt: skip
            print(f"{page:>4} {num_reqs:>4} {len(new):>6} {t_old * 1e6:>10.0f} {t_new * 1e6:>9.0f} "
                  f"{s_old:>12} {s_new:>5}")  # fmt: skip
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    with open(os.path.join(args.out, "alloc_extend.json"), "w") as f:
        json.dump({"device": device, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
