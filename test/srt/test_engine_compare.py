"""``compare``: token agreement, logprob differences and near-tie gaps of two engine runs."""

import math

from sglang_dcp.test.engine_compare import EngineRun, RequestResult, compare


def request(output_ids, top, greedy=True):
    """A result whose position ``i`` has top-5 ``top[i]`` = [(token id, logprob), ...]."""
    logprobs = [dict(t)[tok] if tok in dict(t) else -9.0 for tok, t in zip(output_ids, top)]
    return RequestResult(
        output_ids=output_ids,
        token_logprobs=logprobs,
        top_logprobs=[[lp for _, lp in t] for t in top],
        top_ids=[[tid for tid, _ in t] for t in top],
        greedy=greedy,
    )


TOP = [(5, -0.50), (6, -0.55), (7, -2.0), (8, -3.0), (9, -4.0)]


def test_identical_runs_agree_exactly():
    run = EngineRun(100, [request([5, 5], [TOP, TOP])])
    agreement = compare(run, run)
    assert agreement.identical_fraction == 1.0
    assert agreement.max_logprob_diff == 0.0 and agreement.max_divergence_gap == 0.0


def test_greedy_split_at_a_near_tie_reports_its_gap():
    shifted = [(tid, lp + 0.01) for tid, lp in TOP]
    reference = EngineRun(100, [request([5, 5], [TOP, TOP])])
    candidate = EngineRun(200, [request([5, 6], [shifted, shifted])])
    agreement = compare(reference, candidate)
    assert agreement.identical_requests == 0
    assert math.isclose(agreement.max_logprob_diff, 0.01, abs_tol=1e-9)
    assert math.isclose(agreement.max_divergence_gap, 0.05, abs_tol=1e-9)  # -0.50 vs -0.55


def test_split_to_a_token_outside_the_reference_top5_is_no_tie():
    reference = EngineRun(100, [request([5], [TOP])])
    candidate = EngineRun(100, [request([42], [TOP])])
    assert compare(reference, candidate).max_divergence_gap == math.inf


def test_sampled_splits_are_not_judged_as_ties():
    reference = EngineRun(100, [request([5], [TOP], greedy=False)])
    candidate = EngineRun(100, [request([42], [TOP], greedy=False)])
    agreement = compare(reference, candidate)
    assert agreement.identical_requests == 0 and agreement.max_divergence_gap == 0.0
