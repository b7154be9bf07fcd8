"""LSE merging and the PyTorch partial-attention kernel against float64 references."""

import math

import pytest
import torch

from sglang_dcp.layers.attention.merge import (
    PartialLayout,
    lse_weights,
    merge_packed_torch,
    merge_states,
    pack_by_owner_torch,
    scale_by_lse_torch,
    to_base2,
)
from sglang_dcp.layers.attention.torch_native_dcp_backend import attention_with_lse

BASES = [2.0, math.e]


def reference_attention(q, k, v, scale, causal):
    """float64 softmax attention with natural-log LSE; q [Tq,H,d], k/v [Tk,Hkv,d]."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal:
        s.masked_fill_(torch.ones(s.shape[1:], dtype=torch.bool).triu(1), -math.inf)
    lse = torch.logsumexp(s, -1)
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v), lse.T


def in_base(lse_e, base):
    """A natural-log LSE expressed in ``base`` (FlashInfer reports base 2)."""
    return lse_e if base == math.e else lse_e * math.log2(math.e)


def random_partials(num_parts, tokens, heads, dim, empty=()):
    """Partial (o, natural-log lse) over disjoint key shards of one random problem."""
    q = torch.randn(tokens, heads, dim)
    keys_per_part = [0 if i in empty else int(n) for i, n in enumerate(torch.randint(1, 9, (num_parts,)))]
    k = torch.randn(sum(keys_per_part), 1, dim)
    v = torch.randn(sum(keys_per_part), 1, dim)
    full = reference_attention(q, k, v, 0.3, causal=False)
    parts = [
        attention_with_lse(q, ks, vs, 0.3, causal=False)
        for ks, vs in zip(k.split(keys_per_part), v.split(keys_per_part))
    ]
    return parts, full


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (8, 2), (3, 3)])
def test_attention_with_lse_matches_float64(causal, heads, kv_heads):
    tokens = 13
    q, k, v = torch.randn(tokens, heads, 32), torch.randn(tokens, kv_heads, 32), torch.randn(tokens, kv_heads, 32)
    o, lse = attention_with_lse(q, k, v, 0.2, causal)
    o_ref, lse_ref = reference_attention(q, k, v, 0.2, causal)
    assert (o.double() - o_ref).norm() / o_ref.norm() < 1e-6
    assert torch.allclose(lse.double(), lse_ref, atol=1e-5)


def test_attention_with_no_keys_is_empty_state():
    o, lse = attention_with_lse(torch.randn(3, 4, 8), torch.randn(0, 1, 8), torch.randn(0, 1, 8), 1.0, False)
    assert torch.all(o == 0) and torch.all(lse == -math.inf)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("num_parts,empty", [(2, ()), (4, ()), (4, (1, 3)), (3, (0,))])
def test_merge_states_equals_full_attention(base, num_parts, empty):
    torch.manual_seed(num_parts + len(empty))
    parts, (o_ref, lse_ref) = random_partials(num_parts, tokens=5, heads=6, dim=16, empty=empty)
    o, lse = merge_states([o for o, _ in parts], [in_base(lse, base) for _, lse in parts], base)
    assert (o.double() - o_ref).norm() / o_ref.norm() < 1e-6
    assert torch.allclose(lse.double(), in_base(lse_ref, base), atol=1e-5)


def exchange(buffers, owner):
    """What ``all_to_all_chunks`` hands rank ``owner``: chunk ``owner`` of every rank's buffer."""
    return torch.stack([buf[owner] for buf in buffers])


@pytest.mark.parametrize("base", BASES)
def test_packed_partials_merge_to_full_attention(base):
    """Each rank packs its partials of all gathered heads; after the exchange every owner
    merges its own heads into full attention (the ``dcp_merge`` steps without a group)."""
    torch.manual_seed(7)
    num_ranks, heads_per_rank = 4, 2
    parts, (o_ref, lse_ref) = random_partials(num_ranks, tokens=3, heads=num_ranks * heads_per_rank, dim=16, empty=(2,))
    layout = PartialLayout(3, heads_per_rank, 16, torch.float32)
    buffers = [pack_by_owner_torch(o, to_base2(in_base(lse, base), base), layout, num_ranks) for o, lse in parts]
    for owner in range(num_ranks):
        own = slice(owner * heads_per_rank, (owner + 1) * heads_per_rank)
        o, lse2 = merge_packed_torch(exchange(buffers, owner), layout, torch.float64)
        assert o.dtype == torch.float64
        assert (o - o_ref[:, own]).norm() / o_ref[:, own].norm() < 1e-6
        assert torch.allclose(lse2.double(), in_base(lse_ref[:, own], 2.0), atol=1e-5)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("num_ranks,empty", [(2, ()), (4, (2,)), (3, (0, 1))])
