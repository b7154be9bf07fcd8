"""End to end on CPU: speculative decoding under DCP, against dcp 1 with the same speculative
settings and against no speculation, on the same float32 random weights.

SGLang 0.5.14 runs speculation on CUDA only; these engines run in the CPU speculation test
mode (``SGLANG_DCP_TEST_CPU_SPECULATION=1``, ``sglang_dcp.test.speculative_cpu``), each in a
fresh process that loads the plugins with it. Under DCP the product's backends run the verify,
draft extend and draft decode passes and its KV moves; the test mode only stands in for
SGLang's CUDA kernels. Every case runs one scenario: prompts of mixed lengths, one longer
than the chunked-prefill size, two repetitive ones (NGRAM drafts from them), then radix-cache
prefix hits, then seeded sampling. Each DCP run must give, against dcp 1 with the same
settings, identical tokens (greedy and sampled), top-5 logprobs within ``LOGPROB_TOL``, the
same verify passes and accept-length histogram per request and D x the logical KV capacity;
against no speculation, identical greedy tokens and logprobs within ``LOGPROB_TOL``.

Drafts: NGRAM; EAGLE with a one-layer draft that echoes the target's last prediction
(``models.write_random_eagle_draft(echo=True)``: accepted where the target repeats itself);
EAGLE3 with a random one-layer draft (rarely accepted: it proves the target's output is
unchanged); STANDALONE with the target as its own draft (SGLang feeds a draft the sequence
shifted by one token, so it drafts the target's tokens often, not always). ``--dcp-comm`` a2a and lse alternate over
the cases, NGRAM runs both. Beyond the scenario: D = 4, page size 16 with a tree (compared
with dcp 1 at page size 1: the same arithmetic), memory pressure (retractions) and aborts.
"""

import random
from typing import Dict, List

import pytest

from sglang_dcp.test.engine_compare import (
    Batch,
    EngineRun,
    compare,
    eagle_settings,
    greedy_only,
    pressure_scenario,
    random_ids,
    run_engine_isolated,
    speculation_figures,
    speculative_scenario,
)
from sglang_dcp.test.models import write_random_eagle_draft, write_random_gqa_model
from sglang_dcp.test.serving import bind_cpu_threads

pytestmark = pytest.mark.e2e

SPECULATION_ENV = {"SGLANG_DCP_TEST_CPU_SPECULATION": "1"}
LOGPROB_TOL = 1e-4  # float32; DCP only reorders the softmax sums
VOCAB_SIZE = 1024
CHUNKED_PREFILL_SIZE = 64
MAX_NEW_TOKENS = 16
STEPS = 3  # draft steps; topk 1 verifies a chain of STEPS + 1 tokens
PROMPT_LENGTHS = [1, 17, 150]  # 150 > CHUNKED_PREFILL_SIZE


def cpu_engine_kwargs(tp_size: int, **overrides) -> Dict:
    bind_cpu_threads(tp_size)
    return {**dict(
        device="cpu", tp_size=tp_size, dtype="float32", mem_fraction_static=0.3,
        max_total_tokens=2048, chunked_prefill_size=CHUNKED_PREFILL_SIZE, max_running_requests=8,
        skip_tokenizer_init=True, grammar_backend="none", disable_cuda_graph=True, random_seed=0,
        log_level="error",
    ), **overrides}  # fmt: skip


def eagle(topk: int, draft: str, algorithm: str = "EAGLE") -> Dict:
    return eagle_settings(topk, draft, STEPS, algorithm)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Llama targets (4 query heads at tp 2 and 8 at tp 4, one KV head) and their drafts: an
    EAGLE draft that echoes the target's last prediction (accepted where the target repeats
    itself, so accept lengths and the tree's KV moves are exercised) and a random EAGLE3 one."""
    root = tmp_path_factory.mktemp("spec_models")
    paths = {}
    for name, heads in (("tp2", 4), ("tp4", 8)):
        target = write_random_gqa_model(
            str(root / name), num_attention_heads=heads, num_key_value_heads=1,
            vocab_size=VOCAB_SIZE, architecture="LlamaForCausalLM",
        )  # fmt: skip
        paths[name] = target
        paths[f"{name}-eagle"] = write_random_eagle_draft(str(root / f"{name}-eagle"), target, echo=True)
        paths[f"{name}-eagle3"] = write_random_eagle_draft(str(root / f"{name}-eagle3"), target, eagle3=True)
    return paths


