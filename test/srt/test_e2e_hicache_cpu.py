"""End to end on CPU: HiCache (``--enable-hierarchical-cache``) under DCP, against dcp 1 with the
same HiCache settings and against no HiCache, on the same float32 random weights.

SGLang 0.5.14 runs HiCache on GPUs only; these engines run in the CPU HiCache test mode
(``SGLANG_DCP_TEST_CPU_HICACHE=1``, ``sglang_dcp.test.hicache_cpu``: unpinned host pool,
PyTorch copies), each in a fresh process, with SGLang's strict idle and busy memory checks on:
a leaked device slot, a leaked host slot or DCP ranks whose allocators (device, and host free
counts) disagree at idle raise in the scheduler and fail the run. Every engine has the same
``ROWS_PER_RANK`` device rows per rank and the same ``--hicache-ratio``, so a dcp D engine holds
D x the logical tokens on device and on host, and an L3 ``file`` store of its own.

The scenario (``engine_compare.hicache_scenario``): seeded sampling on the empty pool, then a
working set of 12 prompts, over the device pool of every run, sent in two halves and revisited
(device evictions, load-backs from the host tier, L3 prefetches where the host tier evicted
too), requests aborted mid-decode, and after ``flush_cache`` (device and host tiers emptied) prompts whose
prefixes only L3 still holds. Each DCP run must give identical tokens (greedy and sampled) and
top-5 logprobs within ``LOGPROB_TOL`` against both references, exactly D x the device and host
capacity, and device evictions, load-backs, L3 writes and hits after the flush (counts > 0).

Cases, spreading HiCache's settings over the DCP configurations (each against dcp 1 with its own):
tp 2 / dcp 2 with SGLang's default layout ``page_first`` (kernel I/O) and ``write_through``,
both ``--dcp-comm``; tp 4 / dcp 4 with ``page_first_direct`` (direct I/O) and
``write_through_selective``, prefetching ``best_effort`` (L3 hits after the flush are then
whatever the prefetch finished before the request ran: not required), both ``--dcp-comm``;
tp 2 / dcp 2 at page size 16 (a logical page of 32) with ``layer_first`` (direct I/O) and the ``timeout`` prefetch policy. dcp 1 runs at
page size 1 (at a page > 1 SGLang's paged allocator launches Triton on CPU), so the page 16
run is compared on its greedy requests and its host tier with D x the pool SGLang builds for
dcp 1 at page 16 (its rounding to whole pages). One engine without HiCache per TP size serves
the cases.
"""

import dataclasses
from typing import Dict, List

import pytest
import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.mem_cache.memory_pool_host import MHATokenToKVPoolHost

from sglang_dcp.test.engine_compare import (
    EngineRun,
    compare,
    greedy_only,
    hicache_figures,
    hicache_scenario,
    hicache_settings,
    hicache_shortfalls,
    run_engine_isolated,
)
from sglang_dcp.test.models import write_random_gqa_model
from sglang_dcp.test.serving import bind_cpu_threads

pytestmark = pytest.mark.e2e

LOGPROB_TOL = 1e-4  # float32; DCP only reorders the softmax sums
VOCAB_SIZE = 1024
ROWS_PER_RANK = 256  # device rows per rank (--max-total-tokens)
HICACHE_RATIO = 1.5
NUM_PROMPTS = 12
PROMPT_LENGTHS = (64, 128)
MAX_NEW_TOKENS = 12
# SGLang's memory checks: every idle moment (a leak raises) and every busy step (asserts)
STRICT_MEM_CHECKS = {
    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1",
    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1",
}


@dataclasses.dataclass
class Case:
    tp_size: int
    dcp_size: int
    page_size: int
    layout: str
    io_backend: str
    write_policy: str
    prefetch_policy: str
    comms: List[str]


