"""Run the same requests through SGLang engines with and without DCP and compare them.

Used by the CPU end-to-end tests and by the GPU check script. A *scenario* is a list of
request batches sent one after another to one engine (so later batches can hit the radix
cache of earlier ones), or, marked ``while_previous_decodes``, while the batch before it
decodes. ``run_engine`` returns the logical KV capacity, per request the output ids, the
output-token logprobs and the top-5 logprobs with their token ids, how often the scheduler
retracted it and how many of its prompt tokens came from the radix cache, and, where asked
for, counts from SGLang's own scheduler metrics (``SchedulerCounts``).
"""

import asyncio
import contextlib
import dataclasses
import glob
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Dict, List, Optional, Tuple

import numpy as np


@dataclasses.dataclass
class Batch:
    input_ids: List[List[int]]
    sampling_params: Dict
    # Sent once every request of the batches before it (since the last batch without this
    # flag) has streamed a token, i.e. while they decode, instead of after they finish.
    while_previous_decodes: bool = False
    # SGLang 0.5.14 never mixes a prefill that returns logprobs, or decodes that do, into one
    # batch (Scheduler.get_new_batch_prefill): a mixed-chunk scenario asks for none.
    return_logprob: bool = True
    # How many of the most likely tokens to return per position (their ids and logprobs)
    top_logprobs_num: int = 5
    # Abort each request (SGLang's abort_request by rid) once it has streamed this many tokens;
    # what an aborted request returned depends on timing, so ``compare`` leaves it out.
    abort_after_tokens: Optional[int] = None
    # Flush the cache (SGLang's flush_cache: device and host tiers, not L3 storage) before it.
    flush_cache_before: bool = False


@dataclasses.dataclass
class RequestResult:
    output_ids: List[int]
    token_logprobs: List[float]
    top_logprobs: List[List[float]]  # per position, the best logprobs (descending)
    top_ids: List[List[int]]  # their token ids
    greedy: bool  # temperature 0
    num_retractions: int = 0  # times the scheduler retracted it (decode out of KV memory)
    cached_tokens: int = 0  # prompt tokens found in the radix cache
    # HiCache: of those, the tokens loaded back from the host tier and prefetched from L3 storage
    cached_tokens_host: int = 0
    cached_tokens_storage: int = 0
    # Speculative decoding: verify passes, and how many of them accepted 0, 1, ... drafts
    spec_verify_ct: int = 0
    spec_accept_histogram: List[int] = dataclasses.field(default_factory=list)
    aborted: bool = False


@dataclasses.dataclass
class SchedulerCounts:
    """What SGLang's scheduler did over one engine's life.

    With ``enable_metrics``: requests retracted and tokens evicted from the radix cache (and,
    with HiCache, loaded back and the host capacity), SGLang's Prometheus metrics of the
    TP-rank-0 scheduler. For a scenario with a batch
    sent ``while_previous_decodes``: the fewest tokens that a request sent before the last
    such batch streamed while that batch prefilled (from sending it to the first token of
    each of its requests). SGLang runs a chunked prefill without decode steps unless it
    mixes them into its chunks (``enable_mixed_chunk``), so only mixed batches make this
    more than the few steps before the scheduler takes the batch in. (SGLang's per-pass
    metrics, ``enable_forward_pass_metrics``, would say it directly but time passes with
    CUDA events.)
    """

    retracted_requests: int = 0
    evicted_tokens: int = 0
    decoded_while_prefilling: int = 0
    # With HiCache and ``enable_metrics``: tokens loaded back from host to device, written to and
    # prefetched from L3 storage, and the host tier's logical capacity (SGLang's gauge
    # ``hicache_host_total_tokens``). SGLang 0.5.14's per-request ``cached_tokens_details``
    # counts a prefetch as host hits where the request waits a round after it (its
    # ``pop_prefetch_loaded_tokens`` is read once, then 0), so L3 hits are counted here.
    loaded_back_tokens: int = 0
    stored_tokens: int = 0
    prefetched_tokens: int = 0
    host_capacity: int = 0


