"""End to end on CPU under load: DCP against dcp 1 where SGLang's scheduler is pressed.

* Memory pressure: the same logical KV pool for both runs (1024 tokens: ``max_total_tokens``
  sizes each rank's physical pool, so dcp 2 gets half the rows per rank) and a load over 4x
  that pool, so the scheduler queues, retracts running decodes (decode out of KV memory) and
  evicts radix-cache pages, then replays the earlier prompts (prefix hits on what survived).
  Identical greedy tokens for every request, retractions and evictions counted by SGLang's
  scheduler metrics in both runs, and SGLang's strict memory checks on (a leak raises in the
  scheduler, which ends the engine's process and fails the run).
* Mixed batches (``enable_mixed_chunk``): a prompt of several chunks arrives while others
  decode, so its chunks run in one forward pass with their decode steps (seen in both runs
  as the decoding requests' progress while the prompt prefills); identical greedy tokens.

Float32 random weights, dcp 1 on the same weights as the reference. ``-s`` prints the counts.
"""

import random
import time

import pytest
from test_e2e_cpu import CHUNKED_PREFILL_SIZE, LOGPROB_TOL, VOCAB_SIZE, cpu_engine_kwargs

from sglang_dcp.test.engine_compare import (
    Batch,
    compare,
    pressure_scenario,
    random_ids,
    run_engine,
    run_engine_isolated,
)
from sglang_dcp.test.models import write_random_gqa_model

pytestmark = pytest.mark.e2e

LOGICAL_CAPACITY = 1024
# SGLang's memory checks: every idle moment (a leak raises) and every busy step (asserts)
STRICT_MEM_CHECKS = {
    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1",
    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1",
}


def test_memory_pressure_retract_evict(tmp_path):
    model = write_random_gqa_model(
        str(tmp_path / "model"), num_attention_heads=4, num_key_value_heads=1, vocab_size=VOCAB_SIZE
    )
    scenario = pressure_scenario(VOCAB_SIZE, num_prompts=24, max_new_tokens=32)
    load = sum(len(p) + b.sampling_params["max_new_tokens"] for b in scenario for p in b.input_ids)
    kwargs = {**cpu_engine_kwargs(2), "enable_metrics": True}

    runs, wall = {}, {}
    for dcp_size in (1, 2):
        start = time.time()
        runs[dcp_size] = run_engine_isolated(
            model, scenario, env=STRICT_MEM_CHECKS, dcp_size=dcp_size,
            **{**kwargs, "max_total_tokens": LOGICAL_CAPACITY // dcp_size},
        )
        wall[dcp_size] = time.time() - start
    reference, candidate = runs[1], runs[2]

    agreement = compare(reference, candidate)
    num_first = len(scenario[0].input_ids)
    for dcp_size, run in runs.items():
        replay_hits = sum(r.cached_tokens > 0 for r in run.results[num_first:])
        print(
            f"dcp {dcp_size}: capacity {run.capacity} tokens, load {load} tokens "
            f"({load / run.capacity:.1f}x) in {len(run.results)} requests, "
            f"{run.counts.retracted_requests} retractions "
            f"({sum(r.num_retractions > 0 for r in run.results)} requests retracted), "
            f"{run.counts.evicted_tokens} tokens evicted, "
            f"{replay_hits}/{len(run.results) - num_first} replayed prompts hit the cache, "
            f"{wall[dcp_size]:.0f} s"
        )
    print(f"memory pressure: {agreement}")

    assert reference.capacity == candidate.capacity == LOGICAL_CAPACITY
    assert load >= 4 * LOGICAL_CAPACITY
    for run in runs.values():
        assert run.counts.retracted_requests > 0, run.counts
        assert run.counts.retracted_requests == sum(r.num_retractions for r in run.results)
        assert run.counts.evicted_tokens > 0, run.counts
        assert any(r.cached_tokens > 0 for r in run.results[num_first:])
    assert agreement.identical_requests == agreement.num_requests, agreement
    assert agreement.max_logprob_diff < LOGPROB_TOL, agreement


LATE_PROMPT_CHUNKS = 10


def mixed_chunk_scenario(seed: int = 0):
    """Four short greedy prompts that decode 40 tokens; once they decode, a prompt of
    ``LATE_PROMPT_CHUNKS`` chunks and one that extends the first short prompt (a cached
    prefix) by two more. No logprobs: SGLang mixes no batch that returns them."""
    rng = random.Random(seed)
    short = [random_ids(rng, n, VOCAB_SIZE) for n in (5, 9, 17, 30)]
    late = [
        random_ids(rng, LATE_PROMPT_CHUNKS * CHUNKED_PREFILL_SIZE, VOCAB_SIZE),
        short[0] + random_ids(rng, 2 * CHUNKED_PREFILL_SIZE, VOCAB_SIZE),
    ]
    return [
        Batch(short, {"max_new_tokens": 40, "temperature": 0.0}, return_logprob=False),
        Batch(late, {"max_new_tokens": 16, "temperature": 0.0}, while_previous_decodes=True,
              return_logprob=False),
    ]


def test_mixed_chunk_prefill_while_decoding(tmp_path):
    """The late prompts take 12 chunked passes; unmixed, the short requests would decode
    only in the few steps before the scheduler takes them in; mixed, one token a pass."""
    model = write_random_gqa_model(
        str(tmp_path / "model"), num_attention_heads=4, num_key_value_heads=1, vocab_size=VOCAB_SIZE
    )
    scenario = mixed_chunk_scenario()
    kwargs = {**cpu_engine_kwargs(2), "enable_mixed_chunk": True}

    runs, wall = {}, {}
    for dcp_size in (1, 2):
        start = time.time()
        runs[dcp_size] = run_engine(model, scenario, dcp_size=dcp_size, **kwargs)
        wall[dcp_size] = time.time() - start
    reference, candidate = runs[1], runs[2]

    agreement = compare(reference, candidate)
    for dcp_size, run in runs.items():
        print(
            f"dcp {dcp_size}: {len(run.results)} requests; each decoding request streamed "
            f">= {run.counts.decoded_while_prefilling} tokens while the late prompts "
            f"({LATE_PROMPT_CHUNKS} + 2 chunks) prefilled; cached tokens "
            f"{[r.cached_tokens for r in run.results]}; {wall[dcp_size]:.0f} s"
        )
    print(f"mixed chunk: {agreement}")

    for run in runs.values():
        assert run.counts.decoded_while_prefilling >= LATE_PROMPT_CHUNKS // 2, run.counts
        assert run.results[-1].cached_tokens > 0  # the prompt that extends a short one
    assert agreement.identical_requests == agreement.num_requests, agreement
