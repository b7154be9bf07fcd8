"""Peak GPU memory of one layer's extend attention with a cached prefix: TP against DCP.

SGLang's memory planning keeps ``(1 - mem_fraction_static)`` of the GPU for activations and
sizes the KV pool from the rest; it knows nothing of what DCP's extend path allocates on top:
the gathered query heads ``[T, D*Hq, d]``, the prefix partials for ``D*Hq`` heads, the
exchange buffers and the float32 merges. This measures both on one GPU, one rank's view:

* TP: what SGLang's flashinfer backend runs for a chunk of ``T`` new tokens after a cached
  prefix (a causal ragged pass and a paged pass over the whole prefix, ``Hq`` heads, then
  ``merge_state``);
* DCP: ``FlashInferDCPAttnBackend.forward_extend`` itself (this rank stores prefix tokens
  ``loc % D == 0``), with the group's collectives replaced by local copies of the same sizes
  (the all-gather concatenates ``D`` copies, the all-to-all returns a copy).

For each ``(T, Hq, D)`` it prints the peak above the inputs for both, DCP's extra, and the
reserve that ``--dcp-size`` takes off the KV pool for it (``extend_prefix_reserve_bytes``),
which must not be smaller; results go to ``$OUT/extend_memory.json``.

    python benchmark/dcp/extend_memory.py [--tokens 8192 16384] [--heads 8 16 32] [--dcp 2 4]
"""

import argparse
import json
import os
import types

import torch

from sglang_dcp.model_executor.kv_cache import extend_prefix_reserve_bytes

HEAD_DIM = 128
PREFIX = 32768


def layer(heads: int):
    from sglang.srt.layers.radix_attention import AttentionType

    return types.SimpleNamespace(
        layer_id=0, tp_q_head_num=heads, tp_k_head_num=1, tp_v_head_num=1,
        qk_head_dim=HEAD_DIM, v_head_dim=HEAD_DIM, scaling=HEAD_DIM**-0.5, logit_cap=0.0,
        attn_type=AttentionType.DECODER, k_scale=None, v_scale=None, k_scale_float=None,
        v_scale_float=None,
    )  # fmt: skip


def kv_pool(rows: int):
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    return MHATokenToKVPool(
        rows, page_size=1, dtype=torch.bfloat16, head_num=1, head_dim=HEAD_DIM, layer_num=1,
        device="cuda", enable_memory_saver=False,
    )  # fmt: skip


