"""SGLang's speculative decoding on CPU at dcp 1, through the test mode
``SGLANG_DCP_TEST_CPU_SPECULATION=1`` (``sglang_dcp.test.speculative_cpu``).

Unit tests: the PyTorch tree kernels against references written from their definitions, on
draft trees that SGLang's own draft code builds (``select_top_k_tokens``,
``organize_draft_results``); the Triton stand-ins are checked against SGLang's Triton kernels
in ``gpu/test_gpu_speculative_kernels.py`` (on a GPU, or here under Triton's interpreter).
End to end (below): each algorithm against no speculation on the same weights.
"""

import os
import random
import subprocess
import sys

import pytest
import torch

from sglang.srt.speculative.eagle_utils import TreeMaskMode
from sglang_dcp.test.speculative_cpu import tree
from sglang_dcp.test.speculative_cpu.drafts import ancestor_mask, draft_round

GPU_TESTS = os.path.join(os.path.dirname(__file__), "gpu")


# ---- draft trees and their references -------------------------------------------------------


def reference_parents(selected, parent_entry):
    """Per request, each draft node's parent node: the root (0) or the node of its parent entry."""
    parents = []
    for row, entries in zip(selected.tolist(), parent_entry):
        nodes = [-1]
        for entry in row:
            up = entries[entry]
            nodes.append(0 if up == -1 else row.index(up) + 1)
        parents.append(nodes)
    return parents


def depth_of(parents, node):
    return 0 if parents[node] == -1 else 1 + depth_of(parents, parents[node])


def children_of(parents, node):
    return [c for c in range(len(parents)) if parents[c] == node]


@pytest.mark.parametrize("topk,steps,num_draft", [(1, 3, 4), (4, 3, 8), (2, 5, 10), (8, 1, 8)])
def test_build_tree_matches_the_draft_tree(topk, steps, num_draft):
    batch, vocab = 3, 50
    parent_list, selected, draft_tokens, parent_entry, tokens = draft_round(batch, topk, steps, num_draft, vocab, seed=topk)
    seq_lens = torch.tensor([5, 1, 9])
    bonus = torch.tensor([7, 8, 9])
    mask, positions, index, next_token, next_sibling, flat_tokens = tree.build_tree_kernel_efficient(
        bonus, parent_list, selected, draft_tokens, seq_lens, int(seq_lens.sum()), topk, steps, num_draft,
        TreeMaskMode.FULL_MASK,
    )
    offset = 0
    for b, parents in enumerate(reference_parents(selected, parent_entry)):
        length = int(seq_lens[b])
        rows = mask[offset : offset + num_draft * (length + num_draft)].view(num_draft, length + num_draft)
        offset += rows.numel()
        assert flat_tokens[b * num_draft] == bonus[b]
        assert flat_tokens[b * num_draft + 1 : (b + 1) * num_draft].tolist() == tokens[b, selected[b]].tolist()
        for node in range(num_draft):
            line, seen = {node}, node
            while parents[seen] != -1:
                seen = parents[seen]
                line.add(seen)
            assert rows[node, :length].all()
            assert set(rows[node, length:].nonzero().flatten().tolist()) == line
            assert positions[b * num_draft + node] == length + depth_of(parents, node)
            assert index[b, node] == b * num_draft + node
            kids = children_of(parents, node)
            assert next_token[b, node] == (kids[0] if kids else -1)
            siblings = children_of(parents, parents[node]) if parents[node] != -1 else [node]
            later = siblings[siblings.index(node) + 1 :]
            assert next_sibling[b, node] == (later[0] if later else -1)
    assert offset == mask.numel()


def test_build_tree_qlen_only_and_buffers():
    topk, steps, num_draft = 4, 3, 8
    parent_list, selected, draft_tokens, _, _ = draft_round(2, topk, steps, num_draft, 40, seed=1)
    seq_lens = torch.tensor([3, 6])
    args = (torch.tensor([1, 2]), parent_list, selected, draft_tokens, seq_lens, 9, topk, steps, num_draft)
    full, positions = tree.build_tree_kernel_efficient(*args)[:2]
    qlen = tree.build_tree_kernel_efficient(*args, TreeMaskMode.QLEN_ONLY)[0]
    full_tree = [full[:88].view(8, 11)[:, 3:], full[88:].view(8, 14)[:, 6:]]
    assert torch.equal(qlen.view(2, 8, 8), torch.stack(full_tree))
    mask_buf, position_buf = torch.zeros(240, dtype=torch.bool), torch.zeros(32, dtype=torch.int64)
    out = tree.build_tree_kernel_efficient(*args, TreeMaskMode.FULL_MASK, mask_buf, position_buf)
    assert out[0] is mask_buf and out[1] is position_buf
    assert torch.equal(mask_buf[: full.numel()], full) and mask_buf[full.numel() :].all()
    assert torch.equal(position_buf[:16], positions)


