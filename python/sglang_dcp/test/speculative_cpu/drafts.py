"""Draft trees as SGLang's EAGLE worker builds them, for tests of the tree kernels."""

import torch

from sglang.srt.speculative.eagle_utils import organize_draft_results
from sglang.srt.speculative.spec_utils import select_top_k_tokens


def draft_round(batch: int, topk: int, steps: int, num_draft: int, vocab: int, seed: int):
    """One draft round of EAGLE's worker (``select_top_k_tokens`` per step, then
    ``organize_draft_results``) on seeded random draft distributions.

    Returns ``(parent_list, selected, draft_tokens)``, what the worker hands to the tree builder,
    and per request the parent entry of each score-list entry (-1: the root) and the entries'
    tokens ``[B, entries]``. Step 0 holds entries ``[0, topk)``; step ``s >= 1`` holds
    ``topk + (s - 1) * topk^2 + [0, topk^2)``, whose candidate ``c`` descends from the
    ``(c // topk)``-th entry chosen at step ``s - 1``."""
    gen = torch.Generator().manual_seed(seed)

    def top(rows):
        return torch.rand(rows, vocab, generator=gen).softmax(-1).topk(topk, dim=-1)

    topk_p, topk_index = top(batch)
    scores, hidden, lists = None, None, ([], [], [])
    for step in range(steps):
        _, hidden, scores, info = select_top_k_tokens(step, topk_p, topk_index, hidden, scores, topk)
        for collected, item in zip(lists, info):
            collected.append(item)
        topk_p, topk_index = top(batch * topk)
    score_list, token_list, parents_list = lists
    parent_list, selected, draft_tokens = organize_draft_results(score_list, token_list, parents_list, num_draft)
    parent_entry = []
    for b in range(batch):
        chosen = [parents_list[0][b, 1:].tolist()] + [parents_list[s][b].tolist() for s in range(1, steps)]
        parent_entry.append([-1] * topk + [chosen[s - 1][c // topk] for s in range(1, steps) for c in range(topk * topk)])
    return parent_list, selected, draft_tokens, parent_entry, torch.cat(token_list, dim=1)


def ancestor_mask(parents) -> torch.Tensor:
    """``[N, N]`` booleans of the tree with ``parents[i]`` the parent of node ``i`` (-1: the
    root): row ``i`` marks node ``i`` and its ancestors, what a draft token attends to."""
    size = len(parents)
    mask = torch.eye(size, dtype=torch.bool)
    for node in range(size):
        parent = int(parents[node])
        while parent != -1:
            mask[node, parent] = True
            parent = int(parents[parent])
    return mask
