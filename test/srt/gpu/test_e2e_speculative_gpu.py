"""End to end on GPUs: speculative decoding under DCP on the flashinfer backend, against dcp 1
with the same speculative settings and against no speculation (``test_e2e_speculative_cpu.py``
runs the same cases on CPU).

Each case runs SGLang's own speculative workers and kernels (no test mode) on seeded random
bf16 weights (``test_e2e_gpu.write_model``) with random drafts from
``models.write_random_eagle_draft`` (EAGLE's echoes the target's last prediction, EAGLE3's is
random): NGRAM, EAGLE topk 1 and 4 (page size 1 and 16), EAGLE3,
STANDALONE (the target as its own draft), and EAGLE topk 4 at D = 4. The scenario has prompts
of mixed lengths up to 8k (chunked prefill), two repetitive ones (NGRAM), radix-cache prefix
hits and seeded sampling. Speculation under DCP runs without CUDA graphs, so every engine is
eager; with fewer GPUs than a case's TP size it runs in the shared-GPU test mode
(``SGLANG_DCP_SHARED_GPU=1``: every rank on one GPU, gloo), as ``gpu_check.sh`` does.

Every DCP run (once per ``--dcp-comm`` in ``DCP_COMM``) is judged like ``test_e2e_gpu``'s:
exactly D x the capacity of dcp 1, top logprobs within the tolerance up to each request's first
differing token and every greedy split a near-tie, against dcp 1 with the same settings and,
greedy requests only, against no speculation. The tolerances are ``LOGPROB_TOL`` and
``NEAR_TIE``, or ``BASELINE_FACTOR`` times what speculation alone moves the model (dcp 1 with
against without it), where that is more. Verify passes and accepted drafts are recorded per run
(bf16 may flip a draft's near-tie, so they are reported, not required equal). Results go to
``$DCP_RESULTS_DIR/e2e_spec_<case>.json``.

One H200: ``SGLANG_DCP_SHARED_GPU=1 python -m pytest -q -s test/srt/gpu/test_e2e_speculative_gpu.py``
(or ``bash benchmark/dcp/gpu_check.sh e2e-spec``).
"""

import dataclasses
import os
from typing import Callable, Dict, Optional

import pytest
import torch

from sglang_dcp.test.engine_compare import (
    eagle_settings,
    greedy_only,
    run_engine_isolated,
    speculation_figures,
    speculative_scenario,
)
from sglang_dcp.test.models import write_random_eagle_draft