_runs: Dict = {}


def run(model: str, scenario_name: str, scenario: List[Batch], **kwargs) -> EngineRun:
    """One engine run in its own process, in the CPU speculation test mode; kept for the
    cases that share it (the references)."""
    key = (model, scenario_name, tuple(sorted(kwargs.items())))
    if key not in _runs:
        _runs[key] = run_engine_isolated(model, scenario, env=SPECULATION_ENV, **kwargs)
    return _runs[key]


def accept_lengths(engine_run: EngineRun) -> List:
    """Per compared request: its verify passes and how many accepted 0, 1, ... drafts."""
    return [(r.spec_verify_ct, r.spec_accept_histogram) for r in engine_run.results if not r.aborted]


def check_against_references(label, candidate, same_settings, no_speculation, dcp_size, accept_requests=None):
    """The DCP run against dcp 1 with the same speculative settings (tokens, logprobs, accept
    lengths of the first ``accept_requests`` requests (all if None), capacity) and against no
    speculation (greedy tokens and logprobs)."""
    agreement = compare(same_settings, candidate)
    baseline = compare(greedy_only(no_speculation), greedy_only(candidate))
    figures = speculation_figures(candidate)
    verifies, accepted = figures["verify_passes"], figures["accepted_drafts"]
    print(f"{label}: vs dcp 1 {agreement.identical_requests}/{agreement.num_requests} identical, "
          f"logprobs within {agreement.max_logprob_diff:.2g}; vs no speculation "
          f"{baseline.identical_requests}/{baseline.num_requests} greedy identical, "
          f"{baseline.max_logprob_diff:.2g}; {verifies} verify passes, {accepted} drafts accepted; "
          f"capacity {same_settings.capacity} -> {candidate.capacity}")  # fmt: skip
    assert candidate.capacity == dcp_size * same_settings.capacity
    assert agreement.identical_requests == agreement.num_requests, agreement
    assert agreement.max_logprob_diff < LOGPROB_TOL, agreement
    assert accept_lengths(candidate)[:accept_requests] == accept_lengths(same_settings)[:accept_requests]
    assert baseline.identical_requests == baseline.num_requests, baseline
    assert baseline.max_logprob_diff < LOGPROB_TOL, baseline
    assert verifies > 0, "no verify pass: speculation did not run"
    return accepted, verifies


# (case, target, speculative settings by models, --dcp-comm paths)
CASES = [
    ("ngram", lambda m: dict(speculative_algorithm="NGRAM", speculative_num_draft_tokens=4), ["a2a", "lse"]),
    ("eagle-topk1", lambda m: eagle(1, m["tp2-eagle"]), ["a2a"]),
    ("eagle-topk4", lambda m: eagle(4, m["tp2-eagle"]), ["lse"]),
    ("eagle3-topk1", lambda m: eagle(1, m["tp2-eagle3"], "EAGLE3"), ["lse"]),
    ("standalone-topk1", lambda m: eagle(1, m["tp2"], "STANDALONE"), ["a2a"]),
    ("standalone-topk4", lambda m: eagle(4, m["tp2"], "STANDALONE"), ["lse"]),
]  # fmt: skip