@dataclasses.dataclass
class EngineRun:
    capacity: int
    results: List[RequestResult]
    counts: SchedulerCounts = dataclasses.field(default_factory=SchedulerCounts)


def random_ids(rng: random.Random, length: int, vocab_size: int) -> List[int]:
    return [rng.randrange(3, vocab_size) for _ in range(length)]


def mixed_scenario(
    vocab_size: int,
    lengths: List[int],
    max_new_tokens: int,
    seed: int = 0,
    num_prefix_hits: int = 3,
    top_logprobs_num: int = 5,
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
        Batch(prompts, greedy, top_logprobs_num=top_logprobs_num),
        Batch(extended + [prompts[0]], greedy, top_logprobs_num=top_logprobs_num),
        Batch(prompts[:3], sampled, top_logprobs_num=top_logprobs_num),
    ]


def speculative_scenario(vocab_size: int, lengths: List[int], max_new_tokens: int, seed: int = 0,
                         top_logprobs_num: int = 5) -> List[Batch]:
    """For speculative decoding: greedy prompts of ``lengths`` and two repetitive ones (a motif
    of 8 tokens 4 times, one of 3 tokens 10 times: NGRAM drafts from them); then greedy prompts
    that extend the longest and the first motif (radix-cache prefix hits) and a repeat of the
    second prompt; then seeded sampling of three new prompts (5, 21 and 40 tokens), at a
    temperature only: over a random model's nearly flat distribution a top-p cut-off falls
    between tokens that float rounding reorders, so identical samples are not expected across
    runs that round differently (as DCP's split softmax does) if top-p is set."""
    rng = random.Random(seed)
    motif = random_ids(rng, 8, vocab_size)
    repetitive = [motif * 4, random_ids(rng, 3, vocab_size) * 10]
    prompts = [random_ids(rng, n, vocab_size) for n in lengths] + repetitive
    extended = [max(prompts, key=len) + random_ids(rng, 9, vocab_size), repetitive[0] + motif]
    greedy = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
    sampled = {"max_new_tokens": max_new_tokens, "temperature": 0.8, "sampling_seed": 1234}
    fresh = [random_ids(rng, n, vocab_size) for n in (5, 21, 40)]
    return [Batch(prompts, greedy, top_logprobs_num=top_logprobs_num),
            Batch(extended + [prompts[1]], greedy, top_logprobs_num=top_logprobs_num),
            Batch(fresh, sampled, top_logprobs_num=top_logprobs_num)]


def eagle_settings(topk: int, draft: str, steps: int, algorithm: str = "EAGLE") -> Dict:
    """Engine arguments of an EAGLE-family draft (``algorithm`` EAGLE, EAGLE3 or STANDALONE)
    at ``draft``, ``steps`` draft steps of ``topk`` branches: a chain (topk 1) verifies
    ``steps + 1`` tokens, a tree ``2 * steps``."""
    return dict(speculative_algorithm=algorithm, speculative_draft_model_path=draft,
                speculative_num_steps=steps, speculative_eagle_topk=topk,
                speculative_num_draft_tokens=steps + 1 if topk == 1 else 2 * steps)  # fmt: skip


def greedy_only(engine_run: "EngineRun") -> "EngineRun":
    """``engine_run`` with only its greedy requests (what runs with and without speculation
    share: speculation draws sampling coins of its own)."""
    return dataclasses.replace(engine_run, results=[r for r in engine_run.results if r.greedy])


def speculation_figures(engine_run: "EngineRun") -> Dict:
    """Verify passes and accepted drafts over every request of ``engine_run``."""
    return {
        "verify_passes": sum(r.spec_verify_ct for r in engine_run.results),
        "accepted_drafts": sum(i * n for r in engine_run.results for i, n in enumerate(r.spec_accept_histogram)),
    }


