"""End to end on GPUs: HiCache under DCP on the flashinfer backend with SGLang's own host-pool
copies, against dcp 1 with the same HiCache settings and against no HiCache
(``test_e2e_hicache_cpu.py`` runs the same flow on CPU in the CPU HiCache test mode).

Each case runs SGLang's HiCache as it is on a GPU: its pinned host pool, its copy kernels for
the ``kernel`` I/O backend (``sgl_kernel`` ``transfer_kv_*`` / JIT ``transfer_hicache_*``) or
``direct`` I/O, L3 ``file`` storage, on seeded random bf16 weights (``test_e2e_gpu.write_model``,
one KV head). The scenario (``engine_compare.hicache_scenario``): 16 prompts of 1k-3k tokens,
several times the device pool of every run (``ROWS_PER_RANK`` rows per rank), sent in two halves
and revisited (device evictions, load-backs from the host tier, L3 prefetches), seeded
sampling, requests aborted mid-decode and, after ``flush_cache``, prompts that only L3 holds.
SGLang's strict idle and busy memory checks are on (and so DCP's replica and host-leak check).

Every DCP run (once per ``--dcp-comm`` in ``DCP_COMM``) is judged like ``test_e2e_gpu``'s
(exactly D x the capacity, top logprobs within the tolerance up to each request's first
differing token, every greedy split a near-tie) against dcp 1 with the same HiCache settings and
against no HiCache, with bars of ``BASELINE_FACTOR`` times what dcp 1's HiCache alone moves the
model where that is more than ``LOGPROB_TOL`` / ``NEAR_TIE``; and it must hold D x dcp 1's host
capacity, with evictions, load-backs, L3 writes, L3 hits after the flush and aborts (counts >
0, ``engine_compare.hicache_shortfalls``). Eager in the shared-GPU mode, decode CUDA graphs
on otherwise. Results go to ``$DCP_RESULTS_DIR/e2e_hicache-<case>.json`` (rows ``hicache-...``
of ``gpu_summary.py``).

One H200: ``SGLANG_DCP_SHARED_GPU=1 python -m pytest -q -s test/srt/gpu/test_e2e_hicache_gpu.py``
(or ``bash benchmark/dcp/gpu_check.sh install e2e-hicache e2e-hicache-dcp4 summary``).
"""

import dataclasses
import os
from typing import Callable, Dict

import pytest
import torch

from sglang_dcp.test.engine_compare import (
    hicache_figures,
    hicache_scenario,
    hicache_settings,
    hicache_shortfalls,
    run_engine_isolated,
)

from test_e2e_gpu import (  # noqa: E402 - the GPU e2e harness beside this file
    BASELINE_FACTOR,
    DCP_COMMS,
    LOGPROB_TOL,
    NEAR_TIE,
    SHARED_GPU,
    STRICT_MEM_CHECKS,
    TOP_LOGPROBS,
    VOCAB_SIZE,
    engine_kwargs,
    judge,
    run_record,
    skip_without_gpus,
    write_model,
    write_results,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs"),
]

ROWS_PER_RANK = 4096  # device rows per rank (--max-total-tokens)
HICACHE_RATIO = 2.0
NUM_PROMPTS = 16
PROMPT_LENGTHS = (1024, 3072)
MAX_NEW_TOKENS = 16


@dataclasses.dataclass
class HiCacheCase:
    tp_size: int
    dcp_size: int
    page_size: int
    layout: str
    io_backend: str
    write_policy: str = "write_through"
    prefetch_policy: str = "wait_complete"


CASES = {
    "hicache-kernel": HiCacheCase(2, 2, 1, "page_first", "kernel"),
    "hicache-kernel-layer-first": HiCacheCase(2, 2, 16, "layer_first", "kernel", prefetch_policy="timeout"),
    "hicache-direct": HiCacheCase(2, 2, 16, "page_first_direct", "direct", "write_through_selective"),
    "hicache-dcp4": HiCacheCase(4, 4, 1, "page_first", "kernel"),
}


