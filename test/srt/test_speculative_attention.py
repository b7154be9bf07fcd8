"""The DCP backend's speculative passes and KV moves against float64 references, on gloo
with 2 and 4 processes (CPU, ``TorchNativeDCPAttnBackend``), without an engine.

Every rank builds the same problem (seeded): logical slots of a few requests, K/V of their
committed tokens written to the rank that owns each slot, queries and new K/V. Then:

* target verify: draft tokens forming a tree (SGLang's flattened ``[N, L + N]`` mask per
  request) must get full attention over the committed prefix and the draft tokens their mask
  shows, with both ``--dcp-comm`` paths (a2a: this rank's heads; lse: the group's heads, whose
  scaled partials sum over the ranks), and each draft token's K/V must land on its owner;
* draft decode: ``DCPMultiStepDraftBackend`` over ``topk`` branches, step after step, with the
  branch slots laid out as SGLang lays them out for page size 1 and for a logical page > 1;
  query ``(b, t)`` of step ``s`` must see request ``b``'s prefix and the branch's steps 0..s;
* KV moves (``move_kv_in_group``) between slots of one owner and of two, one move's source
  being another's target: every rank's rows must equal a logical pool's after the same moves,
  and a rank-local copy of physical rows (what SGLang's pool does) must not.
"""

import math
import types

import pytest
import torch

from sglang_dcp.test.gloo_group import run_in_dcp_groups
from sglang_dcp.test.speculative_cpu.drafts import ancestor_mask

HQ, HKV, DIM = 2, 1, 16  # query heads per rank, KV heads, head dim
SCALE = 0.3
TOL = 1e-5


