"""SGLang's speculative tree kernels (``sgl_kernel``, CUDA only) in PyTorch, for CPU tests.

A draft *tree* of ``N`` nodes per request: node 0 is the root (the last verified token), node
``j >= 1`` a drafted token whose parent has a smaller index. SGLang walks it through three
``[B, N]`` arrays: ``retrieve_index[b, j] = b * N + j`` (the node's row in the flattened
batch), ``retrieve_next_token[b, p]`` (the first child of ``p``, or -1) and
``retrieve_next_sibling[b, c]`` (the next child of ``c``'s parent after ``c``, or -1); children
are listed in increasing index. A node's position is ``seq_len + depth`` (depth: the number of
its ancestors, the root included), and in the verify pass it sees the committed prefix, itself
and its ancestors.
"""

import torch

from sglang.srt.speculative.eagle_utils import TreeMaskMode


def first_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dimension of ``mask``, -1 where there is none."""
    size = mask.shape[-1]
    index = torch.arange(size, device=mask.device).expand_as(mask)
    first = torch.where(mask, index, size).min(dim=-1).values
    return torch.where(first == size, -1, first)


def links_from_parents(parents: torch.Tensor):
    """``(next_token, next_sibling)`` ``[B, N]`` of the trees ``parents [B, N]`` (-1: none)."""
    nodes = torch.arange(parents.shape[1], device=parents.device)
    has_parent = parents >= 0
    # [b, p, c]: c is a child of p
    child = (parents.unsqueeze(1) == nodes.view(1, -1, 1)) & has_parent.unsqueeze(1)
    # [b, c, c2]: c2 > c has c's parent
    later_sibling = (
        (parents.unsqueeze(2) == parents.unsqueeze(1))
        & has_parent.unsqueeze(2)
        & (nodes.view(1, 1, -1) > nodes.view(1, -1, 1))
    )
    return first_index(child), first_index(later_sibling)


def ancestors_from_parents(parents: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, N, N]``: ``[b, j, i]`` whether ``i`` is ``j`` or an ancestor of ``j``."""
    batch, size = parents.shape
    seen = torch.eye(size, dtype=torch.bool, device=parents.device).repeat(batch, 1, 1)
    current = parents.clone()
    for _ in range(size):
        valid = current >= 0
        if not valid.any():
            break
        b, j = valid.nonzero(as_tuple=True)
        seen[b, j, current[b, j]] = True
        current = torch.where(valid, parents.gather(1, current.clamp(min=0)), -1)
    return seen


def draft_parents(parent_list: torch.Tensor, selected_index: torch.Tensor, topk: int) -> torch.Tensor:
    """Parents ``[B, N]`` of EAGLE's draft trees (``N = draft tokens``).

    Draft token ``j >= 1`` is the entry ``selected_index[b, j - 1]`` of the draft's score list
    (ascending). Its parent is the root when ``selected_index // topk == 0``, else the draft
    token whose score-list entry is ``parent_list[b, selected_index // topk]``; one not among
    the selected is an orphan (parent -1, as the CUDA kernel skips it)."""
    batch = selected_index.shape[0]
    group = selected_index // topk
    if parent_list.shape[1] == 0:
        parent_entry = torch.full_like(selected_index, -1)
    else:
        parent_entry = parent_list.gather(1, group.clamp(max=parent_list.shape[1] - 1))
    match = selected_index.unsqueeze(1) == parent_entry.unsqueeze(2)  # [b, j, i]
    found = first_index(match)
    parents = torch.where(group == 0, 0, torch.where(found >= 0, found + 1, -1))
    root = torch.full((batch, 1), -1, dtype=parents.dtype, device=parents.device)
    return torch.cat([root, parents], dim=1)


