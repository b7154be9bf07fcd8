"""The CPU speculation test mode's PyTorch kernels (``sglang_dcp.test.speculative_cpu``) against
the kernels they stand in for: SGLang's Triton kernels of the speculative path (on a GPU, or on
CPU under Triton's interpreter, ``TRITON_INTERPRET=1``, as ``test_speculative_cpu.py`` runs
them) and ``sgl_kernel``'s CUDA tree kernels (GPU only), on random inputs.

GPU: ``python -m pytest -q test/srt/gpu/test_gpu_speculative_kernels.py`` on one GPU.
"""

import random

import pytest
import torch

from sglang.srt.speculative.eagle_utils import TreeMaskMode
from sglang.srt.speculative.triton_ops import cache_locs, eagle
from sglang.srt.speculative.triton_ops.gather_spec_extras import gather_spec_extras
from sglang.srt.utils import next_power_of_2
from sglang_dcp.test.speculative_cpu import kernels, tree
from sglang_dcp.test.speculative_cpu.drafts import draft_round

from test_gpu_kernels import CUDA, DEVICE, needs_cuda, needs_triton  # noqa: E402 - beside this file

pytestmark = pytest.mark.gpu


def request_rows(batch: int, width: int, seed: int):
    """A ``req_to_token`` of distinct slots, ``batch`` request rows in shuffled order and
    per-request spans ``[start, end)``."""
    rng = random.Random(seed)
    req_to_token = torch.randperm(8 * width * 40, generator=torch.Generator().manual_seed(seed))[: 8 * width]
    req_to_token = req_to_token.view(8, width).to(torch.int32).to(DEVICE)
    rows = torch.tensor(rng.sample(range(8), batch), device=DEVICE)
    start = torch.tensor([rng.randrange(width // 2) for _ in range(batch)], device=DEVICE)
    end = start + torch.tensor([rng.randrange(width // 2) for _ in range(batch)], device=DEVICE)
    return req_to_token, rows, start, end


@needs_triton
def test_triton_cache_locs():
    batch, width = 5, 40
    req_to_token, rows, start, end = request_rows(batch, width, seed=0)
    total = int((end - start).sum())
    out = {}
    for name, kernel in (("sglang", cache_locs.assign_extend_cache_locs), ("stand_in", kernels.AssignExtendCacheLocs)):
        out[name] = torch.full((total,), -1, dtype=torch.int64, device=DEVICE)
        kernel[(batch,)](rows, req_to_token, start, end, out[name], width, next_power_of_2(batch))
    assert torch.equal(out["sglang"], out["stand_in"])

    new_slots = torch.arange(1000, 1000 + total, device=DEVICE)
    pools = {}
    for name, kernel in (("sglang", cache_locs.assign_req_to_token_pool), ("stand_in", kernels.AssignReqToTokenPool)):
        pools[name] = req_to_token.clone()
        kernel[(batch,)](rows, pools[name], start, end, new_slots, width, next_power_of_2(batch))
    assert torch.equal(pools["sglang"], pools["stand_in"])

    topk, steps = 3, 4
    seq_lens = torch.randint(0, width - topk * steps, (batch,), device=DEVICE)
    draft = {}
    for name, kernel in (("sglang", cache_locs.assign_draft_cache_locs_contiguous),
                         ("stand_in", kernels.AssignDraftCacheLocsContiguous)):
        draft[name] = torch.full((batch * topk * steps,), -1, dtype=torch.int64, device=DEVICE)
        kernel[(batch,)](rows, req_to_token, seq_lens, draft[name], width, topk, steps)
    assert torch.equal(draft["sglang"], draft["stand_in"])


@needs_triton
def test_triton_accept_kernels():
    batch, width = 6, 5
    gen = torch.Generator().manual_seed(1)
    accept_lens = torch.randint(1, width + 1, (batch,), generator=gen).to(DEVICE)
    accept_index = torch.full((batch, width), -1, dtype=torch.int32)
    for b, n in enumerate(accept_lens.tolist()):
        accept_index[b, :n] = torch.randperm(batch * 8, generator=gen)[:n].to(torch.int32)
    accept_index = accept_index.to(DEVICE)
    out_cache_loc = torch.randperm(1000, generator=gen)[: batch * 8].to(DEVICE)
    size = batch * width
    locs = {}
    for name, kernel in (("sglang", eagle.fill_accept_out_cache_loc), ("stand_in", kernels.FillAcceptOutCacheLoc)):
        locs[name] = torch.zeros(size, dtype=torch.int64, device=DEVICE)
        kernel[(size,)](accept_index, out_cache_loc, locs[name], next_power_of_2(size))
    assert torch.equal(locs["sglang"], locs["stand_in"])

    accept_tokens = torch.randint(0, 500, (batch, width), generator=gen).to(DEVICE)
    bonus = {}
    for name, kernel in (("sglang", eagle.fill_bonus_tokens), ("stand_in", kernels.FillBonusTokens)):
        bonus[name] = torch.empty(batch, dtype=torch.int32, device=DEVICE)
        kernel[(batch,)](accept_tokens, accept_lens, bonus[name], width)
    assert torch.equal(bonus["sglang"], bonus["stand_in"])


@needs_triton
@pytest.mark.parametrize("with_hidden", [True, False])
def test_triton_gather_spec_extras(with_hidden):
    gen = torch.Generator().manual_seed(2)
    buffers = (
        torch.rand(10, 4, generator=gen).to(DEVICE),
        torch.randint(0, 99, (10, 4), generator=gen).to(DEVICE),
        torch.randint(0, 99, (10,), generator=gen).to(DEVICE),
        torch.rand(10, 16, generator=gen).to(DEVICE) if with_hidden else None,
    )
    indices = torch.tensor([7, 2, 2, 9], device=DEVICE)
    for ours, theirs in zip(kernels.gather_spec_extras(indices, *buffers), gather_spec_extras(indices, *buffers)):
        assert (ours is None and theirs is None) or torch.equal(ours, theirs)


# ---- sgl_kernel's CUDA tree kernels ---------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("topk,steps,num_draft", [(1, 3, 4), (4, 3, 8), (2, 5, 10)])
@pytest.mark.parametrize("mode", [TreeMaskMode.FULL_MASK, TreeMaskMode.QLEN_ONLY])
def test_cuda_build_tree(topk, steps, num_draft, mode):
    from sglang.srt.speculative import eagle_utils

    parent_list, selected, draft_tokens = (t.to(DEVICE) for t in draft_round(4, topk, steps, num_draft, 60, seed=topk)[:3])
    seq_lens = torch.tensor([5, 1, 9, 30], device=DEVICE)
    args = (torch.tensor([1, 2, 3, 4], device=DEVICE), parent_list, selected, draft_tokens, seq_lens,
            int(seq_lens.sum()), topk, steps, num_draft, mode)
    for ours, theirs in zip(tree.build_tree_kernel_efficient(*args), eagle_utils.build_tree_kernel_efficient(*args)):
        assert torch.equal(ours.cpu(), theirs.cpu())


@needs_cuda
def test_cuda_ngram_tree_and_greedy_verify():
    from sgl_kernel import verify_tree_greedy
    from sgl_kernel.speculative import reconstruct_indices_from_tree_mask

    batch, size, steps = 6, 8, 5
    rng = random.Random(0)
    masks = torch.zeros(batch, size, size, dtype=torch.bool)
    for b in range(batch):
        parents = [-1] + [rng.randrange(j) for j in range(1, size)]
        for node in range(size):
            seen = node
            masks[b, node, seen] = True
            while parents[seen] != -1:
                seen = parents[seen]
                masks[b, node, seen] = True
    seq_lens = torch.tensor([3, 0, 7, 2, 9, 1], device=DEVICE)
    results = []
    for fn in (tree.reconstruct_indices_from_tree_mask, reconstruct_indices_from_tree_mask):
        out = [torch.full((batch * size,), -9, dtype=torch.int64, device=DEVICE)] + [
            torch.full((batch, size), -9, dtype=torch.int64, device=DEVICE) for _ in range(3)
        ]
        fn(masks.flatten().to(DEVICE), seq_lens, *out, batch, size)
        results.append(out)
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)

    positions, index, next_token, next_sibling = results[1]
    gen = torch.Generator().manual_seed(3)
    candidates = torch.randint(0, 3, (batch, size), generator=gen).to(DEVICE)
    target = torch.randint(0, 3, (batch, size), generator=gen).to(DEVICE)
    verified = []
    for fn in (tree.verify_tree_greedy_func, verify_tree_greedy):
        predicts = torch.full((batch * size,), -7, dtype=torch.int32, device=DEVICE)
        accept_index = torch.full((batch, steps), -1, dtype=torch.int32, device=DEVICE)
        accept_num = torch.zeros(batch, dtype=torch.int32, device=DEVICE)
        fn(predicts=predicts, accept_index=accept_index, accept_token_num=accept_num, candidates=candidates,
           **{("retrieve_" if fn is tree.verify_tree_greedy_func else "retrive_") + k: v for k, v in
              (("index", index), ("next_token", next_token), ("next_sibling", next_sibling))},
           target_predict=target)
        verified.append((predicts, accept_index, accept_num))
    for ours, theirs in zip(*verified):
        assert torch.equal(ours, theirs)


@needs_cuda
def test_cuda_sampled_verify_and_renorm():
    from sgl_kernel import top_k_renorm_prob, top_p_renorm_prob, tree_speculative_sampling_target_only

    batch, topk, steps, num_draft, vocab = 5, 2, 3, 5, 32
    parent_list, selected, draft_tokens = (t.to(DEVICE) for t in draft_round(batch, topk, steps, num_draft, vocab, seed=4)[:3])
    seq_lens = torch.tensor([4, 2, 6, 1, 3], device=DEVICE)
    built = tree.build_tree_kernel_efficient(
        torch.zeros(batch, dtype=torch.int64, device=DEVICE), parent_list, selected, draft_tokens, seq_lens,
        int(seq_lens.sum()), topk, steps, num_draft,
    )
    index, next_token, next_sibling, candidates = built[2], built[3], built[4], built[5].view(batch, num_draft)
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(batch * num_draft, vocab, generator=gen).to(DEVICE) * 3
    probs = top_p_renorm_prob(top_k_renorm_prob(logits.softmax(-1), torch.full((batch * num_draft,), 8, device=DEVICE)),
                              torch.full((batch * num_draft,), 0.9, device=DEVICE))
    ours = tree.top_p_renorm_prob(tree.top_k_renorm_prob(logits.softmax(-1), torch.full((batch * num_draft,), 8,
                                  device=DEVICE)), torch.full((batch * num_draft,), 0.9, device=DEVICE))
    torch.testing.assert_close(ours, probs)
    # candidates drafted from the target's likely tokens, so some are accepted
    candidates = probs.view(batch, num_draft, vocab).argmax(-1).roll(1, dims=1)
    coins = torch.rand(batch, num_draft, generator=gen).to(DEVICE)
    final = torch.rand(batch, generator=gen).to(DEVICE)
    sampled = []
    for fn in (tree.tree_speculative_sampling_target_only, tree_speculative_sampling_target_only):
        predicts = torch.full((batch * num_draft,), -7, dtype=torch.int32, device=DEVICE)
        accept_index = torch.full((batch, steps + 1), -1, dtype=torch.int32, device=DEVICE)
        accept_num = torch.zeros(batch, dtype=torch.int32, device=DEVICE)
        fn(predicts=predicts, accept_index=accept_index, accept_token_num=accept_num, candidates=candidates,
           retrive_index=index, retrive_next_token=next_token, retrive_next_sibling=next_sibling,
           uniform_samples=coins, uniform_samples_for_final_sampling=final,
           target_probs=probs.view(batch, num_draft, vocab), draft_probs=torch.zeros(batch, num_draft, vocab,
           device=DEVICE), threshold_single=1.0, threshold_acc=1.0, deterministic=True)
        sampled.append((predicts, accept_index, accept_num))
    for ours, theirs in zip(*sampled):
        assert torch.equal(ours, theirs)