from test_e2e_gpu import (  # noqa: E402 - the GPU e2e harness beside this file
    BASELINE_FACTOR,
    DCP_COMMS,
    LOGPROB_TOL,
    NEAR_TIE,
    SHARED_GPU,
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

MAX_NEW_TOKENS = 24
STEPS = 3
PROMPT_LENGTHS = [1, 17, 300, 2048, 8192]  # chunked prefill for the longer ones


def eagle(topk: int, draft: str, algorithm: str = "EAGLE") -> Dict:
    return eagle_settings(topk, draft, STEPS, algorithm)


@dataclasses.dataclass
class SpecCase:
    tp_size: int
    dcp_size: int
    page_size: int
    settings: Callable[[Dict], Dict]  # the speculative settings, from the model paths


CASES = {
    "ngram": SpecCase(2, 2, 1, lambda m: dict(speculative_algorithm="NGRAM", speculative_num_draft_tokens=8)),
    "eagle-topk1": SpecCase(2, 2, 1, lambda m: eagle(1, m["eagle"])),
    "eagle-topk4": SpecCase(2, 2, 1, lambda m: eagle(4, m["eagle"])),
    "eagle-topk4-page16": SpecCase(2, 2, 16, lambda m: eagle(4, m["eagle"])),
    "eagle3-topk1": SpecCase(2, 2, 1, lambda m: eagle(1, m["eagle3"], "EAGLE3")),
    "standalone-topk1": SpecCase(2, 2, 1, lambda m: eagle(1, m["target"], "STANDALONE")),
    "eagle-topk4-dcp4": SpecCase(4, 4, 1, lambda m: eagle(4, m["eagle"])),
}


def write_models(root: str) -> Dict[str, str]:
    """A target with one KV head, an EAGLE draft that echoes its last prediction (accepted where
    it repeats itself) and a random EAGLE3 draft."""
    target = write_model(os.path.join(root, "target"), 1, "LlamaForCausalLM")
    return {
        "target": target,
        "eagle": write_random_eagle_draft(os.path.join(root, "eagle"), target, echo=True),
        "eagle3": write_random_eagle_draft(os.path.join(root, "eagle3"), target, eagle3=True),
    }


def run_speculative_case(name: str, models: Dict[str, str], kwargs: Callable[..., Dict],
                         env: Dict[str, str], no_speculation_runs: Optional[Dict] = None) -> tuple:
    """Every run of case ``name`` (engine arguments from ``kwargs(tp_size, page_size)``, each
    engine in its own process with ``env``). The dcp 1 run without speculation is taken from
    ``no_speculation_runs`` by ``(tp_size, page_size)`` where there (cases of one model share
    it) and kept there. Returns the results and the failures."""
    case = CASES[name]
    spec = case.settings(models)
    scenario = speculative_scenario(VOCAB_SIZE, PROMPT_LENGTHS, MAX_NEW_TOKENS, top_logprobs_num=TOP_LOGPROBS)

    def run(**extra):
        return run_engine_isolated(models["target"], scenario, env=env,
                                   **kwargs(case.tp_size, case.page_size), **extra)

    no_speculation_runs = {} if no_speculation_runs is None else no_speculation_runs
    shape = (case.tp_size, case.page_size)
    if shape not in no_speculation_runs:
        no_speculation_runs[shape] = run(dcp_size=1)
    no_speculation = no_speculation_runs[shape]
    same_settings = run(dcp_size=1, **spec)
    baseline = run_record("dcp1-spec-vs-no-spec", 1, None, False, greedy_only(no_speculation),
                          greedy_only(same_settings))
    logprob_tol = max(LOGPROB_TOL, BASELINE_FACTOR * baseline["max_logprob_diff"])
    tie_tol = max(NEAR_TIE, BASELINE_FACTOR * baseline["max_divergence_gap"])
    results = {"case": f"spec-{name}", "stage": os.environ.get("DCP_STAGE"), "shared_gpu": SHARED_GPU,
               "skipped_graph_modes": [True],  # speculation under DCP runs eagerly
               **{k: v for k, v in dataclasses.asdict(case).items() if k != "settings"},
               "speculative": {k: v for k, v in spec.items() if k != "speculative_draft_model_path"},
               "num_requests": len(no_speculation.results), "reference_capacity": same_settings.capacity,
               "tolerances": {"logprob": logprob_tol, "near_tie": tie_tol},
               "runs": [{**baseline, **speculation_figures(same_settings)}]}  # fmt: skip
    failures = []
    for comm in DCP_COMMS:
        candidate = run(dcp_size=case.dcp_size, dcp_comm=comm, **spec)
        label = f"dcp{case.dcp_size}-spec-{comm}"
        record = run_record(label, case.dcp_size, comm, False, same_settings, candidate)
        record.update(speculation_figures(candidate))
        failures += judge(record, case.dcp_size, logprob_tol, tie_tol)
        vs_plain = run_record(f"{label}-vs-no-spec", case.dcp_size, comm, False,
                              greedy_only(no_speculation), greedy_only(candidate))
        failures += judge(vs_plain, case.dcp_size, logprob_tol, tie_tol)
        if record["verify_passes"] == 0:
            failures.append(f"{label}: no verify pass (speculation did not run)")
        results["runs"] += [record, vs_plain]
        write_results(f"spec_{name}", results)  # after every run: a stage cut short keeps what it ran
        print(name, {k: v for k, v in record.items() if k != "splits"}, flush=True)
    return results, failures


def gpu_engine_kwargs(tp_size: int, page_size: int) -> Dict:
    return engine_kwargs(tp_size, page_size, graphs=False, context_length=16384, max_total_tokens=200_000,
                         max_running_requests=16)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Dict[str, str]:
    return write_models(str(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="module")
def no_speculation_runs() -> Dict:
    return {}


@pytest.mark.parametrize("name", list(CASES))
def test_speculation_matches_dcp1(models, no_speculation_runs, name):
    skip_without_gpus(CASES[name].tp_size)
    _, failures = run_speculative_case(name, models, gpu_engine_kwargs, env={},
                                       no_speculation_runs=no_speculation_runs)
    assert not failures, failures
