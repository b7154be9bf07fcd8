"""The KV pool's budget under DCP: room kept for the extend pass over a cached prefix.

The bounds themselves (a2a and lse) are checked against measured peaks on a GPU by
``benchmark/dcp/extend_memory.py`` (each reserve must not be smaller than DCP's extra)."""

import types

import torch

from sglang_dcp.model_executor.kv_cache import extend_prefix_reserve_bytes, reserve_extend_memory

CONTEXT_LEN = 131072


def runner(dcp_size, chunked_prefill_size=8192, max_prefill_tokens=16384, dcp_comm="a2a",
           group_heads=False, **speculative):
    """A model of 64 query heads (8 per rank at tp 8), one attention layer, which holds its
    group's heads if ``group_heads`` (what ``--dcp-comm lse`` does at load); ``speculative``
    sets the speculative server arguments (default: none)."""
    speculative = {"speculative_algorithm": None, **speculative}
    from sglang.srt.layers.radix_attention import RadixAttention

    attention = torch.nn.Module()
    attention.attn = RadixAttention(8 * (dcp_size if group_heads else 1), 128, 1.0, 1, layer_id=0)
    attention.attn.dcp_group_heads = group_heads
    return types.SimpleNamespace(
        server_args=types.SimpleNamespace(
            dcp_size=dcp_size, dcp_comm=dcp_comm, tp_size=8, chunked_prefill_size=chunked_prefill_size,
            max_prefill_tokens=max_prefill_tokens, **speculative),
        model_config=types.SimpleNamespace(num_attention_heads=64, head_dim=128, v_head_dim=128,
                                           context_len=CONTEXT_LEN),
        model=torch.nn.ModuleDict({"layer": attention}),
        dtype=torch.bfloat16,
    )  # fmt: skip


def test_reserve_bound_by_hand():
    # T=8192, Hq=8, D=2, d=dv=128, bf16: gathered queries 32 MiB, prefix partials + LSE and
    # two exchange buffers 3 x 32.5 MiB, four float32 merges with LSE 4 x 32.25 MiB
    assert extend_prefix_reserve_bytes(8192, 8, 128, 128, 2, 2) == (32 + 3 * 32.5 + 4 * 32.25) * 2**20


def test_lse_reserve_bound_by_hand():
    # T=8192, G=D*Hq=16, d=dv=128, bf16, every [T, G, 128] bf16 buffer 32 MiB: the queries, two
    # partials and the output 4 x 32 MiB; four float32 [T, G, 128] 4 x 64 MiB; 12 + D float32
    # LSEs [T, G] of 0.5 MiB
    assert extend_prefix_reserve_bytes(8192, 8, 128, 128, 2, 2, group_heads=True) == (
        4 * 32 + 4 * 64 + 14 * 0.5) * 2**20  # fmt: skip


def test_budget_keeps_the_reserve_for_the_largest_chunk():
    budget = 40 << 30
    assert reserve_extend_memory(budget, runner(1), 0) == budget
    assert budget - reserve_extend_memory(budget, runner(2), 0) == extend_prefix_reserve_bytes(8192, 8, 128, 128, 2, 2)


def test_budget_with_group_heads_keeps_the_lse_reserve():
    budget = 40 << 30
    lse = runner(2, dcp_comm="lse", group_heads=True)
    assert budget - reserve_extend_memory(budget, lse, 0) == extend_prefix_reserve_bytes(
        8192, 8, 128, 128, 2, 2, group_heads=True)  # fmt: skip
    # --dcp-comm lse whose model fell back to a2a (its layers hold their own heads only)
    fallback = runner(2, dcp_comm="lse")
    assert budget - reserve_extend_memory(budget, fallback, 0) == extend_prefix_reserve_bytes(8192, 8, 128, 128, 2, 2)


def test_budget_without_chunked_prefill_is_sized_by_the_context():
    """Without chunked prefill SGLang admits a first request of up to the context length into
    an extend batch, however small --max-prefill-tokens is."""
    budget = 400 << 30
    for comm, group_heads in (("a2a", False), ("lse", True)):
        no_chunks = runner(4, chunked_prefill_size=-1, dcp_comm=comm, group_heads=group_heads)
        assert budget - reserve_extend_memory(budget, no_chunks, 0) == extend_prefix_reserve_bytes(
            CONTEXT_LEN, 8, 128, 128, 4, 2, group_heads)  # fmt: skip
    longer_budget = runner(4, chunked_prefill_size=-1, max_prefill_tokens=2 * CONTEXT_LEN)
    assert budget - reserve_extend_memory(budget, longer_budget, 0) == extend_prefix_reserve_bytes(
        2 * CONTEXT_LEN, 8, 128, 128, 4, 2)  # fmt: skip


def test_budget_with_speculation_covers_the_largest_verify():
    """A verify pass extends every running request by its draft tokens (a draft extend by at
    most ``steps + 1``): with many requests that is more than a chunk."""
    budget = 400 << 30

    def reserve(**speculative):
        return budget - reserve_extend_memory(budget, runner(2, **speculative), 0)

    eagle = dict(speculative_algorithm="EAGLE", speculative_num_steps=3, speculative_num_draft_tokens=8)
    assert reserve(**eagle, max_running_requests=48) == extend_prefix_reserve_bytes(8192, 8, 128, 128, 2, 2)
    assert reserve(**eagle, max_running_requests=2048) == extend_prefix_reserve_bytes(
        2048 * 8, 8, 128, 128, 2, 2)  # fmt: skip
    chain = dict(speculative_algorithm="EAGLE", speculative_num_steps=5, speculative_num_draft_tokens=2)
    assert reserve(**chain, max_running_requests=2048) == extend_prefix_reserve_bytes(
        2048 * 6, 8, 128, 128, 2, 2)  # fmt: skip
    ngram = dict(speculative_algorithm="NGRAM", speculative_num_steps=None, speculative_num_draft_tokens=16)
    assert reserve(**ngram, max_running_requests=1024) == extend_prefix_reserve_bytes(
        1024 * 16, 8, 128, 128, 2, 2)  # fmt: skip