def reference(q, k, v, visible):
    """float64 attention of ``q [Tq, H, d]`` over ``k, v [Tk, Hkv, d]`` where ``visible [Tq, Tk]``."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * SCALE
    s = s.masked_fill(~visible, -math.inf)
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)


class Problem:
    """Requests with logical slots (request ``b`` at base ``(b + 1) * stride``, a multiple of
    D: ``loc % D == position % D`` as the allocator keeps it), their committed K/V in a
    logical table, and this rank's pool of the slots it owns."""

    def __init__(self, seq_lens, dcp, rank, gen, stride=64, layers=1, v_dim=DIM):
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

        self.dcp, self.rank, self.seq_lens = dcp, rank, seq_lens
        self.req_to_token = torch.zeros((len(seq_lens) + 1, stride), dtype=torch.int32)
        for b in range(len(seq_lens)):
            self.req_to_token[b] = (b + 1) * stride + torch.arange(stride, dtype=torch.int32)
        num_slots = (len(seq_lens) + 2) * stride
        self.k = torch.randn(layers, num_slots, HKV, DIM, generator=gen)  # logical K/V
        self.v = torch.randn(layers, num_slots, HKV, v_dim, generator=gen)
        self.pool = MHATokenToKVPool(
            num_slots // dcp, page_size=1, dtype=torch.float32, head_num=HKV, head_dim=DIM,
            layer_num=layers, device="cpu", enable_memory_saver=False, v_head_dim=v_dim,
        )
        for b, n in enumerate(seq_lens):
            self.store(self.req_to_token[b, :n].long())

    def store(self, slots):
        """Write the logical K/V of ``slots`` to this rank's pool where it owns them."""
        mine = slots[slots % self.dcp == self.rank]
        for layer in range(self.k.shape[0]):
            self.pool.k_buffer[layer][mine // self.dcp] = self.k[layer, mine]
            self.pool.v_buffer[layer][mine // self.dcp] = self.v[layer, mine]

    def runner(self):
        return types.SimpleNamespace(
            device="cpu", req_to_token_pool=types.SimpleNamespace(req_to_token=self.req_to_token),
            token_to_kv_pool=self.pool, kv_cache_dtype=torch.float32, dtype=torch.float32,
            start_layer=0, model_config=types.SimpleNamespace(context_len=4096),
        )

    def batch(self, mode, **fields):
        bs = len(self.seq_lens)
        seq_lens = torch.tensor(self.seq_lens)
        return types.SimpleNamespace(
            forward_mode=mode, batch_size=bs, seq_lens=seq_lens, seq_lens_cpu=seq_lens,
            req_pool_indices=torch.arange(bs), **fields,
        )


def layer_for(dcp, group_heads):
    from sglang.srt.layers.radix_attention import RadixAttention

    layer = RadixAttention(HQ * dcp if group_heads else HQ, DIM, SCALE, HKV, layer_id=0)
    layer.dcp_group_heads = group_heads
    return layer


def check_heads(out, q_all, keys, values, visible, group, group_heads):
    """Compare a backend output with the reference for this rank's heads (a2a) or, summed over
    the group, for all the group's heads (lse)."""
    r = group.rank_in_group
    ref = reference(q_all, keys, values, visible)
    if group_heads:
        torch.distributed.all_reduce(out, group=group.device_group)
    else:
        ref = ref[:, r * HQ : (r + 1) * HQ]
    err = (out.view(ref.shape).double() - ref).abs().max().item()
    assert err < TOL, err


def verify_case(dcp, group, gen, group_heads):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_dcp.layers.attention.torch_native_dcp_backend import TorchNativeDCPAttnBackend

    r = group.rank_in_group
    trees = [[-1, 0, 0, 1], [-1, 0, 1, 2], [-1, 0, 0, 0]]  # a tree, a chain, a fan
    seq_lens = [7, 12, 1]
    n = len(trees[0])
    problem = Problem(seq_lens, dcp, r, gen)
    masks = [ancestor_mask(t) for t in trees]
    custom_mask = torch.cat([
        torch.cat([torch.ones(n, length, dtype=torch.bool), m], dim=1).flatten()
        for length, m in zip(seq_lens, masks)
    ])
    out_cache_loc = torch.cat([problem.req_to_token[b, L : L + n] for b, L in enumerate(seq_lens)]).long()
    spec_info = types.SimpleNamespace(draft_token_num=n, custom_mask=custom_mask)
    fb = problem.batch(ForwardMode.TARGET_VERIFY, out_cache_loc=out_cache_loc, spec_info=spec_info,
                       extend_prefix_lens_cpu=None, extend_seq_lens_cpu=None)
    tokens = len(seq_lens) * n
    q_all = torch.randn(tokens, HQ * dcp, DIM, generator=gen)
    k_new = problem.k[0, out_cache_loc]
    v_new = problem.v[0, out_cache_loc]

    backend = TorchNativeDCPAttnBackend(problem.runner())
    backend.init_forward_metadata(fb)
    layer = layer_for(dcp, group_heads)
    q = q_all if group_heads else q_all[:, r * HQ : (r + 1) * HQ]
    out = backend.forward_extend(q.reshape(tokens, -1), k_new.clone(), v_new.clone(), layer, fb)

    for b, (length, mask) in enumerate(zip(seq_lens, masks)):
        slots = problem.req_to_token[b, : length + n].long()
        visible = torch.cat([torch.ones(n, length, dtype=torch.bool), mask], dim=1)
        rows = slice(b * n, (b + 1) * n)
        check_heads(out[rows].contiguous(), q_all[rows], problem.k[0, slots], problem.v[0, slots],
                    visible, group, group_heads)
    # each draft token's K/V on its owner
    mine = out_cache_loc % dcp == r
    assert torch.equal(problem.pool.k_buffer[0][out_cache_loc[mine] // dcp], k_new[mine])


def branch_slots(problem, topk, steps, page):
    """``[B, topk, steps]`` slots of the draft branches, as ``prepare_for_draft`` assigns them:
    contiguous after the prefix (page 1), or one page-aligned region per branch (page > 1)."""
    rows = []
    for b, length in enumerate(problem.seq_lens):
        t = torch.arange(topk).view(topk, 1)
        s = torch.arange(steps).view(1, steps)
        if page == 1:
            pos = length + t * steps + s
        else:
            last = length % page
            pages = (last + steps + page - 1) // page
            pos = length - last + t * pages * page + last + s
        rows.append(problem.req_to_token[b, pos].long())
    return torch.stack(rows)


def draft_decode_case(dcp, group, gen, group_heads, page):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_dcp.layers.attention.dcp_backend import DCPMultiStepDraftBackend
    from sglang_dcp.layers.attention.torch_native_dcp_backend import TorchNativeDCPAttnBackend

    r = group.rank_in_group
    topk, steps = 3, 4
    seq_lens = [5, 9]
    problem = Problem(seq_lens, dcp, r, gen, stride=128)
    slots = branch_slots(problem, topk, steps, page * dcp)
    draft = DCPMultiStepDraftBackend(lambda: TorchNativeDCPAttnBackend(problem.runner()), topk, steps)
    fb = problem.batch(ForwardMode.DECODE, out_cache_loc=slots.reshape(-1), spec_info=None)
    draft.init_forward_metadata(fb)
    layer = layer_for(dcp, group_heads)
    for step, backend in enumerate(draft.attn_backends):
        fb.out_cache_loc = slots[:, :, step].reshape(-1)
        q_all = torch.randn(len(seq_lens) * topk, HQ * dcp, DIM, generator=gen)
        q = q_all if group_heads else q_all[:, r * HQ : (r + 1) * HQ]
        k_new, v_new = problem.k[0, fb.out_cache_loc], problem.v[0, fb.out_cache_loc]
        out = backend.forward_decode(q.reshape(q.shape[0], -1), k_new.clone(), v_new.clone(), layer, fb)
        for b, length in enumerate(seq_lens):
            for t in range(topk):
                query = b * topk + t
                keys = torch.cat([problem.req_to_token[b, :length].long(), slots[b, t, : step + 1]])
                visible = torch.ones(1, keys.numel(), dtype=torch.bool)
                check_heads(out[query : query + 1].contiguous(), q_all[query : query + 1],
                            problem.k[0, keys], problem.v[0, keys], visible, group, group_heads)


def kv_move_case(dcp, group, gen):
    from sglang_dcp.mem_cache.kv_move import move_kv_in_group

    r = group.rank_in_group
    problem = Problem([40], dcp, r, gen, layers=2, v_dim=DIM // 2)  # V rows smaller than K rows
    base = int(problem.req_to_token[0, 0])
    # tree nodes -> path positions (crossing ranks), a same-owner move, and a chain: the
    # source of the second move is the target of the third (moves are simultaneous)
    src = base + torch.tensor([20, 23, 22, 31, 30])
    tgt = base + torch.tensor([21, 22, 22 + 2 * dcp, 30 + dcp, 33])
    expected_k, expected_v = problem.k.clone(), problem.v.clone()
    expected_k[:, tgt], expected_v[:, tgt] = problem.k[:, src], problem.v[:, src]
    naive = [b.clone() for b in problem.pool.k_buffer]
    for buf in naive:  # what a rank-local copy of physical rows does
        buf[tgt // dcp] = buf[src // dcp]

    move_kv_in_group(problem.pool, tgt, src, group)
    mine = torch.arange(base, base + 40)
    mine = mine[mine % dcp == r]
    for layer in range(2):
        assert torch.equal(problem.pool.k_buffer[layer][mine // dcp], expected_k[layer, mine])
        assert torch.equal(problem.pool.v_buffer[layer][mine // dcp], expected_v[layer, mine])
    wrong = [not torch.equal(naive[0][mine // dcp], expected_k[0, mine])]
    torch.distributed.all_reduce(t := torch.tensor(wrong, dtype=torch.int32), group=group.cpu_group)
    assert int(t) > 0, "the moves should include one that a rank-local copy gets wrong"


def worker(rank, group, dcp):
    gen = torch.Generator().manual_seed(0)  # the same problem on every rank
    for group_heads in (False, True):
        verify_case(dcp, group, gen, group_heads)
        for page in (1, 2):
            draft_decode_case(dcp, group, gen, group_heads, page)
    kv_move_case(dcp, group, gen)


@pytest.mark.parametrize("dcp", [2, 4])
def test_speculative_passes_on_gloo(dcp):
    run_in_dcp_groups(worker, dcp, dcp, dcp)