@pytest.mark.parametrize(
    "case, settings, comm", [(c, s, comm) for c, s, comms in CASES for comm in comms],
    ids=[f"{c}-{comm}" for c, _, comms in CASES for comm in comms],
)
def test_speculation_tp2_dcp2(models, case, settings, comm):
    spec = settings(models)
    scenario = speculative_scenario(VOCAB_SIZE, PROMPT_LENGTHS, MAX_NEW_TOKENS)
    kwargs = cpu_engine_kwargs(2)
    no_speculation = run(models["tp2"], "mixed", scenario, dcp_size=1, **kwargs)
    same_settings = run(models["tp2"], "mixed", scenario, dcp_size=1, **spec, **kwargs)
    candidate = run(models["tp2"], "mixed", scenario, dcp_size=2, dcp_comm=comm, **spec, **kwargs)
    accepted, verifies = check_against_references(f"{case} {comm}", candidate, same_settings, no_speculation, 2)
    if not case.startswith("eagle3"):
        assert accepted > 0, "NGRAM, the echo draft and the target as its own draft get drafts accepted"


@pytest.mark.parametrize("algorithm, comm", [("STANDALONE", "a2a"), ("EAGLE", "lse")])
def test_speculation_page16_tree(models, algorithm, comm):
    """Page size 16 (logical page 32) with a tree (topk 4; STANDALONE with the target as its
    draft, EAGLE with the echo draft): each branch's draft
    slots start page-aligned, with a copy of the prefix's last partial page (a KV move in the
    draft's pool); against dcp 1 at page size 1, whose arithmetic is the same (SGLang runs no
    tree at page size > 1 on torch_native: its page-aligned branches are the FlashInfer path's).
    Greedy requests only: a logical page of 32 moves chunk boundaries and so changes which
    requests share a batch, and SGLang draws a batch's sampling coins from one random stream.
    Accept lengths only for the first batch (no radix hits): a prefix hit ends on a page
    boundary, and a draft's cached KV at the hit's last slot was written for the token that
    followed it in the cached sequence (drafts read the sequence shifted by one), so where the
    hit ends decides whether that slot is stale, and with it the next drafts. Seen (STANDALONE): a prompt
    extending a cached 150-token one took 7 verify passes at page 1 (a hit of all 150 tokens,
    the last draft slot written for the old request's first output token) and 6 at page 16
    (a hit of 128); with the radix cache off, all 8 greedy requests' accept lengths agree
    (``benchmark/dcp/spec_cpu_diagnostics.py radix``)."""
    spec = eagle(4, models["tp2"] if algorithm == "STANDALONE" else models["tp2-eagle"], algorithm)
    scenario = speculative_scenario(VOCAB_SIZE, PROMPT_LENGTHS, MAX_NEW_TOKENS)
    kwargs = cpu_engine_kwargs(2)
    no_speculation = run(models["tp2"], "mixed", scenario, dcp_size=1, **kwargs)
    same_settings = run(models["tp2"], "mixed", scenario, dcp_size=1, **spec, **kwargs)
    candidate = run(models["tp2"], "mixed", scenario, dcp_size=2, dcp_comm=comm, page_size=16, **spec, **kwargs)
    fresh_prompts = len(scenario[0].input_ids)
    accepted, _ = check_against_references(
        f"{algorithm.lower()}-topk4 page16 {comm} (greedy)", greedy_only(candidate), greedy_only(same_settings),
        no_speculation, 2, accept_requests=fresh_prompts,
    )
    assert accepted > 0


def test_speculation_dcp4(models):
    """D = 4 (tp 4, one KV head): EAGLE's tree (topk 4) over a logical page of 4."""
    spec = eagle(4, models["tp4-eagle"])
    scenario = speculative_scenario(VOCAB_SIZE, PROMPT_LENGTHS, MAX_NEW_TOKENS)
    kwargs = cpu_engine_kwargs(4)
    no_speculation = run(models["tp4"], "mixed", scenario, dcp_size=1, **kwargs)
    same_settings = run(models["tp4"], "mixed", scenario, dcp_size=1, **spec, **kwargs)
    candidate = run(models["tp4"], "mixed", scenario, dcp_size=4, **spec, **kwargs)
    accepted, _ = check_against_references("eagle-topk4 dcp4", candidate, same_settings, no_speculation, 4)
    assert accepted > 0