def random_trees(batch: int, size: int, seed: int):
    """Random trees whose parents precede their children (as NGRAM's and EAGLE's do)."""
    rng = random.Random(seed)
    return [[-1] + [rng.randrange(j) for j in range(1, size)] for _ in range(batch)]


def test_reconstruct_indices_from_tree_mask():
    batch, size = 3, 9
    trees = random_trees(batch, size, seed=0)
    tree_mask = torch.stack([ancestor_mask(p) for p in trees]).flatten()
    seq_lens = torch.tensor([4, 0, 11])
    positions = torch.empty(batch * size, dtype=torch.int64)
    index, next_token, next_sibling = (torch.empty(batch, size, dtype=torch.int64) for _ in range(3))
    tree.reconstruct_indices_from_tree_mask(tree_mask, seq_lens, positions, index, next_token, next_sibling, batch, size)
    for b, parents in enumerate(trees):
        for node in range(size):
            assert positions[b * size + node] == seq_lens[b] + depth_of(parents, node)
            kids = children_of(parents, node)
            assert next_token[b, node] == (kids[0] if kids else -1)
            if parents[node] == -1:
                assert next_sibling[b, node] == -1
            else:
                siblings = children_of(parents, parents[node])
                later = siblings[siblings.index(node) + 1 :]
                assert next_sibling[b, node] == (later[0] if later else -1)
    assert index.flatten().tolist() == list(range(batch * size))


def tree_inputs(trees):
    """``retrieve_*`` of ``trees`` (per request, parents) through the NGRAM reconstruction."""
    batch, size = len(trees), len(trees[0])
    tree_mask = torch.stack([ancestor_mask(p) for p in trees]).flatten()
    positions = torch.empty(batch * size, dtype=torch.int64)
    index, next_token, next_sibling = (torch.empty(batch, size, dtype=torch.int64) for _ in range(3))
    tree.reconstruct_indices_from_tree_mask(tree_mask, torch.zeros(batch, dtype=torch.int64), positions, index,
                                            next_token, next_sibling, batch, size)
    return index, next_token, next_sibling


def reference_greedy_walk(parents, candidates, target, steps):
    """Accepted nodes (local, root first): at each accepted node, the first child in index
    order whose token is the target's prediction there."""
    path = [0]
    while len(path) < steps:
        child = next((c for c in children_of(parents, path[-1]) if candidates[c] == target[path[-1]]), None)
        if child is None:
            break
        path.append(child)
    return path


@pytest.mark.parametrize("steps", [2, 4, 9])
def test_verify_tree_greedy(steps):
    batch, size, vocab = 6, 9, 3  # a small vocabulary: many children match
    trees = random_trees(batch, size, seed=steps)
    gen = torch.Generator().manual_seed(steps)
    candidates = torch.randint(vocab, (batch, size), generator=gen)
    target = torch.randint(vocab, (batch, size), generator=gen)
    index, next_token, next_sibling = tree_inputs(trees)
    predicts = torch.full((batch * size,), -7, dtype=torch.int32)
    accept_index = torch.zeros(batch, steps, dtype=torch.int32)
    accept_num = torch.zeros(batch, dtype=torch.int32)
    tree.verify_tree_greedy_func(predicts, accept_index, accept_num, candidates, index, next_token, next_sibling, target)
    for b, parents in enumerate(trees):
        path = reference_greedy_walk(parents, candidates[b].tolist(), target[b].tolist(), steps)
        assert accept_num[b] == len(path) - 1
        assert accept_index[b].tolist() == [b * size + n for n in path] + [-1] * (steps - len(path))
        for node in range(size):
            expected = target[b, node] if node in path else -7
            assert predicts[b * size + node] == expected


