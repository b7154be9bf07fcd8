"""Peak GPU memory of one layer's extend attention with a cached prefix: TP against DCP.

SGLang's memory planning keeps ``(1 - mem_fraction_static)`` of the GPU for activations and
sizes the KV pool from the rest; it knows nothing of what DCP's extend path allocates on top.
This measures, on one GPU, one rank's view:

* TP: what SGLang's flashinfer backend runs for a chunk of ``T`` new tokens after a cached
  prefix (a causal ragged pass and a paged pass over the whole prefix, ``Hq`` heads, then
  ``merge_state``);
* DCP a2a: ``FlashInferDCPAttnBackend.forward_extend`` itself (this rank stores prefix tokens
  ``loc % D == 0``): the gathered query heads ``[T, D*Hq, d]``, the prefix partials, the
  exchange buffers and the float32 merges;
* DCP lse (``--dcp-comm lse``): the same call for a layer that holds its group's ``D*Hq``
  heads: the partials of all ``D*Hq`` heads, ``merge_states`` and the scaled output in
  float32. Its query input is ``D`` times TP's (the model's ``qkv_proj`` output), so its extra
  over TP also counts those ``(D - 1) * T * Hq * d`` more input elements.

The group's collectives are replaced by local copies of the same sizes (an all-gather
concatenates ``D`` copies, the all-to-all returns a copy). For each ``(T, Hq, D)`` it prints
the peak above the inputs of each, each DCP path's extra over TP, and the reserve that
``--dcp-size`` takes off the KV pool for it (``extend_prefix_reserve_bytes``, a2a and lse),
which must not be smaller; and lse's extra over the a2a reserve (what was kept for lse before
issue 21). Results go to ``$OUT/extend_memory.json``.

    python benchmark/dcp/extend_memory.py [--tokens 8192 16384] [--heads 8 16 32] [--dcp 2 4]
    python benchmark/dcp/extend_memory.py --device cpu --smoke   # the DCP flows on torch_native, tiny sizes, no figures
"""

import argparse
import json
import os
import types

import torch

from sglang_dcp.model_executor.kv_cache import extend_prefix_reserve_bytes

HEAD_DIM = 128
PREFIX = 32768


def layer(heads: int, group_heads: bool):
    from sglang.srt.layers.radix_attention import AttentionType

    return types.SimpleNamespace(
        layer_id=0, tp_q_head_num=heads, tp_k_head_num=1, tp_v_head_num=1,
        qk_head_dim=HEAD_DIM, v_head_dim=HEAD_DIM, scaling=HEAD_DIM**-0.5, logit_cap=0.0,
        attn_type=AttentionType.DECODER, k_scale=None, v_scale=None, k_scale_float=None,
        v_scale_float=None, dcp_group_heads=group_heads,
    )  # fmt: skip