def run_hicache_case(name: str, model: str, kwargs: Callable[..., Dict], env: Dict[str, str], l3_root: str,
                     **scenario_args) -> tuple:
    """Every run of case ``name`` (engine arguments ``kwargs(tp_size, page_size)``, each engine
    in its own process with ``env``, L3 in a folder of its own under ``l3_root``). Returns the
    results and the failures."""
    case = CASES[name]
    scenario = hicache_scenario(VOCAB_SIZE, **{
        "num_prompts": NUM_PROMPTS, "prompt_lengths": PROMPT_LENGTHS, "max_new_tokens": MAX_NEW_TOKENS,
        "top_logprobs_num": TOP_LOGPROBS, **scenario_args})  # fmt: skip
    settings = hicache_settings(case.layout, case.io_backend, case.write_policy, case.prefetch_policy, HICACHE_RATIO)

    def run(label, **extra):
        run_env = {**env, **STRICT_MEM_CHECKS, "SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR": os.path.join(l3_root, label)}
        return run_engine_isolated(model, scenario, env=run_env, **kwargs(case.tp_size, case.page_size), **extra)

    no_hicache = run("none", dcp_size=1)
    reference = run("dcp1", dcp_size=1, **settings)
    reference_figures = hicache_figures(reference, scenario)
    baseline = run_record("dcp1-hicache-vs-none", 1, None, False, no_hicache, reference)
    logprob_tol = max(LOGPROB_TOL, BASELINE_FACTOR * baseline["max_logprob_diff"])
    tie_tol = max(NEAR_TIE, BASELINE_FACTOR * baseline["max_divergence_gap"])
    results = {"case": name, "stage": os.environ.get("DCP_STAGE"), "shared_gpu": SHARED_GPU,
               "skipped_graph_modes": [True] if SHARED_GPU else [],
               **dataclasses.asdict(case), "num_requests": len(reference.results),
               "reference_capacity": reference.capacity, "tolerances": {"logprob": logprob_tol, "near_tie": tie_tol},
               "runs": [{**baseline, **reference_figures}]}  # fmt: skip
    failures = []
    for comm in DCP_COMMS:
        candidate = run(f"dcp{case.dcp_size}-{comm}", dcp_size=case.dcp_size, dcp_comm=comm, **settings)
        label = f"dcp{case.dcp_size}-hicache-{comm}"
        record = run_record(label, case.dcp_size, comm, not SHARED_GPU, reference, candidate)
        record.update(hicache_figures(candidate, scenario))
        failures += judge(record, case.dcp_size, logprob_tol, tie_tol)
        shortfalls = hicache_shortfalls(record, reference_figures, case.dcp_size)
        failures += [f"{label}: {shortfall}" for shortfall in shortfalls]
        record["pass"] = record["pass"] and not shortfalls
        vs_plain = run_record(f"{label}-vs-none", case.dcp_size, comm, not SHARED_GPU, no_hicache, candidate)
        failures += judge(vs_plain, case.dcp_size, logprob_tol, tie_tol)
        results["runs"] += [record, vs_plain]
        write_results(name, results)  # after every run: a stage cut short keeps what it ran
        print(name, {k: v for k, v in record.items() if k != "splits"}, flush=True)
    return results, failures


def gpu_engine_kwargs(tp_size: int, page_size: int, **overrides) -> Dict:
    return engine_kwargs(tp_size, page_size, graphs=not SHARED_GPU, **{
        "context_length": 8192, "max_total_tokens": ROWS_PER_RANK, "chunked_prefill_size": 2048,
        "max_running_requests": 16, "enable_metrics": True, **overrides})  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_hicache_matches_dcp1(tmp_path, name):
    skip_without_gpus(CASES[name].tp_size)
    model = write_model(str(tmp_path / "model"), 1, "Qwen3ForCausalLM")
    _, failures = run_hicache_case(name, model, gpu_engine_kwargs, env={}, l3_root=str(tmp_path / "l3"))
    assert not failures, failures
