"""The KV pool's budget under DCP: room kept for the extend pass over a cached prefix.

The bound itself is checked against measured peaks on a GPU by
``benchmark/dcp/extend_memory.py`` (the reserve must not be smaller than DCP's extra)."""

import types

import torch

from sglang_dcp.model_executor.kv_cache import extend_prefix_reserve_bytes, reserve_extend_memory


def runner(dcp_size, chunked_prefill_size=8192, max_prefill_tokens=16384):
    return types.SimpleNamespace(
        server_args=types.SimpleNamespace(
            dcp_size=dcp_size, tp_size=8, chunked_prefill_size=chunked_prefill_size,
            max_prefill_tokens=max_prefill_tokens),
        model_config=types.SimpleNamespace(num_attention_heads=64, head_dim=128, v_head_dim=128),
        dtype=torch.bfloat16,
    )  # fmt: skip


def test_reserve_bound_by_hand():
    # T=8192, Hq=8, D=2, d=dv=128, bf16: gathered queries 32 MiB, prefix partials + LSE and
    # two exchange buffers 3 x 32.5 MiB, four float32 merges with LSE 4 x 32.25 MiB
    assert extend_prefix_reserve_bytes(8192, 8, 128, 128, 2, 2) == (32 + 3 * 32.5 + 4 * 32.25) * 2**20


def test_budget_keeps_the_reserve_for_the_largest_chunk():
    budget = 40 << 30
    assert reserve_extend_memory(budget, runner(1), 0) == budget
    assert budget - reserve_extend_memory(budget, runner(2), 0) == extend_prefix_reserve_bytes(8192, 8, 128, 128, 2, 2)
    # without chunked prefill the largest extend batch is --max-prefill-tokens
    no_chunks = runner(4, chunked_prefill_size=-1)
    assert budget - reserve_extend_memory(budget, no_chunks, 0) == extend_prefix_reserve_bytes(16384, 8, 128, 128, 4, 2)
