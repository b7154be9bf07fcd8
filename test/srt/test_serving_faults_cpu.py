"""DCP behind SGLang's HTTP server on CPU, against a dcp 1 server on the same weights: aborts,
a soak, bad input and a killed scheduler.

Two ``launch_server --tp 2`` servers run side by side on 127.0.0.1 (``--dcp-size 1`` as the
reference, ``--dcp-size 2``; float32 random Qwen3 with 1 KV head, chunked prefill 64). Both
run with SGLang's strict idle memory check (a leak raises in the scheduler and ends the
server) and, under DCP, the plugin's check that every DCP rank's allocator replica holds the
same free pages at idle. "No leaked slot" below means: the server is still up after going
idle and its log has neither check's message.
"""

import concurrent.futures
import json
import os
import random
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest

from sglang_dcp.test.models import write_random_gqa_model
from sglang_dcp.test.serving import (
    Server,
    device_server_args,
    http_json,
    stream_generate,
    write_byte_tokenizer,
)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmark", "dcp"))
import soak  # noqa: E402

pytestmark = pytest.mark.e2e

VOCAB_SIZE = 1024
CONTEXT_LENGTH = 32768
MAX_TOTAL_TOKENS = 12288  # physical rows per rank: 12288 logical tokens at dcp 1, 24576 at dcp 2
CHUNKED_PREFILL_SIZE = 64
MAX_RUNNING_REQUESTS = 8
# 157 chunks, over 10 s of prefill on 2 idle cores: the abort of a client that hangs up 1 s in
# reaches the scheduler ~4 s in (SGLang polls for a disconnect every
# SGLANG_REQUEST_STATE_WAIT_TIMEOUT s) and must land mid-prefill; 3000 tokens (2.4 s) did not
# on idle cores. The dcp 1 reference holds it too.
LONG_PROMPT = 10000
LEAK_MESSAGES = ("memory leak detected", "Mem Leak Detected", "replicas disagree")
SERVER_ENV = {
    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1",
    # how often a waiting request polls for a client disconnect (s; SGLang's default 4)
    "SGLANG_REQUEST_STATE_WAIT_TIMEOUT": "1",
    # SGLang waits 5 s + this after a scheduler dies, for CUDA core dumps (even on CPU)
    "SGLANG_CUDA_COREDUMP_BEFORE_CRASH": "0",
}


def server_args(model: str, dcp_size: int):
    return [
        "--model-path", model, "--tp-size", "2", "--dcp-size", str(dcp_size),
        *device_server_args("cpu", 2), "--dtype", "float32", "--mem-fraction-static", "0.3",
        "--max-total-tokens", str(MAX_TOTAL_TOKENS), "--chunked-prefill-size", str(CHUNKED_PREFILL_SIZE),
        "--max-running-requests", str(MAX_RUNNING_REQUESTS), "--grammar-backend", "none",
        "--random-seed", "0",
    ]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """``{"reference": dcp 1 server, "dcp": dcp 2 server}``, started side by side."""
    work = tmp_path_factory.mktemp("serving")
    model = write_random_gqa_model(
        str(work / "model"), num_attention_heads=4, num_key_value_heads=1,
        vocab_size=VOCAB_SIZE, max_position_embeddings=CONTEXT_LENGTH,
    )
    write_byte_tokenizer(model, vocab_size=VOCAB_SIZE, model_vocab_size=VOCAB_SIZE)
    saved = {name: os.environ.get(name) for name in SERVER_ENV}
    os.environ.update(SERVER_ENV)
    started = {
        "reference": Server(server_args(model, 1), 31301, str(work / "reference.log")),
        "dcp": Server(server_args(model, 2), 31302, str(work / "dcp.log")),
    }
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(server.__enter__) for server in started.values()]:
                future.result()
        yield started
    finally:
        for server in started.values():
            if hasattr(server, "process"):
                server.__exit__()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def prompt(length: int, seed: int):
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB_SIZE) for _ in range(length)]


def greedy(server: Server, input_ids, max_new_tokens: int = 8, rid=None):
    body = {"input_ids": input_ids, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}}
    if rid is not None:
        body["rid"] = rid
    status, out = http_json(server.url + "/generate", body)
    assert status == 200, out
    return out


