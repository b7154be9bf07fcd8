"""``benchmark/dcp/demo.py``: its comparison on canned answers (pass, a differing answer, a
capacity that is not D x), and one short real run of its random-model path at tp=2, dcp=2
(two HTTP servers; exit code 0 only for identical answers and 2x the capacity)."""

import os
import subprocess
import sys

import pytest

BENCH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmark", "dcp")
sys.path.insert(0, BENCH_DIR)
from demo import ServedRun, compare_runs  # noqa: E402

QUESTIONS = ["What is the capital of France?", "List three fruits that are red."]
ANSWERS = ["The capital of France is Paris.",
           "1. Strawberries\n2. Cherries\n3. Raspberries, all of them red and sweet " * 4]


def test_compare_runs_identical_answers_and_double_capacity():
    base = ServedRun("tp=6", 8192, ANSWERS)
    dcp = ServedRun("tp=6, dcp=2", 16384, list(ANSWERS))
    lines, passed = compare_runs(QUESTIONS, base, dcp, 2, tokens_per_request=1064, width=80)
    text = "\n".join(lines)
    print(text)
    assert passed
    assert text.count("identical: yes") == 2
    assert "identical answers: 2/2" in text
    columns = [[cell.strip() for cell in line.split(" | ")] for line in lines if " | " in line]
    assert ["The capital of France is Paris."] * 2 in columns  # side by side
    assert ["1. Strawberries 2. Cherries 3."] * 2 in columns  # newlines folded, wrapped
    assert ["1. Strawberries 2. Cherries 3. ..."] * 2 in columns  # cut after 3 lines
    assert max(len(line) for line in lines) <= 80
    assert lines[-2].split()[-1] == str(8192 // 1064)  # requests of 1064 tokens at once: 7
    assert lines[-1].split()[-2:] == [str(16384 // 1064), "(2.00x)"]  # 15


@pytest.mark.parametrize("dcp_capacity, dcp_answers", [
    (16384, [ANSWERS[0], "Apples."]),  # a differing answer
    (8192, ANSWERS),  # the capacity did not grow D times
])
def test_compare_runs_fails(dcp_capacity, dcp_answers):
    lines, passed = compare_runs(QUESTIONS, ServedRun("tp=6", 8192, ANSWERS),
                                 ServedRun("tp=6, dcp=2", dcp_capacity, dcp_answers), 2, 1064)
    assert not passed
    assert ("identical: NO" in lines) == (dcp_answers != ANSWERS)


def test_bad_arguments_fail_before_any_server():
    run = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "demo.py"), "--tp", "6", "--dcp", "4"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--dcp must be at least 2 and divide --tp (6), got 4" in run.stderr


@pytest.mark.e2e
def test_random_model_demo_tp2_dcp2():
    run = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "demo.py"), "--random-model",
                          "--tp", "2", "--dcp", "2", "--max-new-tokens", "16", "--port", "30041"],
                         capture_output=True, text=True, timeout=900)
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "identical answers: 4/4" in run.stdout
    assert "(2.00x)" in run.stdout and "DCP passed" in run.stdout
