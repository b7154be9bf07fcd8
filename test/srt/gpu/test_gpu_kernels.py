"""CUDA kernels of the DCP path against float64 references (skipped without a GPU).

The D ranks of a DCP group are simulated in one process: each rank's KV pool holds the
tokens it owns (slot ``loc`` -> rank ``loc % D``, row ``loc // D``), FlashInfer computes
its partial result over them with the gathered heads, ``pack_by_owner_triton`` packs it
by owner, the exchange of ``all_to_all_chunks`` is done by indexing, and each owner's
``merge_packed_triton`` must give full attention for its heads. Outputs are poisoned with
NaN through the caching allocator beforehand, so an element a kernel fails to write shows
up as NaN.

Without a GPU, the three Triton-only tests also run on CPU under Triton's interpreter
(``TRITON_INTERPRET=1``, as ``test_triton_interpreter.py`` runs them; no NaN poisoning there).
"""

import math
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRETED = not CUDA and os.environ.get("TRITON_INTERPRET") == "1"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_triton = pytest.mark.skipif(not (CUDA or INTERPRETED), reason="needs a CUDA GPU or TRITON_INTERPRET=1")
pytestmark = pytest.mark.gpu

HEAD_DIM = 128
BF16_REL_TOL = 2e-2  # bf16 inputs and outputs, fp32 accumulation