def assert_no_leak(server: Server):
    """Let the server go idle (both memory checks run), then require it alive and silent."""
    server.wait_idle()
    time.sleep(1.0)
    assert server.process.poll() is None, f"server died; see {server.log_path}"
    with open(server.log_path) as f:
        log = f.read()
    found = [m for m in LEAK_MESSAGES if m in log]
    assert not found, f"{found} in {server.log_path}"
    if "--dcp-size 2" in " ".join(server.args):  # the replica check ran on both ranks
        assert log.count("DCP allocator replicas agree at idle") == 2, server.log_path


def finish_reason(out: dict) -> str:
    return out["meta_info"]["finish_reason"]["type"]


def test_aborts_leave_no_leak(servers):
    reference, dcp = servers["reference"], servers["dcp"]
    probe, long_prompt = prompt(100, 1), prompt(LONG_PROMPT, 2)
    expected_probe = greedy(reference, probe, 16)["output_ids"]
    assert greedy(dcp, probe, 16)["output_ids"] == expected_probe
    figures = {}

    # mid-prefill, /abort_request: the long prompt's chunked prefill is cut off
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(greedy, dcp, long_prompt, 8, "prefill-abort")
        time.sleep(1.0)
        assert http_json(dcp.url + "/abort_request", {"rid": "prefill-abort"})[0] == 200
        out = future.result()
    assert finish_reason(out) == "abort" and out["meta_info"]["completion_tokens"] == 0, out["meta_info"]
    figures["prefill /abort_request"] = out["meta_info"]["completion_tokens"]

    # mid-prefill, client disconnect (another long prompt; SGLang aborts a stream 2 s after
    # its client hangs up)
    other_long = prompt(LONG_PROMPT, 3)
    dcp.wait_idle()
    status, events = stream_generate(
        dcp.url, {"input_ids": other_long, "sampling_params": {"max_new_tokens": 8, "temperature": 0}},
        hang_up_after_s=1.0)
    assert not events, "the prefill ended before the hang-up: make LONG_PROMPT longer"

    # mid-decode, /abort_request on a stream
    def decode_body(seed):
        return {"input_ids": prompt(20, seed), "sampling_params": {"max_new_tokens": 2000, "temperature": 0}}

    result = {}
    time.sleep(3.0)  # SGLang's abort of the hung-up stream; /get_load does not count a chunked prefill
    dcp.wait_idle()
    reader = threading.Thread(target=lambda: result.update(stream=stream_generate(
        dcp.url, {**decode_body(4), "rid": "decode-abort"})))
    reader.start()
    time.sleep(3.0)
    assert http_json(dcp.url + "/abort_request", {"rid": "decode-abort"})[0] == 200
    reader.join(120)
    status, events = result["stream"]
    assert status == 200 and events and finish_reason(events[-1]) == "abort", events[-1:]
    decoded = events[-1]["meta_info"]["completion_tokens"]
    assert 0 < decoded < 2000
    figures["decode /abort_request"] = decoded

    # mid-decode, client disconnect after 3 events
    dcp.wait_idle()
    status, events = stream_generate(dcp.url, decode_body(5), hang_up_after_chunks=3)
    assert status == 200 and len(events) == 3
    figures["decode disconnect"] = len(events[-1]["output_ids"])
    figures["decode disconnect: s to idle"] = round(dcp.wait_idle(), 1)

    # abort_all while three requests decode
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(greedy, dcp, decode_body(6 + i)["input_ids"], 2000) for i in range(3)]
        time.sleep(3.0)
        assert http_json(dcp.url + "/abort_request", {"abort_all": True})[0] == 200
        outs = [f.result() for f in futures]
    assert all(finish_reason(o) == "abort" for o in outs), [o["meta_info"] for o in outs]
    figures["abort_all"] = [o["meta_info"]["completion_tokens"] for o in outs]

    assert_no_leak(dcp)
    # afterwards: the same greedy tokens as the reference, fresh and on the aborted prompts
    # (whose prefill chunks the radix cache may have kept)
    assert greedy(dcp, probe, 16)["output_ids"] == expected_probe
    for long in (long_prompt, other_long):
        out = greedy(dcp, long)
        cached = out["meta_info"]["cached_tokens"]
        figures.setdefault("cached tokens on resend", []).append(cached)
        assert cached < LONG_PROMPT - CHUNKED_PREFILL_SIZE, "the aborted prefill had finished"
        assert out["output_ids"] == greedy(reference, long)["output_ids"]
    assert_no_leak(dcp)
    assert_no_leak(reference)
    print(f"aborts (tokens decoded before each; cached tokens when the cut prompts are sent "
          f"again): {json.dumps(figures)}")