def sampled_verify(target_probs, trees, steps, coins, final_coins, threshold_single=1.0, threshold_acc=1.0):
    batch, size, _ = target_probs.shape
    index, next_token, next_sibling = tree_inputs(trees)
    candidates = torch.tensor([[0] + list(range(size - 1)) for _ in range(batch)])  # node j >= 1 drafts token j - 1
    predicts = torch.full((batch * size,), -7, dtype=torch.int32)
    accept_index = torch.zeros(batch, steps, dtype=torch.int32)
    accept_num = torch.zeros(batch, dtype=torch.int32)
    draft_probs = torch.zeros_like(target_probs)
    tree.tree_speculative_sampling_target_only(
        predicts, accept_index, accept_num, candidates, index, next_token, next_sibling, coins, final_coins,
        target_probs, draft_probs, threshold_single, threshold_acc,
    )
    return predicts, accept_index, accept_num


def test_sampled_verify_keeps_the_target_distribution():
    """Root with children drafting tokens 0, 1, 2 (vocabulary 5): the first output token must
    follow the target's distribution at the root, whatever the draft."""
    samples, size, vocab = 20000, 4, 5
    probs = torch.tensor([0.1, 0.3, 0.05, 0.4, 0.15])
    target_probs = probs.expand(samples, size, vocab).contiguous()
    gen = torch.Generator().manual_seed(0)
    coins, final_coins = torch.rand(samples, size, generator=gen), torch.rand(samples, generator=gen)
    trees = [[-1, 0, 0, 0]] * samples
    predicts, _, accept_num = sampled_verify(target_probs, trees, 2, coins, final_coins)
    first = predicts.view(samples, size)[:, 0].long()
    freq = torch.bincount(first, minlength=vocab).double() / samples
    assert (freq - probs.double()).abs().max() < 0.015, freq
    # a drafted token is accepted exactly when it is the output
    assert torch.equal(accept_num == 1, first < 3)


def test_sampled_verify_walk():
    """Deterministic coins: 0 accepts the first child at every level; 1 rejects every child
    (their target mass leaves the final distribution)."""
    size, vocab = 4, 6
    trees = [[-1, 0, 1, 2]]  # a chain: node j drafts token j - 1
    probs = torch.tensor([[0.2, 0.1, 0.3, 0.1, 0.1, 0.2]]).expand(1, size, vocab).contiguous()
    predicts, accept_index, accept_num = sampled_verify(probs, trees, 4, torch.zeros(1, size), torch.tensor([0.0]))
    assert accept_num.tolist() == [3] and accept_index.tolist() == [[0, 1, 2, 3]]
    assert predicts.tolist() == [0, 1, 2, 0]  # the bonus: inverse CDF at 0 -> token 0
    trees = [[-1, 0, 0, 0]]  # three children of the root, tokens 0, 1, 2
    coins = torch.ones(1, size)
    predicts, accept_index, accept_num = sampled_verify(probs, trees, 2, coins, torch.tensor([0.0]))
    assert accept_num.tolist() == [0] and accept_index.tolist() == [[0, -1]]
    assert predicts[0] == 3  # tokens 0-2 rejected: the first of the rest
    predicts, _, _ = sampled_verify(probs, trees, 2, coins, torch.tensor([0.999]))
    assert predicts[0] == 5