def peak_bytes(run) -> int:
    """Peak allocated memory above what is allocated before ``run``."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = run()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - base


def tp_extend_peak(tokens: int, heads: int) -> int:
    from flashinfer import (
        BatchPrefillWithPagedKVCacheWrapper,
        BatchPrefillWithRaggedKVCacheWrapper,
        merge_state,
    )

    workspace = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")
    ragged = BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD")
    paged = BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")
    pool = kv_pool(PREFIX + 1)
    qo_indptr = torch.tensor([0, tokens], dtype=torch.int32)
    ragged.plan(qo_indptr, qo_indptr, heads, 1, HEAD_DIM, causal=True, q_data_type=torch.bfloat16)
    paged.plan(
        qo_indptr, torch.tensor([0, PREFIX], dtype=torch.int32),
        torch.arange(1, PREFIX + 1, dtype=torch.int32, device="cuda"), torch.ones(1, dtype=torch.int32),
        heads, 1, HEAD_DIM, 1, causal=False, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
    )  # fmt: skip
    q = torch.randn(tokens, heads, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(tokens, 1, HEAD_DIM, dtype=torch.bfloat16, device="cuda") for _ in "kv")

    def run():
        o1, s1 = ragged.forward_return_lse(q, k, v, causal=True, sm_scale=HEAD_DIM**-0.5)
        o2, s2 = paged.forward_return_lse(q, pool.get_kv_buffer(0), causal=False, sm_scale=HEAD_DIM**-0.5)
        return merge_state(o1, s1, o2, s2)[0]

    run()  # warm-up: kernels loaded before the measured pass
    return peak_bytes(run)


class LocalGroup:
    """A DCP group of ``world_size`` ranks seen from rank 0, its collectives done locally."""

    def __init__(self, world_size: int):
        self.world_size, self.rank_in_group = world_size, 0


def dcp_extend_peak(tokens: int, heads: int, dcp: int) -> int:
    import sglang_dcp.layers.attention.dcp_backend as dcp_backend
    import sglang_dcp.layers.attention.flashinfer_dcp_backend as flashinfer_dcp
    import sglang_dcp.layers.attention.merge as merge
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    dcp_backend.get_dcp_group = lambda: LocalGroup(dcp)
    dcp_backend.all_gather_along_dim = lambda group, x, dim: torch.cat([x] * group.world_size, dim)
    merge.all_to_all_chunks = lambda group, x: x.clone()
    flashinfer_dcp.get_attention_tp_size = lambda: dcp
    seq_len = PREFIX + tokens
    slots = torch.arange(dcp, dcp + seq_len, dtype=torch.int32, device="cuda")  # loc % D == pos % D
    runner = types.SimpleNamespace(
        device="cuda", dtype=torch.bfloat16, kv_cache_dtype=torch.bfloat16, start_layer=0,
        req_to_token_pool=types.SimpleNamespace(req_to_token=slots[None, :]),
        token_to_kv_pool=kv_pool(seq_len // dcp + 2 * dcp),
        model_config=types.SimpleNamespace(
            num_attention_heads=heads * dcp, get_num_kv_heads=lambda tp: 1, head_dim=HEAD_DIM,
            context_len=seq_len),
    )  # fmt: skip
    backend = flashinfer_dcp.FlashInferDCPAttnBackend(runner)
    batch = types.SimpleNamespace(
        forward_mode=ForwardMode.EXTEND, batch_size=1, req_pool_indices=torch.zeros(1, dtype=torch.int64, device="cuda"),
        extend_seq_lens_cpu=[tokens], extend_prefix_lens_cpu=[PREFIX],
        extend_prefix_lens=torch.tensor([PREFIX], dtype=torch.int32, device="cuda"),
        out_cache_loc=slots[PREFIX:].to(torch.int64),
    )  # fmt: skip
    backend.init_forward_metadata(batch)
    attn = layer(heads)
    q = torch.randn(tokens, heads * HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(tokens, HEAD_DIM, dtype=torch.bfloat16, device="cuda") for _ in "kv")
    run = lambda: backend.forward_extend(q, k, v, attn, batch)  # noqa: E731
    run()
    return peak_bytes(run)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--heads", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--dcp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    mib = 1 << 20
    rows = []
    print(f"{'T':>6} {'Hq':>3} {'D':>2} {'TP MiB':>8} {'DCP MiB':>8} {'extra':>8} {'reserve':>8}")
    for tokens in args.tokens:
        for heads in args.heads:
            tp = tp_extend_peak(tokens, heads)
            for dcp in args.dcp:
                peak = dcp_extend_peak(tokens, heads, dcp)
                reserve = extend_prefix_reserve_bytes(tokens, heads, HEAD_DIM, HEAD_DIM, dcp, 2)
                rows.append(dict(tokens=tokens, heads=heads, dcp=dcp, tp_peak=tp, dcp_peak=peak,
                                 extra=peak - tp, reserve=reserve))
                print(f"{tokens:>6} {heads:>3} {dcp:>2} {tp / mib:>8.1f} {peak / mib:>8.1f} "
                      f"{(peak - tp) / mib:>8.1f} {reserve / mib:>8.1f}")
    card = torch.cuda.get_device_name()
    with open(os.path.join(args.out, "extend_memory.json"), "w") as f:
        json.dump({"card": card, "prefix": PREFIX, "head_dim": HEAD_DIM, "rows": rows}, f, indent=1)
    short = [r for r in rows if r["reserve"] < r["extra"]]
    print(f"{card}: reserve >= DCP's extra in {len(rows) - len(short)}/{len(rows)} cases")
    raise SystemExit(1 if short else 0)


if __name__ == "__main__":
    main()
