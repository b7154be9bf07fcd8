"""The GSM8K runner's pieces that run without a server (``benchmark/dcp/bench_accuracy.py``):
its prompts and answers are SGLang's ``few_shot_gsm8k``'s, its runs are compared in the pairs
it promises, and a differing answer is explained at its first split."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmark", "dcp"))

import bench_accuracy  # noqa: E402

from sglang_dcp.test.gsm8k import gsm8k_rows  # noqa: E402


def test_prompts_and_answers_are_few_shot_gsm8k():
    few_shot_gsm8k = pytest.importorskip("sglang.test.few_shot_gsm8k")
    rows = gsm8k_rows(200)
    shots = few_shot_gsm8k.get_few_shot_examples(rows, bench_accuracy.NUM_SHOTS)
    expected = [shots + few_shot_gsm8k.get_one_example(rows, i, False) for i in range(len(rows))]
    assert bench_accuracy.few_shot_prompts(rows) == expected
    for row in rows:
        assert bench_accuracy.answer_value(row["answer"]) == few_shot_gsm8k.get_answer_value(row["answer"])
    assert bench_accuracy.answer_value("no number here") is None


def answer(ids, top_ids):
    """One greedy answer whose reference distribution ranks ``top_ids`` 0, -0.01, -1 ..."""
    top = [[0.0, -0.01, -1.0][: len(t)] for t in top_ids]
    return {"text": " ".join(map(str, ids)), "output_ids": ids, "token_logprobs": [t[0] for t in top],
            "top_logprobs": top, "top_ids": top_ids, "spec_verify_ct": 0, "spec_accept_histogram": []}


def test_runs_compared_in_pairs_with_the_first_split():
    tops = [[5, 6, 7], [8, 9, 10]]
    runs = {name: {"run": name, "capacity": 100 * (2 if name.startswith("dcp2") else 1),
                   "answers": [answer([5, 8], tops), answer([5, 8], tops)]}
            for name in ("dcp1", "dcp2-a2a", "dcp1-standalone", "dcp2-standalone-a2a")}
    runs["dcp2-a2a"]["answers"][1] = answer([5, 9], tops)  # the reference's second choice, 0.01 below
    pairs = [(c["reference"], c["candidate"]) for c in bench_accuracy.comparisons_of(runs)]
    assert pairs == [("dcp1", "dcp2-a2a"), ("dcp1", "dcp1-standalone"),
                     ("dcp1-standalone", "dcp2-standalone-a2a"), ("dcp1", "dcp2-standalone-a2a")]
    split_run = bench_accuracy.comparisons_of(runs)[0]
    assert (split_run["identical_answers"], split_run["compared"], split_run["capacity_ratio"]) == (1, 2, 2.0)
    assert [(s["request"], s["position"], s["gap"]) for s in split_run["splits"]] == [(1, 1, 0.01)]


def test_accept_histograms_summed_over_requests():
    run = {"capacity": 10, "latency_s": 1.0,
           "answers": [{**answer([1, 2, 3], [[1], [2], [3]]), "spec_verify_ct": 2, "spec_accept_histogram": [1, 1]},
                       {**answer([1, 2], [[1], [2]]), "spec_verify_ct": 1, "spec_accept_histogram": [0, 0, 1]}]}
    figures = bench_accuracy.run_figures(run, [3, 7])
    assert figures["accepted_drafts_histogram"] == [1, 1, 1]
    assert (figures["verify_passes"], figures["mean_accept_length"]) == (3, round(5 / 3, 3))
    assert (figures["accuracy"], figures["invalid"]) == (0.5, 0.0)