LOGICAL_CAPACITY = 1024
# SGLang's memory checks: every idle moment (a leak raises) and every busy step (asserts)
STRICT_MEM_CHECKS = {
    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1",
    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1",
}


def test_speculation_under_memory_pressure(models):
    """A tree (STANDALONE topk 4: accepted paths move KV) with a load over 4x the same logical pool
    of 1024 tokens for dcp 1 and 2: both retract decodes and evict radix pages (SGLang's
    counters); identical greedy tokens and logprobs; SGLang's strict memory checks and DCP's
    allocator-replica check on (a leak raises in the scheduler). The scheduler runs without
    overlap here (SGLang's other speculative schedule): with overlap, SGLang 0.5.14 drops the
    first token's logprob of a request retracted between its prefill's launch and its result
    (the skipped result still streams it with no token, and the streamer's logprob offset
    becomes ``max(len(output_ids), 1)`` = 1), which the dcp 2 run's retraction timing reaches
    (docs/speculative-decoding.md, "Memory pressure"); tokens are unaffected."""
    spec = eagle(4, models["tp2"], "STANDALONE")
    scenario = pressure_scenario(VOCAB_SIZE, num_prompts=24, max_new_tokens=32)
    kwargs = cpu_engine_kwargs(2, enable_metrics=True, max_running_requests=24, disable_overlap_schedule=True)
    runs = {
        dcp: run_engine_isolated(
            models["tp2"], scenario, env={**SPECULATION_ENV, **STRICT_MEM_CHECKS}, dcp_size=dcp,
            **spec, **{**kwargs, "max_total_tokens": LOGICAL_CAPACITY // dcp},
        )
        for dcp in (1, 2)
    }  # fmt: skip
    agreement = compare(runs[1], runs[2])
    for dcp, engine_run in runs.items():
        print(f"pressure dcp {dcp}: capacity {engine_run.capacity}, {engine_run.counts.retracted_requests} "
              f"retractions, {engine_run.counts.evicted_tokens} tokens evicted, "
              f"{sum(r.spec_verify_ct for r in engine_run.results)} verify passes")  # fmt: skip
    print(f"pressure: {agreement}")
    assert runs[1].capacity == runs[2].capacity == LOGICAL_CAPACITY
    for engine_run in runs.values():
        assert engine_run.counts.retracted_requests > 0 and engine_run.counts.evicted_tokens > 0, engine_run.counts
    assert agreement.identical_requests == agreement.num_requests, agreement
    assert agreement.max_logprob_diff < LOGPROB_TOL, agreement


def test_speculation_aborts(models):
    """Requests aborted mid-decode (a STANDALONE tree) free their speculative
    over-allocation: with SGLang's strict idle check and DCP's allocator-replica check on, the
    engine stays up and the same prompts sent again give dcp 1's tokens."""
    rng = random.Random(1)
    prompts = [random_ids(rng, n, VOCAB_SIZE) for n in (3, 40, 150)] + [random_ids(rng, 4, VOCAB_SIZE) * 8]
    greedy = {"max_new_tokens": 48, "temperature": 0.0}
    scenario = [Batch(prompts, greedy, abort_after_tokens=4), Batch(prompts, greedy)]
    spec = eagle(4, models["tp2"], "STANDALONE")
    runs = {
        dcp: run_engine_isolated(models["tp2"], scenario, env={**SPECULATION_ENV, **STRICT_MEM_CHECKS},
                                 dcp_size=dcp, **spec, **cpu_engine_kwargs(2))
        for dcp in (1, 2)
    }  # fmt: skip
    aborted = [sum(r.aborted for r in engine_run.results) for engine_run in runs.values()]
    agreement = compare(runs[1], runs[2])
    print(f"aborts: aborted {aborted} (dcp 1, dcp 2) of {len(prompts)}; then {agreement}")
    assert aborted[1] > 0, "no request was aborted"
    assert agreement.num_requests >= len(prompts) and agreement.identical_requests == agreement.num_requests
    assert accept_lengths(runs[2])[-len(prompts):] == accept_lengths(runs[1])[-len(prompts):]