def test_top_k_top_p_renorm():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25]])
    top_k = tree.top_k_renorm_prob(probs, torch.tensor([2, 1 << 30]))
    assert torch.allclose(top_k, torch.tensor([[0, 4 / 7, 0, 3 / 7], [0.25] * 4]))
    top_p = tree.top_p_renorm_prob(probs, torch.tensor([0.6, 1.0]))
    assert torch.allclose(top_p, torch.tensor([[0, 4 / 7, 0, 3 / 7], [0.25] * 4]))
    assert torch.allclose(tree.top_p_renorm_prob(probs, torch.tensor([0.4, 0.1]))[0], torch.tensor([0.0, 1, 0, 0]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels run natively")
def test_triton_stand_ins_in_the_interpreter():
    """The PyTorch stand-ins against SGLang's Triton kernels, run by Triton's interpreter in a
    child process (no other test runs with the interpreter on)."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         os.path.join(GPU_TESTS, "test_gpu_speculative_kernels.py"), "-k", "triton"],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


def test_test_mode_refuses_other_devices():
    from types import SimpleNamespace

    from sglang_dcp.server_args import DCPConfigError
    from sglang_dcp.test.speculative_cpu import check_cpu_speculation_args

    with pytest.raises(DCPConfigError, match="SGLANG_DCP_TEST_CPU_SPECULATION=1 replaces CUDA kernels"):
        check_cpu_speculation_args(None, SimpleNamespace(device="cuda"))


# ---- end to end: speculation against no speculation, dcp 1 ---------------------------------

SPECULATION_ENV = {"SGLANG_DCP_TEST_CPU_SPECULATION": "1"}
LOGPROB_TOL = 1e-4  # float32
VOCAB_SIZE = 1024
CHUNKED_PREFILL_SIZE = 64
MAX_NEW_TOKENS = 16
STEPS = 3  # draft steps: topk 1 verifies a chain of STEPS + 1 tokens, topk 4 a tree of 8


def speculative_scenario(max_new_tokens: int) -> list:
    """Greedy prompts of 1, 17 and 150 tokens (two chunks of prefill) and two repetitive ones
    (NGRAM drafts from them); then radix-cache prefix hits; then seeded sampling."""
    from sglang_dcp.test.engine_compare import Batch, random_ids

    rng = random.Random(0)
    motif = random_ids(rng, 8, VOCAB_SIZE)
    repetitive = [motif * 6, random_ids(rng, 3, VOCAB_SIZE) * 10]
    prompts = [random_ids(rng, n, VOCAB_SIZE) for n in (1, 17, 150)] + repetitive
    extended = [prompts[2] + random_ids(rng, 9, VOCAB_SIZE), repetitive[0] + motif]
    greedy = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
    sampled = {"max_new_tokens": max_new_tokens, "temperature": 0.8, "top_p": 0.9, "sampling_seed": 1234}
    return [Batch(prompts, greedy), Batch(extended, greedy), Batch(prompts[1:4], sampled)]


def engine_kwargs(tp_size: int, **overrides) -> dict:
    from sglang_dcp.test.serving import bind_cpu_threads

    bind_cpu_threads(tp_size)
    return dict(
        device="cpu", tp_size=tp_size, dtype="float32", attention_backend="torch_native",
        mem_fraction_static=0.3, max_total_tokens=2048, chunked_prefill_size=CHUNKED_PREFILL_SIZE,
        max_running_requests=8, skip_tokenizer_init=True, grammar_backend="none", disable_cuda_graph=True,
        random_seed=0, log_level="error", **overrides,
    )  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A three-layer Llama target (4 query heads, 1 KV head), an EAGLE draft that echoes the
    target's last prediction (accepted where the target repeats itself) and a random EAGLE3
    draft (reading the hidden states before target layers 1 and 2)."""
    from sglang_dcp.test.models import write_random_eagle_draft, write_random_gqa_model

    root = tmp_path_factory.mktemp("speculative")
    target = write_random_gqa_model(
        str(root / "target"), num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=3,
        vocab_size=VOCAB_SIZE, architecture="LlamaForCausalLM",
    )  # fmt: skip
    return {
        "target": target,
        "EAGLE": write_random_eagle_draft(str(root / "eagle"), target, echo=True),
        "EAGLE3": write_random_eagle_draft(str(root / "eagle3"), target, eagle3=True),
        "STANDALONE": target,
    }


@pytest.mark.parametrize("eagle3", [False, True], ids=["eagle", "eagle3"])
def test_draft_takes_the_target_dtype(tmp_path, eagle3):
    """A draft in the target's dtype: a float32 draft of a bfloat16 target loads in float16
    under ``dtype="auto"`` and fails at ``fc`` (met on the GPU, 2026-12-07)."""
    from safetensors.torch import load_file
    from sglang_dcp.test.models import write_dummy_gqa_model, write_random_eagle_draft
    from transformers import AutoConfig

    target = write_dummy_gqa_model(str(tmp_path / "target"), num_attention_heads=4, num_key_value_heads=1,
                                   architecture="LlamaForCausalLM", torch_dtype="bfloat16")
    draft = write_random_eagle_draft(str(tmp_path / "draft"), target, eagle3=eagle3)
    assert AutoConfig.from_pretrained(draft).dtype == torch.bfloat16
    assert {t.dtype for t in load_file(os.path.join(draft, "model.safetensors")).values()} == {torch.bfloat16}


NGRAM_ARGS = """
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.server_args import ServerArgs
args = ServerArgs(model_path={model!r}, device="cpu", attention_backend="torch_native",
                  speculative_algorithm="NGRAM", skip_tokenizer_init=True)
print("NGRAM accepted, draft tokens", args.speculative_num_draft_tokens)
"""


@pytest.mark.parametrize("test_mode", [False, True])
def test_ngram_on_cpu_needs_the_test_mode(models, test_mode):
    """Stock SGLang refuses NGRAM on CPU; the test mode, and only it, lets it through (in a
    fresh interpreter: plugins load once per process)."""
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_DCP_TEST_CPU_SPECULATION"}
    run = subprocess.run(
        [sys.executable, "-c", NGRAM_ARGS.format(model=models["target"])],
        env={**env, **(SPECULATION_ENV if test_mode else {})}, capture_output=True, text=True,
    )  # fmt: skip
    if test_mode:
        assert run.returncode == 0 and "NGRAM accepted, draft tokens 12" in run.stdout, run.stderr[-2000:]
    else:
        assert run.returncode != 0 and "Ngram speculative decoding only supports CUDA device" in run.stderr


def speculation(algorithm: str, topk: int, models) -> dict:
    if algorithm == "NGRAM":
        return dict(speculative_algorithm="NGRAM", speculative_num_draft_tokens=8)
    return dict(
        speculative_algorithm=algorithm, speculative_draft_model_path=models[algorithm],
        speculative_num_steps=STEPS, speculative_eagle_topk=topk,
        speculative_num_draft_tokens=STEPS + 1 if topk == 1 else 2 * (STEPS + 1),
    )  # fmt: skip


_references = {}


def no_speculation(models, tp_size: int):
    """The reference run, ``STEPS`` tokens longer than the speculative runs (what the last
    verify pass may accept beyond them); kept for every case of its tp size."""
    from sglang_dcp.test.engine_compare import run_engine_isolated

    if tp_size not in _references:
        _references[tp_size] = run_engine_isolated(
            models["target"], speculative_scenario(MAX_NEW_TOKENS + STEPS), **engine_kwargs(tp_size)
        )
    return _references[tp_size]


def greedy_prefix(run, num_tokens: int):
    """``run``'s greedy requests with their first ``num_tokens`` output tokens."""
    import dataclasses

    cut = [
        dataclasses.replace(r, output_ids=r.output_ids[:num_tokens], token_logprobs=r.token_logprobs[:num_tokens],
                            top_logprobs=r.top_logprobs[:num_tokens], top_ids=r.top_ids[:num_tokens])
        for r in run.results if r.greedy
    ]  # fmt: skip
    return dataclasses.replace(run, results=cut)


def standalone_prediction(prompt, output, steps: int, num_tokens: int, continuations):
    """STANDALONE's ``(verify passes, accept histogram)`` for a request, when the draft is the
    target. SGLang feeds a draft the sequence shifted by one token (each position holds the
    next token), so with ``L`` tokens committed the draft proposes the target's greedy
    continuation of ``seq[1 : L + 1]`` (``continuations[L]``), and the verify accepts it as far
    as it matches ``seq[L + 1 :]``; the prefill gives the first token, each verify pass the
    accepted drafts and one more, until ``num_tokens``."""
    seq = prompt + output
    committed, produced, histogram = len(prompt), 1, [0] * (steps + 1)
    while produced < num_tokens:
        draft = continuations[committed]
        accepted = 0
        while accepted < steps and draft[accepted] == seq[committed + 1 + accepted]:
            accepted += 1
        histogram[accepted] += 1
        produced += accepted + 1
        committed += accepted + 1
    while histogram[-1] == 0:  # as SGLang reports it: up to the most drafts accepted
        histogram.pop()
    return sum(histogram), histogram


def predicted_standalone_lengths(models, reference):
    """``standalone_prediction`` for the first batch's greedy requests (no radix hit), from
    one no-speculation run over every prefix they go through."""
    from sglang_dcp.test.engine_compare import Batch, run_engine_isolated

    requests = speculative_scenario(MAX_NEW_TOKENS)[0].input_ids
    seqs = [prompt + r.output_ids for prompt, r in zip(requests, reference.results)]
    points = [(i, length) for i, prompt in enumerate(requests) for length in range(len(prompt), len(seqs[i]))]
    batch = Batch([seqs[i][1 : length + 1] for i, length in points],
                  {"max_new_tokens": STEPS, "temperature": 0.0}, return_logprob=False)  # fmt: skip
    run = run_engine_isolated(models["target"], [batch], **engine_kwargs(1))
    continuations = {point: r.output_ids for point, r in zip(points, run.results)}
    return [
        standalone_prediction(prompt, r.output_ids, STEPS, MAX_NEW_TOKENS,
                              {length: continuations[(i, length)] for (j, length) in points if j == i})
        for i, (prompt, r) in enumerate(zip(requests, reference.results))
    ]  # fmt: skip


@pytest.mark.e2e
@pytest.mark.parametrize(
    "algorithm,topk,tp_size,overlap",
    [
        ("NGRAM", 1, 1, False),
        ("EAGLE", 1, 2, True),
        ("EAGLE", 4, 1, True),
        ("EAGLE3", 1, 1, False),
        ("EAGLE3", 4, 2, True),
        ("STANDALONE", 1, 1, True),
        ("STANDALONE", 4, 2, False),
    ],
    ids=["ngram-tp1", "eagle-topk1-tp2", "eagle-topk4-tp1", "eagle3-topk1-tp1", "eagle3-topk4-tp2",
         "standalone-topk1-tp1", "standalone-topk4-tp2"],
)  # fmt: skip
def test_speculation_matches_no_speculation(models, algorithm, topk, tp_size, overlap):
    """Every greedy request gives the tokens of the run without speculation, top-5 logprobs
    within ``LOGPROB_TOL``; every request was verified (accept histograms reported). NGRAM
    gives more than 2 tokens per verify pass over the greedy requests, EAGLE's echo draft and
    STANDALONE have drafts accepted, STANDALONE topk 1 exactly the predicted ones."""
    from sglang_dcp.test.engine_compare import compare, run_engine_isolated

    reference = no_speculation(models, tp_size)
    run = run_engine_isolated(
        models["target"], speculative_scenario(MAX_NEW_TOKENS), env=SPECULATION_ENV,
        **engine_kwargs(tp_size, disable_overlap_schedule=not overlap), **speculation(algorithm, topk, models),
    )  # fmt: skip
    agreement = compare(greedy_prefix(reference, MAX_NEW_TOKENS), greedy_prefix(run, MAX_NEW_TOKENS))
    lengths = [(r.spec_verify_ct, r.spec_accept_histogram) for r in run.results]
    mean_accept = [MAX_NEW_TOKENS / ct for ct, _ in lengths]
    print(f"{algorithm} topk {topk} tp {tp_size}: {agreement}; (verify passes, accept histogram) {lengths}; "
          f"mean accept length {[round(m, 2) for m in mean_accept]}")  # fmt: skip
    assert agreement.identical_requests == agreement.num_requests == 7, agreement
    assert agreement.max_logprob_diff < LOGPROB_TOL, agreement
    for r, (verify_ct, histogram) in zip(run.results, lengths):
        assert len(r.output_ids) == MAX_NEW_TOKENS
        assert verify_ct > 0 and sum(histogram) == verify_ct
        # the prefill gives one token, each verify pass its accepted drafts and one more
        assert MAX_NEW_TOKENS - 1 <= sum((1 + a) * n for a, n in enumerate(histogram)) <= MAX_NEW_TOKENS - 2 + len(histogram)
    if algorithm == "NGRAM":  # the random model's outputs repeat themselves, as do some prompts
        greedy_verifies = sum(ct for r, (ct, _) in zip(run.results, lengths) if r.greedy)
        assert agreement.num_requests * MAX_NEW_TOKENS / greedy_verifies > 2, lengths
    if algorithm in ("EAGLE", "STANDALONE"):
        assert sum(a * n for _, histogram in lengths for a, n in enumerate(histogram)) > 0, lengths
    if algorithm == "STANDALONE" and topk == 1:
        assert lengths[:5] == predicted_standalone_lengths(models, reference)