def build_tree_kernel_efficient(
    bonus_tokens,
    parent_list,
    top_scores_index,
    draft_tokens,
    seq_lens,
    seq_lens_sum,
    topk,
    spec_steps,
    num_verify_tokens,
    tree_mask_mode=TreeMaskMode.FULL_MASK,
    tree_mask_buf=None,
    position_buf=None,
):
    """``eagle_utils.build_tree_kernel_efficient``: the verify inputs of EAGLE's draft trees.

    Returns ``(tree_mask, positions, retrieve_index, retrieve_next_token,
    retrieve_next_sibling, draft_tokens)``. ``FULL_MASK``: request after request, ``N`` rows
    of ``seq_len + N`` (prefix, then the tree); ``QLEN_ONLY``: the ``N x N`` tree part only."""
    if tree_mask_mode not in (TreeMaskMode.FULL_MASK, TreeMaskMode.QLEN_ONLY):
        raise NotImplementedError(f"tree mask mode {tree_mask_mode!r} on CPU")
    draft_tokens = torch.cat((bonus_tokens.unsqueeze(1), draft_tokens), dim=1).flatten()
    batch, size = seq_lens.numel(), num_verify_tokens
    device = seq_lens.device
    parents = draft_parents(parent_list.to(device), top_scores_index.to(device), topk)
    tree = ancestors_from_parents(parents)
    next_token, next_sibling = links_from_parents(parents)
    retrieve_index = torch.arange(batch * size, device=device).view(batch, size)

    depth = tree.sum(dim=-1) - 1
    positions = (seq_lens.view(-1, 1).to(torch.int64) + depth).flatten()
    if position_buf is not None:
        position_buf[: positions.numel()].copy_(positions)
        positions = position_buf

    if tree_mask_mode == TreeMaskMode.QLEN_ONLY:
        mask = tree.flatten()
    else:
        rows = [
            torch.cat([torch.ones(size, length, dtype=torch.bool, device=device), tree[b]], dim=1)
            for b, length in enumerate(seq_lens.tolist())
        ]
        mask = torch.cat([row.flatten() for row in rows])
    if tree_mask_buf is not None:
        tree_mask_buf.fill_(True)
        tree_mask_buf[: mask.numel()].copy_(mask)
        mask = tree_mask_buf
    return mask, positions, retrieve_index, next_token, next_sibling, draft_tokens


def reconstruct_indices_from_tree_mask(
    tree_mask, verified_seq_len, positions, retrieve_index, retrieve_next_token, retrieve_next_sibling,
    batch_size, draft_token_num,
):
    """``sgl_kernel.speculative.reconstruct_indices_from_tree_mask`` (NGRAM), in place.

    ``tree_mask [B * N * N]``: row ``j`` marks the nodes ``j`` sees (its ancestors and itself).
    A node's parent is the last node it sees before itself, its depth the number it sees
    before itself; children and siblings follow from the parents."""
    size = draft_token_num
    mask = tree_mask.view(batch_size, size, size).bool()
    before = torch.ones(size, size, dtype=torch.bool, device=mask.device).tril(-1)
    seen_before = mask & before
    last = size - 1 - first_index(seen_before.flip(-1))
    parents = torch.where(seen_before.any(dim=-1), last, -1)
    next_token, next_sibling = links_from_parents(parents)
    positions.copy_((verified_seq_len.view(-1, 1) + seen_before.sum(dim=-1)).flatten())
    retrieve_index.copy_(torch.arange(batch_size * size, device=mask.device).view(batch_size, size))
    retrieve_next_token.copy_(next_token)
    retrieve_next_sibling.copy_(next_sibling)


def accept_paths(walk, retrieve_index, retrieve_next_token, retrieve_next_sibling, steps):
    """Walk each request's tree from the root, at most ``steps - 1`` levels deep, and return
    per request the accepted nodes' global indices (root first).

    ``walk(b, row, node)`` is asked, for each child ``node`` of the last accepted node in turn
    (``row``: that node's local index), whether to accept it: True accepts it and descends,
    False tries the next sibling; a level with no accepted child ends the walk."""
    index, next_token, sibling = (t.tolist() for t in (retrieve_index, retrieve_next_token, retrieve_next_sibling))
    paths = []
    for b in range(len(index)):
        path, row = [index[b][0]], 0
        for _ in range(1, steps):
            node = next_token[b][row]
            while node != -1 and not walk(b, row, node):
                node = sibling[b][node]
            if node == -1:
                break
            path.append(index[b][node])
            row = node
        paths.append(path)
    return paths


def write_accepted(paths, accept_index, accept_token_num):
    """Write ``paths`` (per request, accepted global node indices) into ``accept_index``
    (-1 padded) and their draft counts into ``accept_token_num``."""
    accept_index.fill_(-1)
    for b, path in enumerate(paths):
        accept_index[b, : len(path)] = torch.tensor(path, dtype=accept_index.dtype)
    accept_token_num.copy_(torch.tensor([len(p) - 1 for p in paths], dtype=accept_token_num.dtype))