def post_raw(url: str, data: bytes):
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


BAD_INPUTS = {
    "prompt longer than the context": {"input_ids": prompt(CONTEXT_LENGTH + 10, 7)},
    "prompt longer than the logical capacity": {"input_ids": prompt(2 * MAX_TOTAL_TOKENS + 100, 8)},
    "empty text": {"text": ""},
    "empty input_ids": {"input_ids": []},
    "max_new_tokens -1": {"input_ids": prompt(10, 9), "sampling_params": {"max_new_tokens": -1}},
    "max_new_tokens 10**12": {"input_ids": prompt(10, 9), "sampling_params": {"max_new_tokens": 10**12}},
}


def test_bad_input_is_a_4xx(servers):
    statuses = {}
    probe = prompt(50, 10)
    expected = greedy(servers["reference"], probe)["output_ids"]
    for name, server in servers.items():
        for case, body in BAD_INPUTS.items():
            status, out = http_json(server.url + "/generate", body, timeout=120)
            statuses[(name, case)] = (status, str(out)[:160])
        statuses[(name, "malformed JSON")] = post_raw(server.url + "/generate", b'{"input_ids": [1, 2')
        assert server.process.poll() is None
        assert greedy(server, probe)["output_ids"] == expected
    for (name, case), (status, message) in statuses.items():
        print(f"{name:9} {case:42} {status} {message}")
    bad = {key: value for key, value in statuses.items() if not 400 <= value[0] < 500}
    assert not bad, bad
    assert_no_leak(servers["dcp"])


def test_soak(servers, tmp_path):
    """A CPU-sized soak (the GPU and long runs: benchmark/dcp/soak.py)."""
    args = soak.parse_args([
        "--reference-url", servers["reference"].url, "--candidate-url", servers["dcp"].url,
        "--num-requests", os.environ.get("SOAK_REQUESTS", "300"), "--time-limit", "600",
        "--chunk", str(CHUNKED_PREFILL_SIZE), "--max-running-requests", str(MAX_RUNNING_REQUESTS),
        "--vocab-size", str(VOCAB_SIZE), "--out", str(tmp_path / "soak.json"),
    ])
    summary = soak.run(args)
    candidate = summary["candidates"]["candidate"]
    assert candidate["mismatched"] == 0, summary
    assert not any(summary["errors"].values()), summary["errors"]
    assert candidate["compared"] > 0 and summary["aborted"]["candidate"] > 0
    for server in servers.values():
        assert_no_leak(server)


def test_killed_scheduler_ends_server(servers):
    """SIGKILL the scheduler of TP rank 1 (DCP rank 1): the server exits within 60 s, with
    an error in its log, and no process of it is left. Runs last: it ends the dcp server."""
    dcp = servers["dcp"]
    children = psutil.Process(dcp.process.pid).children(recursive=True)
    schedulers = [p for p in children if "TP1" in " ".join([p.name()] + p.cmdline())]
    assert len(schedulers) == 1, [(p.pid, p.name(), p.cmdline()) for p in children]
    start = time.time()
    os.kill(schedulers[0].pid, signal.SIGKILL)
    try:
        dcp.process.wait(timeout=60)
    except Exception:
        pytest.fail(f"server still running 60 s after its TP1 scheduler was killed; see {dcp.log_path}")
    exit_s = time.time() - start
    gone, alive = psutil.wait_procs(children, timeout=10)
    left = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    with open(dcp.log_path) as f:
        log = f.read()
    print(f"server exited {exit_s:.1f} s after the kill with code {dcp.process.returncode}; "
          f"{len(children)} children, left: {left}")
    assert not left
    # gloo reports the dead peer as "reset" or "closed", depending on which call noticed it.
    peer_lost = re.search(r"Connection (reset|closed) by peer", log)
    assert "SIGQUIT received" in log and peer_lost, log[-3000:]