def pressure_scenario(vocab_size: int, num_prompts: int, max_new_tokens: int, seed: int = 0,
                      top_logprobs_num: int = 5) -> List[Batch]:
    """Greedy prompts of 32-96 tokens sent at once; then the same prompts again, each
    extended by 4-20 tokens, plus exact repeats of a quarter of them, latest first: the
    prompts that finished last are the ones still cached when the replay arrives."""
    rng = random.Random(seed)
    prompts = [random_ids(rng, rng.randrange(32, 97), vocab_size) for _ in range(num_prompts)]
    latest_first = prompts[::-1]
    replay = [p + random_ids(rng, rng.randrange(4, 21), vocab_size) for p in latest_first]
    replay += latest_first[: num_prompts // 4]
    greedy = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
    return [Batch(prompts, greedy, top_logprobs_num=top_logprobs_num),
            Batch(replay, greedy, top_logprobs_num=top_logprobs_num)]


def hicache_scenario(vocab_size: int, num_prompts: int, prompt_lengths: Tuple[int, int], max_new_tokens: int,
                     seed: int = 0, top_logprobs_num: int = 5) -> List[Batch]:
    """For HiCache: first, seeded sampling of three fresh prompts that fit one prefill batch
    (SGLang 0.5.14 samples a batch from one random stream, so sampled tokens agree where the
    batches do; sent to the empty pool, so that no eviction waiting on a host write splits the
    batch); then a working set of ``num_prompts`` greedy prompts (lengths drawn from
    ``prompt_lengths``) revisited: the first half, then the second (evicting the first's
    prefixes from the device), then the second half extended (the latest prefixes: device and
    host hits) and the first half extended (older ones: host hits, or L3 prefetches where the
    host tier evicted them too); the second half extended with requests aborted mid-decode,
    then again; after ``flush_cache`` (device and host tiers emptied) the first half extended
    again (L3 storage hits, where a storage backend is set)."""
    rng = random.Random(seed)
    prompts = [random_ids(rng, rng.randint(*prompt_lengths), vocab_size) for _ in range(num_prompts)]
    first, second = prompts[: num_prompts // 2], prompts[num_prompts // 2:]

    def extended(group, n):
        return [p + random_ids(rng, n, vocab_size) for p in group]

    greedy = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
    sampled = {"max_new_tokens": max_new_tokens, "temperature": 0.8, "sampling_seed": 1234}
    fresh = [random_ids(rng, n, vocab_size) for n in (5, 21, 30)]
    kw = dict(top_logprobs_num=top_logprobs_num)
    return [Batch(fresh, sampled, **kw), Batch(first, greedy, **kw), Batch(second, greedy, **kw),
            Batch(extended(second, 5), greedy, **kw), Batch(extended(first, 5), greedy, **kw),
            Batch(extended(second, 3), greedy, abort_after_tokens=2, **kw), Batch(extended(second, 7), greedy, **kw),
            Batch(extended(first, 11), greedy, flush_cache_before=True, **kw)]


def hicache_settings(layout: str, io_backend: str, write_policy: str, prefetch_policy: str, ratio: float,
                     prefetch_threshold: int = 32) -> Dict:
    """Engine arguments of HiCache with an L3 ``file`` store (its folder: the environment's
    ``SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR``), prefetching prompts of ``prefetch_threshold``
    tokens and more."""
    return dict(enable_hierarchical_cache=True, hicache_ratio=ratio, hicache_mem_layout=layout,
                hicache_io_backend=io_backend, hicache_write_policy=write_policy, hicache_storage_backend="file",
                hicache_storage_prefetch_policy=prefetch_policy,
                hicache_storage_backend_extra_config=json.dumps({"prefetch_threshold": prefetch_threshold}))  # fmt: skip


def hicache_figures(engine_run: "EngineRun", scenario: List[Batch]) -> Dict:
    """What HiCache did in ``engine_run`` (``SchedulerCounts``), and the prompt tokens that the
    requests of the scenario's last batch, sent after ``flush_cache``, found cached (only L3
    held them)."""
    c = engine_run.counts
    after_flush = engine_run.results[-len(scenario[-1].input_ids):]
    return {"host_capacity": c.host_capacity, "evicted_tokens": c.evicted_tokens,
            "loaded_back_tokens": c.loaded_back_tokens, "stored_tokens": c.stored_tokens,
            "prefetched_tokens": c.prefetched_tokens, "cached_after_flush": sum(r.cached_tokens for r in after_flush),
            "aborted": sum(r.aborted for r in engine_run.results)}  # fmt: skip


def hicache_shortfalls(figures: Dict, reference: Dict, dcp_size: int) -> List[str]:
    """What a DCP run's ``hicache_figures`` lack against dcp 1's with the same settings: the host
    tier D x the logical tokens, device evictions, load-backs, L3 writes, L3 hits after the flush
    and aborted requests, each more than 0."""
    missing = [] if figures["host_capacity"] == dcp_size * reference["host_capacity"] > 0 else [
        f"host capacity {figures['host_capacity']}, not {dcp_size} x {reference['host_capacity']}"]
    names = ("evicted_tokens", "loaded_back_tokens", "stored_tokens", "cached_after_flush", "aborted")
    return missing + [f"no {name.replace('_', ' ')}" for name in names if figures[name] <= 0]


# Prometheus counters (names as sampled) -> SchedulerCounts fields
_PROMETHEUS_COUNTERS = {
    "sglang:num_retracted_requests_total": "retracted_requests",
    "sglang:evicted_tokens_total": "evicted_tokens",
    "sglang:load_back_tokens_total": "loaded_back_tokens",
    "sglang:backuped_tokens_total": "stored_tokens",
    "sglang:prefetched_tokens_total": "prefetched_tokens",
}
# Prometheus gauges (their latest value) -> SchedulerCounts fields
_PROMETHEUS_GAUGES = {"sglang:hicache_host_total_tokens": "host_capacity"}


@contextlib.contextmanager
def prometheus_dir(enabled: bool):
    """A fresh ``PROMETHEUS_MULTIPROC_DIR`` for the engine started inside (SGLang creates
    its own only if none is set), so its counters are those of this engine alone."""
    if not enabled:
        yield None
        return
    previous = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    with tempfile.TemporaryDirectory() as path:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        try:
            yield path
        finally:
            if previous is None:
                os.environ.pop("PROMETHEUS_MULTIPROC_DIR")
            else:
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = previous


def read_prometheus_counters(path: str, counts: SchedulerCounts) -> None:
    """Add the counters of the TP-rank-0 scheduler to ``counts`` and set its gauges. Every
    scheduler process writes its own metric files and counts the same events (the TP ranks
    schedule the same batches, each with its own copy of the radix cache); the rank-0 files
    are those whose scheduler metrics are labelled ``tp_rank="0"``."""
    from prometheus_client.multiprocess import MultiProcessCollector

    for file in glob.glob(os.path.join(path, "counter_*.db")) + glob.glob(os.path.join(path, "gauge_*.db")):
        samples = [s for metric in MultiProcessCollector.merge([file]) for s in metric.samples]
        if any(s.labels.get("tp_rank") == "0" for s in samples):
            for sample in samples:
                if sample.name in _PROMETHEUS_COUNTERS:
                    field = _PROMETHEUS_COUNTERS[sample.name]
                    setattr(counts, field, getattr(counts, field) + int(sample.value))
                elif sample.name in _PROMETHEUS_GAUGES and sample.labels.get("tp_rank") == "0":
                    setattr(counts, _PROMETHEUS_GAUGES[sample.name], int(sample.value))


def request_result(out: Dict, batch: Batch) -> RequestResult:
    meta = out["meta_info"]
    logprobs = meta.get("output_token_logprobs") or []
    tops = meta.get("output_top_logprobs") or []
    return RequestResult(
        output_ids=list(out["output_ids"]),
        token_logprobs=[lp for lp, _, _ in logprobs],
        top_logprobs=[[lp for lp, _, _ in top] for top in tops],
        top_ids=[[tid for _, tid, _ in top] for top in tops],
        greedy=batch.sampling_params.get("temperature", 1.0) == 0.0,
        num_retractions=meta["num_retractions"],
        cached_tokens=meta["cached_tokens"],
        cached_tokens_host=(meta.get("cached_tokens_details") or {}).get("host", 0),
        cached_tokens_storage=(meta.get("cached_tokens_details") or {}).get("storage", 0),
        spec_verify_ct=meta.get("spec_verify_ct", 0),
        spec_accept_histogram=list(meta.get("spec_correct_drafts_histogram") or []),
        aborted=(meta.get("finish_reason") or {}).get("type") == "abort",
    )


def logprob_args(batch: Batch) -> Dict:
    return dict(return_logprob=True, top_logprobs_num=batch.top_logprobs_num) if batch.return_logprob else {}


async def generate_overlapping(engine, batches: List[Batch]) -> Tuple[List[Dict], int]:
    """Send ``batches[0]``, then each later batch once every request sent before it has
    streamed a token; one streaming request per prompt. Returns the last (cumulative)
    output of each request, in order, and ``SchedulerCounts.decoded_while_prefilling``."""
    first_token, streamed = [], []  # per request: an event, the tokens streamed so far

    async def one(index, input_ids, batch):
        last = None
        try:
            async for last in await engine.async_generate(
                input_ids=input_ids, sampling_params=batch.sampling_params, stream=True,
                **logprob_args(batch),
            ):
                streamed[index] = len(last["output_ids"])
                first_token[index].set()
        finally:
            first_token[index].set()  # a failed request must not hold back the batches after it
        return last

    tasks = []
    for batch in batches:
        await asyncio.gather(*(event.wait() for event in first_token))
        streamed_before = list(streamed)
        for input_ids in batch.input_ids:
            first_token.append(asyncio.Event())
            streamed.append(0)
            tasks.append(asyncio.create_task(one(len(tasks), input_ids, batch)))
    await asyncio.gather(*(event.wait() for event in first_token))
    decoded = min(now - before for now, before in zip(streamed, streamed_before))
    return await asyncio.gather(*tasks), decoded


async def generate_and_abort(engine, batch: Batch) -> List[Dict]:
    """Stream every request of ``batch`` at once and abort each, by its rid, once it has
    streamed ``batch.abort_after_tokens`` tokens. Returns each request's last output."""

    async def one(index, input_ids):
        rid = f"abort-{uuid.uuid4().hex}-{index}"
        last, aborting = None, False
        async for last in await engine.async_generate(
            input_ids=input_ids, sampling_params=batch.sampling_params, stream=True, rid=rid,
            **logprob_args(batch),
        ):
            if not aborting and len(last["output_ids"]) >= batch.abort_after_tokens:
                engine.tokenizer_manager.abort_request(rid=rid)
                aborting = True
        return last

    return await asyncio.gather(*(one(i, ids) for i, ids in enumerate(batch.input_ids)))


def flush_cache(engine, timeout_s: float = 120) -> None:
    """SGLang's ``flush_cache``, again until it succeeds: it refuses while anything is in flight
    (with HiCache: write-backs, loads, L3 backups and prefetches)."""
    deadline = time.monotonic() + timeout_s
    while not engine.flush_cache().success:
        if time.monotonic() > deadline:
            raise TimeoutError(f"flush_cache did not succeed within {timeout_s} s")
        time.sleep(0.2)


def run_scenario(engine, scenario: List[Batch], counts: SchedulerCounts) -> List[RequestResult]:
    """Send ``scenario`` to a running ``engine``; the results of its requests, in order
    (``counts.decoded_while_prefilling`` set where a batch overlaps the one before)."""
    results = []
    waves = []  # batches sent together: one, and those marked while_previous_decodes
    for batch in scenario:
        if batch.while_previous_decodes and waves:
            waves[-1].append(batch)
        else:
            waves.append([batch])
    for wave in waves:
        if wave[0].flush_cache_before:
            flush_cache(engine)
        if len(wave) == 1 and wave[0].abort_after_tokens is not None:
            outputs = engine.loop.run_until_complete(generate_and_abort(engine, wave[0]))
        elif len(wave) == 1:
            outputs = engine.generate(
                input_ids=wave[0].input_ids, sampling_params=wave[0].sampling_params,
                **logprob_args(wave[0]),
            )
        else:
            outputs, counts.decoded_while_prefilling = engine.loop.run_until_complete(
                generate_overlapping(engine, wave)
            )
        requests = [batch for batch in wave for _ in batch.input_ids]
        results += [request_result(out, batch) for out, batch in zip(outputs, requests, strict=True)]
    return results


def run_engine(model_path: str, scenario: List[Batch], **engine_kwargs) -> EngineRun:
    import sglang

    counts = SchedulerCounts()
    with prometheus_dir(engine_kwargs.get("enable_metrics", False)) as metrics_dir:
        engine = sglang.Engine(model_path=model_path, **engine_kwargs)
        try:
            capacity = engine.get_server_info()["max_total_num_tokens"]
            results = run_scenario(engine, scenario, counts)
            if metrics_dir is not None:
                read_prometheus_counters(metrics_dir, counts)
        finally:
            engine.shutdown()
    return EngineRun(capacity, results, counts)


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
    return EngineRun(
        run["capacity"], [RequestResult(**r) for r in run["results"]], SchedulerCounts(**run["counts"])
    )


@dataclasses.dataclass
class Split:
    """Where a greedy request's outputs first differ: ``gap`` as in ``Agreement``; ``spread``
    is the reference's top-1 minus its last returned logprob there, so a token outside the
    returned ones is at least ``spread`` below the top (a small spread: a flat distribution)."""

    request: int
    position: int
    gap: float
    spread: float


@dataclasses.dataclass
class Agreement:
    num_requests: int  # compared: those that neither run aborted
    identical_requests: int
    max_logprob_diff: float  # over positions up to and including the first differing token
    # At each greedy request's first differing token: how much less likely the reference found the
    # candidate's token than its own (top-1 logprob minus the candidate token's, inf if it is
    # not among the reference's top logprobs). Small: the outputs split at a near-tie.
    max_divergence_gap: float
    splits: List[Split] = dataclasses.field(default_factory=list)

    @property
    def identical_fraction(self) -> float:
        return self.identical_requests / self.num_requests


def divergence_gap(ref: RequestResult, position: int, token: int) -> float:
    if position >= len(ref.top_ids):  # run without logprobs
        return math.inf
    top_ids, top_logprobs = ref.top_ids[position], ref.top_logprobs[position]
    if token not in top_ids:
        return math.inf
    return top_logprobs[0] - top_logprobs[top_ids.index(token)]


def compare(reference: EngineRun, candidate: EngineRun) -> Agreement:
    """Greedy/sampled id agreement, the largest |logprob| difference (output token and
    top-5 values) over the common prefix of each request's outputs, and the largest
    near-tie gap where greedy outputs differ."""
    identical, max_diff, splits = 0, 0.0, []
    compared = 0
    for index, (ref, cand) in enumerate(zip(reference.results, candidate.results, strict=True)):
        if ref.aborted or cand.aborted:
            continue
        compared += 1
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
            spread = ref.top_logprobs[same][0] - ref.top_logprobs[same][-1] if same < len(ref.top_logprobs) else math.inf
            splits.append(Split(index, same, divergence_gap(ref, same, cand.output_ids[same]), spread))
    max_gap = max((split.gap for split in splits), default=0.0)
    return Agreement(compared, identical, max_diff, max_gap, splits)


if __name__ == "__main__":  # the child process of run_engine_isolated
    spec_file, out_file = sys.argv[1:]
    with open(spec_file) as f:
        spec = json.load(f)
    result = run_engine(
        spec["model_path"], [Batch(**b) for b in spec["scenario"]], **spec["engine_kwargs"]
    )
    with open(out_file, "w") as f:
        json.dump(dataclasses.asdict(result), f)