def poison_cuda_cache(num_bytes: int = 1 << 30) -> None:
    """Leave NaN in freed caching-allocator blocks, so later ``torch.empty`` sees NaN."""
    if CUDA:  # the block returns to the cache as soon as the tensor is dropped
        torch.full((num_bytes // 4,), float("nan"), device=DEVICE)


def rel_err(x, ref) -> float:
    assert not torch.isnan(x).any(), "unwritten (NaN-poisoned) output"
    return ((x.double() - ref).norm() / ref.norm()).item()


def reference(q, k, v, scale, q_pos=None):
    """float64 attention of ``q [Tq, H, d]`` over ``k, v [Tk, 1, d]``; query ``i`` sees keys
    ``<= q_pos[i]`` if given. Returns ``o [Tq, H, d]`` and base-2 ``lse [Tq, H]``."""
    s = torch.einsum("qhd,kd->hqk", q.double(), k[:, 0].double()) * scale
    if q_pos is not None:
        future = torch.arange(k.shape[0], device=q.device)[None, :] > q_pos[:, None]
        s = s.masked_fill(future, -math.inf)
    lse = torch.logsumexp(s, -1)
    o = torch.einsum("hqk,kd->qhd", torch.softmax(s, -1), v[:, 0].double())
    return o, (lse / math.log(2)).T


class ShardedKV:
    """Logical slots for a batch (request ``b`` at base ``(b + 1) * stride``, a multiple of
    D, so ``loc % D == pos % D``) and each rank's pool of the tokens it owns."""

    def __init__(self, seq_lens, dcp, k, v):
        self.dcp = dcp
        stride = dcp * (max(seq_lens) + 64)
        self.req_to_token = torch.zeros((len(seq_lens) + 1, stride), dtype=torch.int32, device=DEVICE)
        locs = []
        for b, n in enumerate(seq_lens):
            loc = (b + 1) * stride + torch.arange(n, device=DEVICE)
            self.req_to_token[b, :n] = loc.to(torch.int32)
            locs.append(loc)
        loc = torch.cat(locs)
        rows = (len(seq_lens) + 2) * stride // dcp
        self.pools = []
        for r in range(dcp):
            kp = torch.zeros((rows, 1, HEAD_DIM), dtype=torch.bfloat16, device=DEVICE)
            vp = torch.zeros_like(kp)
            mine = loc % dcp == r
            kp[loc[mine] // dcp] = k[mine]
            vp[loc[mine] // dcp] = v[mine]
            self.pools.append((kp, vp))

    def local_kv(self, r, lens):
        """``(indptr on host, indices)`` of rank ``r``, as the DCP backend builds them."""
        from sglang_dcp.layers.attention.flashinfer_dcp_backend import local_kv_indices

        lens = torch.tensor(lens, dtype=torch.int32)
        req_pool_indices = torch.arange(len(lens), dtype=torch.int64, device=DEVICE)
        indptr_cpu, _, indices = local_kv_indices(
            self.req_to_token, req_pool_indices, lens.to(DEVICE), lens, self.dcp, r
        )
        return indptr_cpu, indices


def random_bf16(*shape):
    return torch.randn(*shape, device=DEVICE).to(torch.bfloat16)


def merge_across_ranks(partials, out_dtype=torch.float32):
    """``dcp_merge`` of every rank's ``(o [T, D*Hq, dv], base-2 lse [T, D*Hq])`` in one
    process: pack on each rank, exchange chunks by indexing, merge on each owner. Returns
    the merged ``o [T, D*Hq, dv]`` and ``lse`` of all heads (owner-major = rank-major)."""
    from sglang_dcp.layers.attention.merge import PartialLayout
    from sglang_dcp.layers.attention.triton_ops import merge_packed_triton, pack_by_owner_triton

    num_ranks = len(partials)
    tokens, heads, head_dim = partials[0][0].shape
    layout = PartialLayout(tokens, heads // num_ranks, head_dim, partials[0][0].dtype)
    sent = [pack_by_owner_triton(o, lse, layout, num_ranks) for o, lse in partials]
    merged = [merge_packed_triton(torch.stack([buf[c] for buf in sent]), layout, out_dtype) for c in range(num_ranks)]
    return torch.cat([o for o, _ in merged], dim=1), torch.cat([lse for _, lse in merged], dim=1)


@needs_triton
@pytest.mark.parametrize("num_ranks", [2, 3, 4, 8])
def test_pack_and_merge_kernels_match_torch(num_ranks):
    from sglang_dcp.layers.attention.merge import PartialLayout, merge_packed_torch, pack_by_owner_torch
    from sglang_dcp.layers.attention.triton_ops import merge_packed_triton, pack_by_owner_triton

    torch.manual_seed(num_ranks)
    tokens, heads_per_rank = 33, 3
    heads = heads_per_rank * num_ranks  # the gathered heads: D x Hq
    o = random_bf16(tokens, heads, HEAD_DIM)
    lse = torch.randn(tokens, heads, device=DEVICE) * 20
    layout = PartialLayout(tokens, heads_per_rank, HEAD_DIM, torch.bfloat16)
    poison_cuda_cache()
    packed = pack_by_owner_triton(o, lse, layout, num_ranks)
    assert torch.equal(packed, pack_by_owner_torch(o, lse, layout, num_ranks))

    received = layout.new_buffer(num_ranks, DEVICE)  # D partials of one owner's heads
    o_all, lse_all = layout.views(received)
    o_all.copy_(random_bf16(num_ranks, tokens, heads_per_rank, HEAD_DIM))
    lse_all.copy_(torch.randn(num_ranks, tokens, heads_per_rank, device=DEVICE) * 20)
    lse_all[0, :5] = -math.inf  # one empty shard ...
    o_all[0, :5] = float("nan")  # ... whose output is garbage
    lse_all[:, 7] = -math.inf  # every shard empty
    poison_cuda_cache()
    out, merged = merge_packed_triton(received, layout, torch.bfloat16)
    ref_out, ref_merged = merge_packed_torch(received, layout, torch.float64)
    assert out.dtype == torch.bfloat16 and not torch.isnan(out).any() and not torch.isnan(merged).any()
    assert torch.all(out[7] == 0)
    assert torch.allclose(out.double(), ref_out, rtol=1e-2, atol=1e-2)
    assert torch.equal(torch.isinf(merged), torch.isinf(ref_merged))
    finite = torch.isfinite(ref_merged)
    assert torch.allclose(merged.double()[finite], ref_merged[finite].double(), rtol=1e-6, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("num_ranks", [2, 3, 4, 8])
def test_scale_kernel_matches_torch(num_ranks):
    from sglang_dcp.layers.attention.merge import scale_by_lse_torch
    from sglang_dcp.layers.attention.triton_ops import scale_by_lse_triton

    torch.manual_seed(num_ranks)
    tokens, heads = 33, 3 * num_ranks  # all gathered heads: D x Hq
    o = random_bf16(tokens, heads, HEAD_DIM)
    lse_all = torch.randn(num_ranks, tokens, heads, device=DEVICE) * 20
    rank = num_ranks - 1
    lse_all[rank, :5] = -math.inf  # this rank's shard empty ...
    o[:5] = float("nan")  # ... its output garbage
    lse_all[0, 5:9] = -math.inf  # another rank's shard empty
    lse_all[:, 9] = -math.inf  # every shard empty
    o[9] = float("nan")
    poison_cuda_cache()
    out = scale_by_lse_triton(o, lse_all, rank, torch.bfloat16)
    ref = scale_by_lse_torch(o, lse_all, rank, torch.float64)
    assert out.dtype == torch.bfloat16 and not torch.isnan(out).any()
    assert torch.all(out[:5] == 0) and torch.all(out[9] == 0)
    assert torch.allclose(out.double(), ref, rtol=1e-2, atol=1e-2)
    out32 = scale_by_lse_triton(o, lse_all, rank, torch.float32)
    assert torch.allclose(out32.double(), ref, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("dcp", [2, 4])
def test_kv_indices_kernel(dcp):
    from sglang_dcp.layers.attention.flashinfer_dcp_backend import KV_INDICES_PADDING
    from sglang_dcp.mem_cache.layout import local_token_rows

    seq_lens = [1, 2, 3, 700, 4099]
    k = random_bf16(sum(seq_lens), 1, HEAD_DIM)
    kv = ShardedKV(seq_lens, dcp, k, k)
    for r in range(dcp):
        indptr, indices = kv.local_kv(r, seq_lens)
        assert len(indices) == int(indptr[-1]) + KV_INDICES_PADDING
        for b, n in enumerate(seq_lens):
            expected = local_token_rows(kv.req_to_token[b], n, dcp, r)
            assert torch.equal(indices[indptr[b] : indptr[b + 1]].long(), expected.long())


@needs_cuda
@pytest.mark.parametrize("heads_per_rank", [1, 8])
@pytest.mark.parametrize("dcp", [2, 4])
def test_decode_partials_merge_to_full_attention(dcp, heads_per_rank):
    """Query heads of every rank gathered over one KV head; the backend's choice of
    tensor-core decode (group size >= 4) or CUDA-core decode (1 head per rank at D=2)."""
    from flashinfer import BatchDecodeWithPagedKVCacheWrapper
    from sglang.srt.layers.attention.flashinfer_backend import should_use_tensor_core

    from sglang_dcp.layers.attention.flashinfer_dcp_backend import PAGED_KERNEL_BACKEND

    torch.manual_seed(dcp)
    seq_lens = [1, 2, 7, 300, 4097]  # 1 and 2 leave some ranks without tokens
    heads = heads_per_rank * dcp
    use_tensor_cores = should_use_tensor_core(torch.bfloat16, heads, 1)
    q = random_bf16(len(seq_lens), heads, HEAD_DIM)
    k, v = random_bf16(sum(seq_lens), 1, HEAD_DIM), random_bf16(sum(seq_lens), 1, HEAD_DIM)
    kv = ShardedKV(seq_lens, dcp, k, v)
    scale = HEAD_DIM**-0.5
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device=DEVICE)

    partials = []
    for r in range(dcp):
        indptr, indices = kv.local_kv(r, seq_lens)
        wrapper = BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", backend=PAGED_KERNEL_BACKEND, use_tensor_cores=use_tensor_cores
        )
        wrapper.plan(indptr, indices, torch.ones(len(seq_lens), dtype=torch.int32), heads, 1,
                     HEAD_DIM, 1, data_type=torch.bfloat16, q_data_type=torch.bfloat16)
        poison_cuda_cache()
        partials.append(wrapper.forward_return_lse(q, kv.pools[r], sm_scale=scale))
    merged, merged_lse = merge_across_ranks(partials)

    starts = [0] + list(torch.tensor(seq_lens).cumsum(0)[:-1].tolist())
    for b, (start, n) in enumerate(zip(starts, seq_lens)):
        o_ref, lse_ref = reference(q[b : b + 1], k[start : start + n], v[start : start + n], scale)
        assert rel_err(merged[b : b + 1], o_ref) < BF16_REL_TOL, (b, n)
        assert torch.allclose(merged_lse[b].double(), lse_ref[0], atol=1e-2), (b, n)


def prefix_partials_merged(kv, prefix_lens, q, qo_indptr, workspace, scale):
    """Queries ``q [T, D*Hq, d]`` (``qo_indptr`` per request) over each request's first
    ``prefix_lens`` tokens: every rank's non-causal paged partial over what it stores, merged."""
    from flashinfer import BatchPrefillWithPagedKVCacheWrapper

    from sglang_dcp.layers.attention.flashinfer_dcp_backend import PAGED_KERNEL_BACKEND

    partials = []
    for r in range(kv.dcp):
        indptr, indices = kv.local_kv(r, prefix_lens)
        paged = BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=PAGED_KERNEL_BACKEND)
        paged.plan(qo_indptr, indptr, indices, torch.ones(len(prefix_lens), dtype=torch.int32), q.shape[1], 1,
                   HEAD_DIM, 1, causal=False, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        poison_cuda_cache()
        partials.append(paged.forward_return_lse(q, kv.pools[r], causal=False, sm_scale=scale))
    return merge_across_ranks(partials)


@needs_cuda
@pytest.mark.parametrize("dcp", [2, 4])
def test_extend_partials_merge_to_full_attention(dcp):
    from sglang_dcp.layers.attention.flashinfer_dcp_backend import NewTokenPass, exclusive_cumsum
    from sglang_dcp.layers.attention.merge import merge_states

    torch.manual_seed(10 + dcp)
    prefix_lens, extend_lens = [0, 3, 64, 1000, 1], [5, 1, 17, 40, 2]
    heads = 4 * dcp
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    k_all, v_all = random_bf16(sum(seq_lens), 1, HEAD_DIM), random_bf16(sum(seq_lens), 1, HEAD_DIM)
    kv = ShardedKV(seq_lens, dcp, k_all, v_all)
    seq_starts = [0] + torch.tensor(seq_lens).cumsum(0)[:-1].tolist()
    new = torch.cat([torch.arange(s + p, s + p + e) for s, p, e in zip(seq_starts, prefix_lens, extend_lens)]).to(DEVICE)
    q = random_bf16(sum(extend_lens), heads, HEAD_DIM)
    scale = HEAD_DIM**-0.5
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device=DEVICE)
    qo_indptr = exclusive_cumsum(torch.tensor(extend_lens, dtype=torch.int32))

    new_tokens = NewTokenPass(workspace)
    new_tokens.plan(extend_lens, None, heads, 1, HEAD_DIM, torch.bfloat16)
    poison_cuda_cache()
    o_new, lse_new = new_tokens.run(q, k_all[new], v_all[new], scale, 0.0)

    o_pre, lse_pre = prefix_partials_merged(kv, prefix_lens, q, qo_indptr, workspace, scale)
    merged, _ = merge_states([o_new, o_pre], [lse_new, lse_pre], 2.0)

    q_start = 0
    for s, p, e in zip(seq_starts, prefix_lens, extend_lens):
        positions = torch.arange(p, p + e, device=DEVICE)
        o_ref, _ = reference(q[q_start : q_start + e], k_all[s : s + p + e], v_all[s : s + p + e], scale, positions)
        assert rel_err(merged[q_start : q_start + e], o_ref) < BF16_REL_TOL, (p, e)
        q_start += e


def draft_branch_problem(dcp, prefix_lens, topk, steps):
    """Requests whose first ``prefix_lens`` tokens are committed and whose next ``topk * steps``
    hold the draft branches (branch ``t``'s step ``s`` at ``prefix + t * steps + s``, SGLang's
    page-1 layout), all stored on their owners. Returns ``(kv, k, v, slots [B, topk, steps])``."""
    seq_lens = [p + topk * steps for p in prefix_lens]
    k, v = random_bf16(sum(seq_lens), 1, HEAD_DIM), random_bf16(sum(seq_lens), 1, HEAD_DIM)
    kv = ShardedKV(seq_lens, dcp, k, v)
    offsets = torch.arange(topk * steps, device=DEVICE).view(topk, steps)
    slots = torch.stack([kv.req_to_token[b, p + offsets].long() for b, p in enumerate(prefix_lens)])
    return kv, k, v, slots


@needs_triton
@pytest.mark.parametrize("dcp", [2, 4])
def test_draft_step_kv_indices_kernel(dcp):
    """Each draft branch's local rows: its request's prefix rows stored here, then its own."""
    from sglang_dcp.layers.attention.flashinfer_dcp_backend import draft_step_kv_indices
    from sglang_dcp.mem_cache.layout import local_slot_rows, local_token_rows

    prefix_lens, topk, steps = [1, 2, 5, 700], 3, 4
    kv, _, _, slots = draft_branch_problem(dcp, prefix_lens, topk, steps)
    seq_lens = torch.tensor(prefix_lens, dtype=torch.int32)
    req_pool_indices = torch.arange(len(prefix_lens), device=DEVICE)
    for step in range(steps):
        for r in range(dcp):
            indptr, indices = draft_step_kv_indices(
                kv.req_to_token, req_pool_indices, seq_lens.to(DEVICE), seq_lens,
                slots[:, :, : step + 1], dcp, r,
            )
            for b, n in enumerate(prefix_lens):
                for t in range(topk):
                    q = b * topk + t
                    expected = torch.cat([local_token_rows(kv.req_to_token[b], n, dcp, r),
                                          local_slot_rows(slots[b, t, : step + 1], dcp, r)])
                    assert torch.equal(indices[indptr[q] : indptr[q + 1]].long(), expected.long())


@needs_cuda
@pytest.mark.parametrize("dcp", [2, 4])
def test_draft_step_partials_merge_to_full_attention(dcp):
    """A draft decode step: one query per branch over its request's prefix and its branch's
    tokens so far, each rank over what it stores, merged."""
    from flashinfer import BatchDecodeWithPagedKVCacheWrapper

    from sglang_dcp.layers.attention.flashinfer_dcp_backend import PAGED_KERNEL_BACKEND, draft_step_kv_indices

    torch.manual_seed(20 + dcp)
    prefix_lens, topk, steps, step = [1, 3, 257, 1000], 3, 4, 2
    heads = 4 * dcp
    kv, k, v, slots = draft_branch_problem(dcp, prefix_lens, topk, steps)
    q = random_bf16(len(prefix_lens) * topk, heads, HEAD_DIM)
    seq_lens = torch.tensor(prefix_lens, dtype=torch.int32)
    req_pool_indices = torch.arange(len(prefix_lens), device=DEVICE)
    scale = HEAD_DIM**-0.5
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device=DEVICE)

    partials = []
    for r in range(dcp):
        indptr, indices = draft_step_kv_indices(
            kv.req_to_token, req_pool_indices, seq_lens.to(DEVICE), seq_lens, slots[:, :, : step + 1], dcp, r
        )
        wrapper = BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", backend=PAGED_KERNEL_BACKEND,
                                                     use_tensor_cores=True)
        wrapper.plan(indptr, indices, torch.ones(q.shape[0], dtype=torch.int32), heads, 1, HEAD_DIM, 1,
                     data_type=torch.bfloat16, q_data_type=torch.bfloat16)
        poison_cuda_cache()
        partials.append(wrapper.forward_return_lse(q, kv.pools[r], sm_scale=scale))
    merged, _ = merge_across_ranks(partials)

    base = kv.req_to_token[:, 0].long()  # logical slot of each request's first token
    starts = [0] + torch.tensor([p + topk * steps for p in prefix_lens]).cumsum(0)[:-1].tolist()
    for b, (start, n) in enumerate(zip(starts, prefix_lens)):
        for t in range(topk):
            keys = torch.cat([torch.arange(n, device=DEVICE), slots[b, t, : step + 1] - base[b]]) + start
            query = b * topk + t
            o_ref, _ = reference(q[query : query + 1], k[keys], v[keys], scale)
            assert rel_err(merged[query : query + 1], o_ref) < BF16_REL_TOL, (b, t)


@needs_cuda
@pytest.mark.parametrize("dcp", [2, 4])
def test_verify_tree_partials_merge_to_full_attention(dcp):
    """A verify pass: draft tokens over the committed prefix (sharded, merged) and over each
    other under the tree mask (FlashInfer's custom mask on the ragged new-token pass)."""
    from sglang_dcp.layers.attention.flashinfer_dcp_backend import NewTokenPass, exclusive_cumsum
    from sglang_dcp.layers.attention.merge import merge_states
    from sglang_dcp.test.speculative_cpu.drafts import ancestor_mask

    torch.manual_seed(30 + dcp)
    parents = [-1, 0, 0, 1, 1, 2]  # a tree of 6 draft tokens
    n = len(parents)
    mask = ancestor_mask(parents)
    prefix_lens = [1, 5, 300, 1000]
    heads = 4 * dcp
    seq_lens = [p + n for p in prefix_lens]
    k_all, v_all = random_bf16(sum(seq_lens), 1, HEAD_DIM), random_bf16(sum(seq_lens), 1, HEAD_DIM)
    kv = ShardedKV(seq_lens, dcp, k_all, v_all)
    starts = [0] + torch.tensor(seq_lens).cumsum(0)[:-1].tolist()
    new = torch.cat([torch.arange(s + p, s + p + n) for s, p in zip(starts, prefix_lens)]).to(DEVICE)
    q = random_bf16(len(prefix_lens) * n, heads, HEAD_DIM)
    scale = HEAD_DIM**-0.5
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device=DEVICE)
    qo_indptr = exclusive_cumsum(torch.full((len(prefix_lens),), n, dtype=torch.int32))

    new_tokens = NewTokenPass(workspace)
    new_tokens.plan([n] * len(prefix_lens), mask.repeat(len(prefix_lens), 1, 1).to(DEVICE), heads, 1,
                    HEAD_DIM, torch.bfloat16)
    poison_cuda_cache()
    o_new, lse_new = new_tokens.run(q, k_all[new], v_all[new], scale, 0.0)
    o_pre, lse_pre = prefix_partials_merged(kv, prefix_lens, q, qo_indptr, workspace, scale)
    merged, _ = merge_states([o_new, o_pre], [lse_new, lse_pre], 2.0)

    for b, (s, p) in enumerate(zip(starts, prefix_lens)):
        for i in range(n):
            keys = torch.cat([torch.arange(s, s + p), s + p + mask[i].nonzero().flatten()]).to(DEVICE)
            row = b * n + i
            o_ref, _ = reference(q[row : row + 1], k_all[keys], v_all[keys], scale)
            assert rel_err(merged[row : row + 1], o_ref) < BF16_REL_TOL, (b, i)


@needs_cuda
def test_new_token_pass_causal_after_verify():
    """One ``NewTokenPass`` planned and run as the backend does: a causal extend, a verify under
    a tree mask, a causal extend again, each against float64. A single wrapper for both kinds
    fixes its kernel at the first (causal) plan, fa3 on Hopper, which has no custom masks, and
    keeps the tree mask for the causal pass after it."""
    from sglang_dcp.layers.attention.flashinfer_dcp_backend import NewTokenPass
    from sglang_dcp.test.speculative_cpu.drafts import ancestor_mask

    torch.manual_seed(40)
    heads, scale = 8, HEAD_DIM**-0.5
    new_tokens = NewTokenPass(torch.empty(256 << 20, dtype=torch.uint8, device=DEVICE))

    def check(lens, tree_mask):
        """Requests of ``lens`` new tokens, causal (``tree_mask`` None) or each under it."""
        k, v = random_bf16(sum(lens), 1, HEAD_DIM), random_bf16(sum(lens), 1, HEAD_DIM)
        q = random_bf16(sum(lens), heads, HEAD_DIM)
        masks = None if tree_mask is None else tree_mask.repeat(len(lens), 1, 1).to(DEVICE)
        new_tokens.plan(lens, masks, heads, 1, HEAD_DIM, torch.bfloat16)
        poison_cuda_cache()
        o, lse = new_tokens.run(q, k, v, scale, 0.0)
        start = 0
        for n in lens:
            for i in range(n):
                keys = torch.arange(i + 1) if tree_mask is None else tree_mask[i].nonzero().flatten()
                keys = (start + keys).to(DEVICE)
                o_ref, lse_ref = reference(q[start + i : start + i + 1], k[keys], v[keys], scale)
                assert rel_err(o[start + i : start + i + 1], o_ref) < BF16_REL_TOL, (tree_mask is None, n, i)
                assert torch.allclose(lse[start + i].double(), lse_ref[0], atol=1e-2), (tree_mask is None, n, i)
            start += n

    tree = ancestor_mask([-1, 0, 0, 1, 1, 2])
    check([5, 17, 40, 1], None)
    check([len(tree)] * 4, tree)
    check([6, 6, 6, 6], None)  # the verify's shapes: a stale tree mask would change the result