def test_lse_scaled_o_proj_equals_merged_o_proj(base, num_ranks, empty):
    """``--dcp-comm lse`` against ``a2a`` and float64 full attention: every rank's partials
    of all ``D*Hq`` heads, scaled by ``b^(lse_r - lse)`` and put through ``o_proj`` over the
    group's columns, summed over the ranks, equal the merged own heads of each rank through
    its own columns, summed (the TP all-reduce). Empty shards hold NaN garbage."""
    torch.manual_seed(num_ranks + len(empty))
    tokens, heads_per_rank, dv, hidden = 5, 2, 16, 24
    heads = num_ranks * heads_per_rank
    parts, (o_ref, _) = random_partials(num_ranks, tokens, heads, dv, empty=empty)
    parts = [(o.fill_(float("nan")) if i in empty else o, lse) for i, (o, lse) in enumerate(parts)]
    w_o = torch.randn(hidden, heads * dv, dtype=torch.float64)

    def o_proj(o, first_head=0):
        cols = slice(first_head * dv, first_head * dv + o.shape[1] * dv)
        return o.reshape(tokens, -1).double() @ w_o[:, cols].T

    lse2_all = torch.stack([to_base2(in_base(lse, base), base) for _, lse in parts])
    layout = PartialLayout(tokens, heads_per_rank, dv, torch.float32)
    buffers = [pack_by_owner_torch(o, lse2, layout, num_ranks) for (o, _), lse2 in zip(parts, lse2_all)]
    a2a = sum(
        o_proj(merge_packed_torch(exchange(buffers, r), layout, torch.float64)[0], r * heads_per_rank)
        for r in range(num_ranks)
    )
    lse = sum(o_proj(scale_by_lse_torch(o, lse2_all, r, torch.float64)) for r, (o, _) in enumerate(parts))
    full = o_proj(o_ref)
    assert (a2a - full).norm() / full.norm() < 1e-6
    assert (lse - full).norm() / full.norm() < 1e-6
    assert (lse - a2a).norm() / full.norm() < 1e-6


def test_lse_scaling_of_all_empty_shards_is_zero():
    lse2_all = torch.randn(3, 4, 2)
    lse2_all[:, 1] = -math.inf  # token 1: every shard empty
    lse2_all[1, 2] = -math.inf  # token 2: rank 1 empty
    o = torch.full((4, 2, 8), float("nan"))
    o[0] = 1.0
    for rank in range(3):
        scaled = scale_by_lse_torch(o if rank == 1 else o.nan_to_num(), lse2_all, rank, torch.float32)
        assert torch.all(scaled[1] == 0) and not torch.isnan(scaled[:3]).any()
    assert torch.all(scale_by_lse_torch(o, lse2_all, 1, torch.float32)[2] == 0)


def test_partial_layout_views_share_the_buffer():
    layout = PartialLayout(tokens=3, heads=2, head_dim=8, o_dtype=torch.bfloat16)
    buf = layout.new_buffer(4, "cpu")
    assert buf.shape == (4, 3 * 2 * 8 * 2 + 3 * 2 * 4)
    o, lse = layout.views(buf)
    assert o.shape == (4, 3, 2, 8) and lse.shape == (4, 3, 2)
    o.fill_(1.0)
    lse.fill_(-math.inf)
    assert torch.all(layout.views(buf)[0] == 1.0) and torch.all(layout.views(buf)[1] == -math.inf)


def test_all_empty_shards_give_zero_weights_and_minus_inf():
    lse2 = torch.full((3, 2, 4), -math.inf)
    weights, merged = lse_weights(lse2)
    assert torch.all(weights == 0) and torch.all(merged == -math.inf)
    assert not torch.isnan(weights).any()


def test_garbage_in_an_empty_shard_does_not_leak():
    o = torch.randn(2, 4, 4)
    garbage = torch.full((2, 4, 4), float("nan"))
    lse = torch.randn(2, 4)
    merged, merged_lse = merge_states([o, garbage], [lse, torch.full((2, 4), -math.inf)], 2.0)
    assert torch.equal(merged, o) and torch.equal(merged_lse, lse)


def test_weights_are_exact_for_large_lse_gaps():
    lse2 = torch.tensor([[[1000.0]], [[-1000.0]], [[-math.inf]]])
    weights, merged = lse_weights(lse2)
    assert weights[0].item() == 1.0 and weights[1].item() == 0.0 and weights[2].item() == 0.0
    assert merged.item() == 1000.0
