"""Two diagnostics behind statements about speculative decoding under DCP on CPU
(docs/speculative-decoding.md; ``test/srt/test_e2e_speculative_cpu.py``), in the CPU
speculation test mode, on the e2e test's models and scenarios:

* ``logprobs``: STANDALONE topk 4 under memory pressure WITH the overlap scheduler, dcp 1 at
  several logical pool sizes and dcp 2 at the test's 1024: per run, the requests SGLang
  retracted and those whose returned logprobs are fewer than their tokens (SGLang 0.5.14 drops
  the first token's logprob of a request retracted between its prefill's launch and its
  result);
* ``radix``: STANDALONE topk 4 with the radix cache off, dcp 1 at page 1 against dcp 2 at page
  16: whether every greedy request's verify passes and accept histogram agree (with the radix
  cache on they differ after a prefix hit, which ends on a page boundary).

    python benchmark/dcp/spec_cpu_diagnostics.py logprobs [--pools 1024 900 800] [--dcp2-runs 1]
    python benchmark/dcp/spec_cpu_diagnostics.py radix
"""

import argparse
import os
import sys
import tempfile

from sglang_dcp.test.cpu_env import use_cpu_env

use_cpu_env()  # before sglang is imported

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "test", "srt"))
import test_e2e_speculative_cpu as spec_test  # noqa: E402

from sglang_dcp.test.engine_compare import (  # noqa: E402
    greedy_only,
    pressure_scenario,
    run_engine_isolated,
    speculative_scenario,
)
from sglang_dcp.test.models import write_random_gqa_model  # noqa: E402


def target_model(root: str) -> str:
    """The e2e test's tp 2 target (4 query heads, 1 KV head); STANDALONE drafts with it."""
    return write_random_gqa_model(os.path.join(root, "tp2"), num_attention_heads=4, num_key_value_heads=1,
                                  vocab_size=spec_test.VOCAB_SIZE, architecture="LlamaForCausalLM")  # fmt: skip


def lost_logprobs(target: str, pools, dcp2_runs: int) -> None:
    spec = spec_test.eagle(4, target, "STANDALONE")
    scenario = pressure_scenario(spec_test.VOCAB_SIZE, num_prompts=24, max_new_tokens=32)
    env = {**spec_test.SPECULATION_ENV, **spec_test.STRICT_MEM_CHECKS}
    runs = [(1, pool) for pool in pools] + [(2, spec_test.LOGICAL_CAPACITY)] * dcp2_runs
    print(f"{'dcp':>3} {'pool':>5} {'retracted':>9}  requests short of a logprob (index, tokens, logprobs)")
    for dcp, pool in runs:  # pool: logical tokens (max_total_tokens counts physical rows per rank)
        kwargs = spec_test.cpu_engine_kwargs(2, enable_metrics=True, max_running_requests=24,
                                             max_total_tokens=pool // dcp)  # fmt: skip
        run = run_engine_isolated(target, scenario, env=env, dcp_size=dcp, **spec, **kwargs)
        retracted = sum(r.num_retractions > 0 for r in run.results)
        short = [(i, len(r.output_ids), len(r.token_logprobs)) for i, r in enumerate(run.results)
                 if len(r.token_logprobs) != len(r.output_ids)]  # fmt: skip
        print(f"{dcp:>3} {pool:>5} {retracted:>9}  {short}", flush=True)


def accept_lengths_without_radix(target: str) -> None:
    spec = spec_test.eagle(4, target, "STANDALONE")
    scenario = speculative_scenario(spec_test.VOCAB_SIZE, spec_test.PROMPT_LENGTHS, spec_test.MAX_NEW_TOKENS)
    kwargs = spec_test.cpu_engine_kwargs(2, disable_radix_cache=True)
    runs = [
        run_engine_isolated(target, scenario, env=spec_test.SPECULATION_ENV, dcp_size=dcp, page_size=page,
                            **spec, **kwargs)
        for dcp, page in ((1, 1), (2, 16))
    ]  # fmt: skip
    lengths = [spec_test.accept_lengths(greedy_only(run)) for run in runs]
    for request, (page1, page16) in enumerate(zip(*lengths)):
        verdict = "" if page1 == page16 else "DIFFER"
        print(f"request {request}: dcp 1 page 1 {page1}, dcp 2 page 16 {page16} {verdict}")
    print(f"{sum(a == b for a, b in zip(*lengths))}/{len(lengths[0])} greedy requests agree")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=["logprobs", "radix"])
    parser.add_argument("--pools", type=int, nargs="+", default=[1024, 1000, 960, 900, 850, 800, 750],
                        help="dcp 1 pool sizes (logical tokens) for the logprobs check")
    parser.add_argument("--dcp2-runs", type=int, default=1,
                        help="dcp 2 runs (logical pool 1024) for the logprobs check")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        target = target_model(root)
        if args.check == "logprobs":
            lost_logprobs(target, args.pools, args.dcp2_runs)
        else:
            accept_lengths_without_radix(target)


if __name__ == "__main__":
    main()