def kv_pool(rows: int, device: str):
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    return MHATokenToKVPool(
        rows, page_size=1, dtype=torch.bfloat16, head_num=1, head_dim=HEAD_DIM, layer_num=1,
        device=device, enable_memory_saver=False,
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


def tp_extend(tokens: int, heads: int, prefix: int):
    """SGLang's TP extend pass (flashinfer), ready to run: returns ``run``."""
    from flashinfer import (
        BatchPrefillWithPagedKVCacheWrapper,
        BatchPrefillWithRaggedKVCacheWrapper,
        merge_state,
    )

    workspace = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")
    ragged = BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD")
    paged = BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")
    pool = kv_pool(prefix + 1, "cuda")
    qo_indptr = torch.tensor([0, tokens], dtype=torch.int32)
    ragged.plan(qo_indptr, qo_indptr, heads, 1, HEAD_DIM, causal=True, q_data_type=torch.bfloat16)
    paged.plan(
        qo_indptr, torch.tensor([0, prefix], dtype=torch.int32),
        torch.arange(1, prefix + 1, dtype=torch.int32, device="cuda"), torch.ones(1, dtype=torch.int32),
        heads, 1, HEAD_DIM, 1, causal=False, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
    )  # fmt: skip
    q = torch.randn(tokens, heads, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(tokens, 1, HEAD_DIM, dtype=torch.bfloat16, device="cuda") for _ in "kv")

    def run():
        o1, s1 = ragged.forward_return_lse(q, k, v, causal=True, sm_scale=HEAD_DIM**-0.5)
        o2, s2 = paged.forward_return_lse(q, pool.get_kv_buffer(0), causal=False, sm_scale=HEAD_DIM**-0.5)
        return merge_state(o1, s1, o2, s2)[0]

    return run


class LocalGroup:
    """A DCP group of ``world_size`` ranks seen from rank 0, its collectives done locally."""

    def __init__(self, world_size: int):
        self.world_size, self.rank_in_group = world_size, 0


def dcp_extend(tokens: int, heads: int, dcp: int, group_heads: bool, prefix: int, device: str):
    """DCP's ``forward_extend`` (a2a, or lse with ``group_heads``) on rank 0 of a local group,
    ready to run: returns ``run`` (flashinfer on CUDA, torch_native on CPU)."""
    import sglang_dcp.layers.attention.dcp_backend as dcp_backend
    import sglang_dcp.layers.attention.merge as merge
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    def local_all_gather(group, x, dim):
        return torch.cat([x] * group.world_size, dim)

    dcp_backend.get_dcp_group = lambda: LocalGroup(dcp)
    dcp_backend.all_gather_along_dim = merge.all_gather_along_dim = local_all_gather
    merge.all_to_all_chunks = lambda group, x: x.clone()
    if device == "cuda":
        import sglang_dcp.layers.attention.flashinfer_dcp_backend as flashinfer_dcp

        flashinfer_dcp.get_attention_tp_size = lambda: dcp
        backend_class = flashinfer_dcp.FlashInferDCPAttnBackend
    else:
        from sglang_dcp.layers.attention.torch_native_dcp_backend import TorchNativeDCPAttnBackend

        backend_class = TorchNativeDCPAttnBackend
    seq_len = prefix + tokens
    slots = torch.arange(dcp, dcp + seq_len, dtype=torch.int32, device=device)  # loc % D == pos % D
    runner = types.SimpleNamespace(
        device=device, dtype=torch.bfloat16, kv_cache_dtype=torch.bfloat16, start_layer=0,
        req_to_token_pool=types.SimpleNamespace(req_to_token=slots[None, :]),
        token_to_kv_pool=kv_pool(seq_len // dcp + 2 * dcp, device),
        model_config=types.SimpleNamespace(
            num_attention_heads=heads * dcp, get_num_kv_heads=lambda tp: 1, head_dim=HEAD_DIM,
            context_len=seq_len),
    )  # fmt: skip
    backend = backend_class(runner)
    batch = types.SimpleNamespace(
        forward_mode=ForwardMode.EXTEND, batch_size=1, req_pool_indices=torch.zeros(1, dtype=torch.int64, device=device),
        extend_seq_lens_cpu=[tokens], extend_prefix_lens_cpu=[prefix],
        extend_prefix_lens=torch.tensor([prefix], dtype=torch.int32, device=device),
        out_cache_loc=slots[prefix:].to(torch.int64),
    )  # fmt: skip
    backend.init_forward_metadata(batch)
    attn = layer(heads * dcp if group_heads else heads, group_heads)
    q = torch.randn(tokens, attn.tp_q_head_num * HEAD_DIM, dtype=torch.bfloat16, device=device)
    # [T, Hkv, d], as RadixAttention hands them to the backend
    k, v = (torch.randn(tokens, 1, HEAD_DIM, dtype=torch.bfloat16, device=device) for _ in "kv")
    return lambda: backend.forward_extend(q, k, v, attn, batch)


def smoke():
    """Both DCP paths on CPU (torch_native), tiny sizes: they run and return one row per token
    of ``Hq`` (a2a) or ``D*Hq`` (lse) heads."""
    tokens, heads, dcp = 16, 2, 2
    for group_heads in (False, True):
        out = dcp_extend(tokens, heads, dcp, group_heads, prefix=64, device="cpu")()
        expected = (tokens, heads * (dcp if group_heads else 1) * HEAD_DIM)
        assert tuple(out.shape) == expected, (group_heads, out.shape)
        print(f"smoke: {'lse' if group_heads else 'a2a'} extend ran, output {tuple(out.shape)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--heads", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--dcp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="CPU: run the DCP flows only")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if args.smoke:
        return smoke()
    mib = 1 << 20
    rows = []
    print(f"{'T':>6} {'Hq':>3} {'D':>2} {'TP MiB':>7} | {'a2a':>7} {'extra':>7} {'reserve':>7} | "
          f"{'lse':>7} {'extra':>7} {'reserve':>7} {'extra/a2a reserve':>17}")  # fmt: skip
    for tokens in args.tokens:
        for heads in args.heads:
            tp = peak_bytes(warm(tp_extend(tokens, heads, PREFIX)))
            for dcp in args.dcp:
                a2a = peak_bytes(warm(dcp_extend(tokens, heads, dcp, False, PREFIX, "cuda")))
                lse = peak_bytes(warm(dcp_extend(tokens, heads, dcp, True, PREFIX, "cuda")))
                wider_input = (dcp - 1) * tokens * heads * HEAD_DIM * 2
                row = dict(
                    tokens=tokens, heads=heads, dcp=dcp, tp_peak=tp,
                    a2a_peak=a2a, a2a_extra=a2a - tp,
                    a2a_reserve=extend_prefix_reserve_bytes(tokens, heads, HEAD_DIM, HEAD_DIM, dcp, 2),
                    lse_peak=lse, lse_extra=lse + wider_input - tp,
                    lse_reserve=extend_prefix_reserve_bytes(tokens, heads, HEAD_DIM, HEAD_DIM, dcp, 2, True),
                )  # fmt: skip
                rows.append(row)
                print(f"{tokens:>6} {heads:>3} {dcp:>2} {tp / mib:>7.1f} | {a2a / mib:>7.1f} "
                      f"{row['a2a_extra'] / mib:>7.1f} {row['a2a_reserve'] / mib:>7.1f} | {lse / mib:>7.1f} "
                      f"{row['lse_extra'] / mib:>7.1f} {row['lse_reserve'] / mib:>7.1f} "
                      f"{row['lse_extra'] / row['a2a_reserve']:>17.2f}")  # fmt: skip
    card = torch.cuda.get_device_name()
    with open(os.path.join(args.out, "extend_memory.json"), "w") as f:
        json.dump({"card": card, "prefix": PREFIX, "head_dim": HEAD_DIM, "rows": rows}, f, indent=1)
    short = [r for r in rows if r["a2a_reserve"] < r["a2a_extra"] or r["lse_reserve"] < r["lse_extra"]]
    print(f"{card}: each reserve >= its path's extra in {len(rows) - len(short)}/{len(rows)} cases")
    raise SystemExit(1 if short else 0)


def warm(run):
    """``run`` after one call (kernels loaded before the measured pass)."""
    run()
    return run


if __name__ == "__main__":
    main()
