"""Run the same requests through SGLang engines with and without DCP and compare them.

Used by the CPU end-to-end tests and by the GPU check script. A *scenario* is a list of
request batches sent one after another to one engine (so later batches can hit the radix
cache of earlier ones); ``run_engine`` returns the logical KV capacity and, per request,
the output ids, the output-token logprobs and the top-5 logprobs with their token ids.
"""

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

import numpy as np


@dataclasses.dataclass
class Batch:
    input_ids: List[List[int]]
    sampling_params: Dict


@dataclasses.dataclass
class RequestResult:
    output_ids: List[int]
    token_logprobs: List[float]
    top_logprobs: List[List[float]]  # per position, the 5 best logprobs (descending)
    top_ids: List[List[int]]  # their token ids
    greedy: bool  # temperature 0


@dataclasses.dataclass
class EngineRun:
    capacity: int
    results: List[RequestResult]


def random_ids(rng: random.Random, length: int, vocab_size: int) -> List[int]:
    return [rng.randrange(3, vocab_size) for _ in range(length)]


def mixed_scenario(
    vocab_size: int,
    lengths: List[int],
    max_new_tokens: int,
    seed: int = 0,
    num_prefix_hits: int = 3,
) -> List[Batch]:
    """Three batches: greedy prompts of mixed ``lengths``; greedy prompts that extend the
    longest of them (radix-cache prefix hits) plus an exact repeat; seeded sampling."""
    rng = random.Random(seed)
    prompts = [random_ids(rng, n, vocab_size) for n in lengths]
    base = max(prompts, key=len)
    extended = [base + random_ids(rng, 7 + 5 * i, vocab_size) for i in range(num_prefix_hits)]
    greedy = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
    sampled = {"max_new_tokens": max_new_tokens, "temperature": 0.8, "top_p": 0.9, "sampling_seed": 1234}
    return [
        Batch(prompts, greedy),
        Batch(extended + [prompts[0]], greedy),
        Batch(prompts[:3], sampled),
    ]


def run_engine(model_path: str, scenario: List[Batch], **engine_kwargs) -> EngineRun:
    import sglang

    engine = sglang.Engine(model_path=model_path, **engine_kwargs)
    try:
        capacity = engine.get_server_info()["max_total_num_tokens"]
        results = []
        for batch in scenario:
            outputs = engine.generate(
                input_ids=batch.input_ids,
                sampling_params=batch.sampling_params,
                return_logprob=True,
                top_logprobs_num=5,
            )
            for out in outputs:
                meta = out["meta_info"]
                results.append(
                    RequestResult(
                        output_ids=list(out["output_ids"]),
                        token_logprobs=[lp for lp, _, _ in meta["output_token_logprobs"]],
                        top_logprobs=[[lp for lp, _, _ in top] for top in meta["output_top_logprobs"]],
                        top_ids=[[tid for _, tid, _ in top] for top in meta["output_top_logprobs"]],
                        greedy=batch.sampling_params.get("temperature", 1.0) == 0.0,
                    )
                )
    finally:
        engine.shutdown()
    return EngineRun(capacity, results)


def run_engine_isolated(
    model_path: str, scenario: List[Batch], env: Optional[Dict[str, str]] = None, **engine_kwargs
) -> EngineRun:
    """``run_engine`` in a fresh Python process with ``env`` added to the environment, so
    that SGLang loads its plugins (e.g. ``SGLANG_PLUGINS``) anew for this run."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "run.json")
        with open(spec_path, "w") as f:
            json.dump({"model_path": model_path, "engine_kwargs": engine_kwargs,
                       "scenario": [dataclasses.asdict(b) for b in scenario]}, f)
        subprocess.run([sys.executable, "-m", __name__, spec_path, out_path],
                       env={**os.environ, **(env or {})}, check=True)
        with open(out_path) as f:
            run = json.load(f)
    return EngineRun(run["capacity"], [RequestResult(**r) for r in run["results"]])


@dataclasses.dataclass
class Agreement:
    num_requests: int
    identical_requests: int
    max_logprob_diff: float  # over positions up to and including the first differing token
    # At each greedy request's first differing token: how much less likely the reference found the
    # candidate's token than its own (top-1 logprob minus the candidate token's, inf if it is
    # not among the reference's top 5). Small: the outputs split at a near-tie.
    max_divergence_gap: float

    @property
    def identical_fraction(self) -> float:
        return self.identical_requests / self.num_requests


def divergence_gap(ref: RequestResult, position: int, token: int) -> float:
    top_ids, top_logprobs = ref.top_ids[position], ref.top_logprobs[position]
    if token not in top_ids:
        return math.inf
    return top_logprobs[0] - top_logprobs[top_ids.index(token)]


def compare(reference: EngineRun, candidate: EngineRun) -> Agreement:
    """Greedy/sampled id agreement, the largest |logprob| difference (output token and
    top-5 values) over the common prefix of each request's outputs, and the largest
    near-tie gap where greedy outputs differ."""
    identical, max_diff, max_gap = 0, 0.0, 0.0
    for ref, cand in zip(reference.results, candidate.results, strict=True):
        identical += ref.output_ids == cand.output_ids
        same = next(
            (i for i, (a, b) in enumerate(zip(ref.output_ids, cand.output_ids)) if a != b),
            min(len(ref.output_ids), len(cand.output_ids)),
        )
        # position i's distribution is conditioned on tokens < i, identical up to `same`
        for i in range(min(same + 1, len(ref.token_logprobs), len(cand.token_logprobs))):
            diffs = np.abs(np.array(ref.top_logprobs[i]) - np.array(cand.top_logprobs[i]))
            if i < same:
                diffs = np.append(diffs, abs(ref.token_logprobs[i] - cand.token_logprobs[i]))
            max_diff = max(max_diff, float(diffs.max()))
        if ref.greedy and same < min(len(ref.output_ids), len(cand.output_ids)):
            max_gap = max(max_gap, divergence_gap(ref, same, cand.output_ids[same]))
    return Agreement(len(reference.results), identical, max_diff, max_gap)


if __name__ == "__main__":  # the child process of run_engine_isolated
    spec_file, out_file = sys.argv[1:]
    with open(spec_file) as f:
        spec = json.load(f)
    result = run_engine(
        spec["model_path"], [Batch(**b) for b in spec["scenario"]], **spec["engine_kwargs"]
    )
    with open(out_file, "w") as f:
        json.dump(dataclasses.asdict(result), f)