def verify_tree_greedy_func(
    predicts, accept_index, accept_token_num, candidates, retrieve_index, retrieve_next_token,
    retrieve_next_sibling, target_predict, topk=-1,
):
    """``eagle_utils.verify_tree_greedy_func``: accept, level by level, the child whose token is
    the target's argmax at its parent. ``predicts[node]`` (flat over the batch) is the token the
    target predicts after an accepted node: the next accepted token, or the bonus token."""
    size = candidates.shape[1]
    target = target_predict.reshape(-1)
    cand = candidates.tolist()
    target_list = target.tolist()
    paths = accept_paths(
        lambda b, row, node: cand[b][node] == target_list[b * size + row],
        retrieve_index, retrieve_next_token, retrieve_next_sibling, accept_index.shape[1],
    )
    write_accepted(paths, accept_index, accept_token_num)
    accepted = torch.tensor([node for path in paths for node in path], device=predicts.device)
    predicts[accepted] = target[accepted].to(predicts.dtype)
    return predicts, accept_index, accept_token_num


def sample_from(weights: torch.Tensor, coin: float) -> int:
    """Inverse-CDF sample of the unnormalised ``weights [V]`` with ``coin`` in [0, 1): the first
    index whose cumulative weight exceeds ``coin * sum``; the last positive one if rounding
    leaves none, ``V - 1`` if no weight is positive."""
    cumulative = torch.cumsum(weights, dim=0)
    above = (cumulative > coin * cumulative[-1]).nonzero()
    if above.numel():
        return int(above[0])
    positive = (weights > 0).nonzero()
    return int(positive[-1]) if positive.numel() else weights.shape[0] - 1


def tree_speculative_sampling_target_only(
    predicts, accept_index, accept_token_num, candidates, retrive_index, retrive_next_token,
    retrive_next_sibling, uniform_samples, uniform_samples_for_final_sampling, target_probs,
    draft_probs, threshold_single=1.0, threshold_acc=1.0, deterministic=True,
):
    """``sgl_kernel.tree_speculative_sampling_target_only``: sampled verification of a tree.

    At the last accepted node (``row``, coin ``u[b, row]``, starting at the root with
    ``u[b, 0]``) the children are tried in order, adding each one's target probability
    ``p`` to a running sum ``acc``: a child is accepted when ``u <= acc / threshold_acc`` or
    ``p >= threshold_single``; a rejected child's ``p`` moves into ``draft_probs`` at ``row``.
    The token after the last accepted node is drawn, with ``u_final[b]``, from
    ``relu(target_probs - draft_probs)`` at its row (``draft_probs`` left out when every
    level was accepted)."""
    batch, size = candidates.shape
    steps = accept_index.shape[1]
    cand = candidates.tolist()
    coins = uniform_samples.tolist()
    threshold_acc = max(threshold_acc, 1e-9)
    state = [{"acc": 0.0} for _ in range(batch)]

    def walk(b, row, node):
        token = cand[b][node]
        prob = float(target_probs[b, row, token])
        state[b]["acc"] += prob
        if coins[b][row] <= state[b]["acc"] / threshold_acc or prob >= threshold_single:
            state[b]["acc"] = 0.0
            return True
        draft_probs[b, row, token] = target_probs[b, row, token]
        return False

    paths = accept_paths(walk, retrive_index, retrive_next_token, retrive_next_sibling, steps)
    write_accepted(paths, accept_index, accept_token_num)
    for b, path in enumerate(paths):
        for node, child in zip(path, path[1:]):
            predicts[node] = cand[b][child - b * size]
        row = path[-1] - b * size
        residual = target_probs[b, row]
        if len(path) < steps:
            residual = residual - draft_probs[b, row]
        coin = float(uniform_samples_for_final_sampling[b])
        predicts[path[-1]] = sample_from(torch.clamp(residual, min=0), coin)


def top_k_renorm_prob(probs: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Per row, keep the probabilities at least the ``top_k``-th largest, renormalised."""
    k = top_k.to(torch.int64).clamp(min=1, max=probs.shape[-1]).view(-1, 1)
    kth = probs.sort(dim=-1, descending=True).values.gather(1, k - 1)
    kept = torch.where(probs >= kth, probs, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def top_p_renorm_prob(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row, keep the most likely tokens whose probabilities before them sum below
    ``top_p``, renormalised."""
    ordered, order = probs.sort(dim=-1, descending=True)
    before = torch.cumsum(ordered, dim=-1) - ordered
    keep_sorted = before < top_p.view(-1, 1)
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    kept = torch.where(keep, probs, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)
