"""The attention micro-benchmarks' flows on CPU (``--smoke``): the whole DCP layer on two
gloo ranks (whose run checks DCP against full attention), then its stages on one rank,
combined with it into the communication left over; the extend-memory benchmark's a2a and
lse passes."""

import json
import os
import subprocess
import sys

import pytest

BENCH_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "benchmark", "dcp")


def run_benchmark(script: str, *args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, os.path.join(BENCH_DIR, script), "--device", "cpu",
                          "--smoke", *args], capture_output=True, text=True, timeout=300)
    assert (run.returncode == 0) == expect_ok, run.stdout[-2000:] + run.stderr[-4000:]
    return run


@pytest.fixture(scope="module")
def whole_layer(tmp_path_factory):
    out = tmp_path_factory.mktemp("attention")
    run_benchmark("bench_attention.py", "--dcp", "2", "--out", str(out))
    with open(out / "bench_attention.json") as f:
        return out / "bench_attention.json", json.load(f)


def test_whole_layer_points(whole_layer):
    _, result = whole_layer
    assert result["correctness"]["rel_err"] < result["correctness"]["tol"]
    assert result["correctness"]["lse_rel_err"] < result["correctness"]["tol"]
    assert all(p["lse_us"] > 0 for p in result["points"])
    assert [(p["batch"], p["context"]) for p in result["points"]] == [(1, 64), (1, 128), (2, 64), (2, 128)]


def test_stages_account_for_the_whole_layer(whole_layer, tmp_path):
    path, whole = whole_layer
    run_benchmark("bench_attention_stages.py", "--dcp", "2", "--full", str(path), "--out", str(tmp_path))
    with open(tmp_path / "bench_attention_stages.json") as f:
        stages = json.load(f)
    assert (tmp_path / "bench_attention_stages.png").exists()
    assert len(stages["points"]) == len(whole["points"])
    for point, layer in zip(stages["points"], whole["points"]):
        assert point["full_us"] == layer["dcp_us"]
        assert point["comm_us"] == pytest.approx(point["full_us"] - point["local_us"])
        assert all(point[f"{s}_us"] > 0 for s in ("attention", "pack", "merge", "local"))
        assert (point["reorder_us"] > 0) == (point["batch"] > 1)  # a view at B = 1


def test_stages_refuse_a_result_of_another_dcp_size(whole_layer, tmp_path):
    path, _ = whole_layer
    run = run_benchmark("bench_attention_stages.py", "--dcp", "4", "--full", str(path),
                        "--out", str(tmp_path), expect_ok=False)
    assert "pass a result of the same card model and D" in run.stderr.splitlines()[-1]


def test_extend_memory_runs_both_dcp_paths():
    run = run_benchmark("extend_memory.py")
    assert "smoke: a2a extend ran, output (16, 256)" in run.stdout
    assert "smoke: lse extend ran, output (16, 512)" in run.stdout