CASES = {
    "tp2-dcp2": Case(2, 2, 1, "page_first", "kernel", "write_through", "wait_complete", ["a2a", "lse"]),
    "tp4-dcp4": Case(4, 4, 1, "page_first_direct", "direct", "write_through_selective", "best_effort",
                     ["a2a", "lse"]),
    "tp2-dcp2-page16": Case(2, 2, 16, "layer_first", "direct", "write_through", "timeout", ["a2a"]),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Llama with one KV head: 4 query heads (tp 2) and 8 (tp 4)."""
    root = tmp_path_factory.mktemp("hicache_models")
    return {
        tp: write_random_gqa_model(str(root / f"tp{tp}"), num_attention_heads=2 * tp, num_key_value_heads=1,
                                   vocab_size=VOCAB_SIZE, architecture="LlamaForCausalLM")
        for tp in (2, 4)
    }  # fmt: skip


def engine_kwargs(case: Case, page_size: int) -> Dict:
    bind_cpu_threads(case.tp_size)
    return dict(
        device="cpu", tp_size=case.tp_size, page_size=page_size, dtype="float32", mem_fraction_static=0.3,
        max_total_tokens=ROWS_PER_RANK, chunked_prefill_size=64, max_running_requests=8, skip_tokenizer_init=True,
        grammar_backend="none", disable_cuda_graph=True, random_seed=0, log_level="error", enable_metrics=True,
    )  # fmt: skip


def run_hicache(model: str, scenario, case: Case, l3_dir: str, dcp_size: int, **kwargs) -> EngineRun:
    """dcp 1 runs at page size 1: at a page > 1 SGLang's own paged allocator launches Triton."""
    env = {"SGLANG_DCP_TEST_CPU_HICACHE": "1", "SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR": l3_dir,
           **STRICT_MEM_CHECKS}  # fmt: skip
    settings = hicache_settings(case.layout, case.io_backend, case.write_policy, case.prefetch_policy, HICACHE_RATIO)
    page_size = case.page_size if dcp_size > 1 else 1
    return run_engine_isolated(model, scenario, env=env, dcp_size=dcp_size, **engine_kwargs(case, page_size),
                               **settings, **kwargs)  # fmt: skip


def dcp1_host_capacity(case: Case) -> int:
    """The host tier of dcp 1 at the case's page size with the same memory: SGLang's own host
    pool (its rounding to whole pages), built here."""
    device = MHATokenToKVPool(ROWS_PER_RANK, case.page_size, torch.float32, 1, 64, 2, "cpu", False)
    return MHATokenToKVPoolHost(device, HICACHE_RATIO, 0, case.page_size, case.layout, pin_memory=False).size


_no_hicache_runs: Dict = {}


def no_hicache_run(model: str, scenario, case: Case) -> EngineRun:
    """dcp 1 without HiCache, shared by the cases of one TP size."""
    if case.tp_size not in _no_hicache_runs:
        _no_hicache_runs[case.tp_size] = run_engine_isolated(model, scenario, env=STRICT_MEM_CHECKS, dcp_size=1,
                                                             **engine_kwargs(case, 1))  # fmt: skip
    return _no_hicache_runs[case.tp_size]


def against_page1(page1: EngineRun, run: EngineRun, page_size: int):
    """Every request at page size 1; at another page size the greedy ones (a logical page moves
    chunk boundaries, so which requests share a sampling batch)."""
    if page_size == 1:
        return compare(page1, run)
    return compare(greedy_only(page1), greedy_only(run))


def check(label: str, candidate: EngineRun, reference: EngineRun, no_hicache: EngineRun, case: Case,
          scenario) -> None:
    """The DCP run against dcp 1 with the same HiCache settings and against no HiCache."""
    same, plain = (against_page1(run, candidate, case.page_size) for run in (reference, no_hicache))
    figures, reference_figures = hicache_figures(candidate, scenario), hicache_figures(reference, scenario)
    print(f"{label}: vs dcp 1 {same.identical_requests}/{same.num_requests} identical (logprobs within "
          f"{same.max_logprob_diff:.2g}), vs no HiCache {plain.identical_requests}/{plain.num_requests} "
          f"({plain.max_logprob_diff:.2g}); capacity {reference.capacity} -> {candidate.capacity}; "
          f"{figures} (dcp 1: {reference_figures})")  # fmt: skip
    for agreement in (same, plain):
        assert agreement.identical_requests == agreement.num_requests, agreement
        assert agreement.max_logprob_diff < LOGPROB_TOL, agreement
    assert candidate.capacity == case.dcp_size * reference.capacity
    reference_figures["host_capacity"] = dcp1_host_capacity(case)
    assert case.page_size > 1 or reference_figures["host_capacity"] == reference.counts.host_capacity
    shortfalls = hicache_shortfalls(figures, reference_figures, case.dcp_size)
    if case.prefetch_policy == "best_effort":
        shortfalls = [s for s in shortfalls if s != "no cached after flush"]
    assert not shortfalls, shortfalls


@pytest.mark.parametrize("name", list(CASES))
def test_hicache_matches_dcp1(models, tmp_path, name):
    case = CASES[name]
    model = models[case.tp_size]
    scenario = hicache_scenario(VOCAB_SIZE, NUM_PROMPTS, PROMPT_LENGTHS, MAX_NEW_TOKENS)
    no_hicache = no_hicache_run(model, scenario, case)
    reference = run_hicache(model, scenario, case, str(tmp_path / "l3-dcp1"), dcp_size=1)
    baseline = compare(no_hicache, reference)  # dcp 1's HiCache changes no token either
    print(f"{name} dcp 1: HiCache vs none {baseline.identical_requests}/{baseline.num_requests} identical "
          f"({baseline.max_logprob_diff:.2g})")  # fmt: skip
    assert baseline.identical_requests == baseline.num_requests and baseline.max_logprob_diff < LOGPROB_TOL
    for comm in case.comms:
        candidate = run_hicache(model, scenario, case, str(tmp_path / f"l3-{comm}"), dcp_size=case.dcp_size,
                                dcp_comm=comm)  # fmt: skip
        check(f"{name} {comm}", candidate, reference, no_hicache, case, scenario)
