"""DCP under SGLang's own multi-node launch, on one CPU machine: two node processes.

Each "node" is a ``python -m sglang.launch_server --nnodes 2 --node-rank r --dist-init-addr
127.0.0.1:PORT`` process with its own ``--port``, running its share of ``--tp 4`` (SGLang's
``_calculate_rank_ranges``: node 0 TP ranks 0-1, node 1 TP ranks 2-3; every process group on gloo
over localhost). A DCP group is ``D`` consecutive TP ranks, so dcp 2 keeps each group inside a
node and dcp 4 spans both (the start-up warning of ``DCPServerArgs``). Model: a random float32
Llama with 4 query heads and 1 KV head, so every rank holds the one KV head.

Covering set (one launch per line, the dcp 1 reference shared):

* dcp 1: the reference tokens and capacity R;
* dcp 2 with ``--dcp-comm a2a``: groups inside a node;
* dcp 4 with ``--dcp-comm lse`` and with ``a2a``: the group across nodes, where the multi-node
  launch adds something (collectives between node processes) to what ``test_e2e_cpu.py``
  already proves on one node for both paths at D = 2 and 4; ``lse`` at dcp 2 inside a node
  runs the same collectives as in one process tree and is left to ``test_e2e_cpu.py``.

Each DCP launch: every greedy token identical to dcp 1's, logical capacity
(``get_server_info``) exactly ``D * R``, the warning line in both nodes' logs iff a group spans
nodes. The last launch then has a scheduler of node 1 killed: both nodes must exit on their own,
with no process of either left.
"""

import concurrent.futures
import os
import random
import re
import signal
import subprocess
import time

import psutil
import pytest

from sglang_dcp.test.models import write_random_gqa_model
from sglang_dcp.test.serving import Server, device_server_args, http_json

pytestmark = pytest.mark.e2e

TP_SIZE = 4
NNODES = 2
VOCAB_SIZE = 1024
MAX_TOTAL_TOKENS = 2048  # physical rows per rank: the logical capacity is D x this
CHUNKED_PREFILL_SIZE = 64
PORTS = {"http": 31401, "dist_init": 31411}  # node r serves on http + r
SPAN_WARNING = "groups span nodes"
SERVER_ENV = {
    # SGLang waits 5 s + this after a scheduler dies, for CUDA core dumps (even on CPU)
    "SGLANG_CUDA_COREDUMP_BEFORE_CRASH": "0",
}


def node_args(model: str, node_rank: int, dcp_size: int, dcp_comm: str):
    return [
        "--model-path", model, "--tp-size", str(TP_SIZE), "--dcp-size", str(dcp_size),
        "--dcp-comm", dcp_comm, "--nnodes", str(NNODES), "--node-rank", str(node_rank),
        "--dist-init-addr", f"127.0.0.1:{PORTS['dist_init']}",
        *device_server_args("cpu", TP_SIZE), "--dtype", "float32", "--mem-fraction-static", "0.3",
        "--max-total-tokens", str(MAX_TOTAL_TOKENS), "--chunked-prefill-size", str(CHUNKED_PREFILL_SIZE),
        "--skip-tokenizer-init", "--grammar-backend", "none", "--random-seed", "0",
    ]  # fmt: skip


class TwoNodes:
    """Both node processes of one launch, started side by side; node 0 serves the API."""

    def __init__(self, model: str, work, dcp_size: int, dcp_comm: str = "a2a"):
        name = f"dcp{dcp_size}-{dcp_comm}"
        self.nodes = [
            Server(node_args(model, rank, dcp_size, dcp_comm), PORTS["http"] + rank,
                   str(work / f"{name}-node{rank}.log"))
            for rank in range(NNODES)
        ]  # fmt: skip
        self.dcp_size = dcp_size

    def __enter__(self) -> "TwoNodes":
        start = time.time()
        try:
            with concurrent.futures.ThreadPoolExecutor(NNODES) as pool:
                for future in [pool.submit(node.__enter__) for node in self.nodes]:
                    future.result()
        except BaseException:
            self.__exit__()
            raise
        self.ready_s = time.time() - start
        return self

    def __exit__(self, *exc_info) -> None:
        for node in self.nodes:
            if hasattr(node, "process"):
                node.__exit__()

    def log(self, rank: int) -> str:
        with open(self.nodes[rank].log_path) as f:
            return f.read()


def prompts():
    """8 prompts: short ones, two longer than a chunk, and two sharing a 100-token prefix."""
    rng = random.Random(0)
    ids = lambda n: [rng.randrange(3, VOCAB_SIZE) for _ in range(n)]  # noqa: E731
    prefix = ids(100)
    return [ids(5), ids(17), ids(40), ids(150), ids(300), prefix + ids(10), prefix + ids(30), ids(64)]


def generate_all(server: Server, max_new_tokens: int = 16):
    """Greedy ``output_ids`` of every prompt, sent at once (one batch)."""
    def one(input_ids):
        body = {"input_ids": input_ids, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}}
        status, out = http_json(server.url + "/generate", body)
        assert status == 200, out
        return out["output_ids"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, prompts()))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("multinode")
    write_random_gqa_model(
        str(work / "model"), architecture="LlamaForCausalLM", num_attention_heads=4,
        num_key_value_heads=1, vocab_size=VOCAB_SIZE,
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        for name, value in SERVER_ENV.items():
            patch.setenv(name, value)
        yield work


@pytest.fixture(scope="module")
def reference(work):
    """dcp 1 over the two nodes: (greedy outputs, logical capacity)."""
    with TwoNodes(str(work / "model"), work, 1) as launch:
        outputs = generate_all(launch.nodes[0])
        capacity = launch.nodes[0].server_info()["max_total_num_tokens"]
        print(f"dcp 1: ready in {launch.ready_s:.0f} s, capacity {capacity}")
        assert SPAN_WARNING not in launch.log(0) + launch.log(1)
    return outputs, capacity


def check_launch(launch: TwoNodes, reference):
    """Tokens identical, capacity D x, the span warning once in each node's log iff a group
    spans nodes."""
    expected, capacity = reference
    outputs = generate_all(launch.nodes[0])
    same = sum(out == ref for out, ref in zip(outputs, expected))
    got = launch.nodes[0].server_info()["max_total_num_tokens"]
    spans = (TP_SIZE // NNODES) % launch.dcp_size != 0  # a node's TP ranks split a group
    warnings = [launch.log(rank).count(SPAN_WARNING) for rank in range(NNODES)]
    print(f"dcp {launch.dcp_size}: ready in {launch.ready_s:.0f} s, {same}/{len(expected)} "
          f"identical, capacity {capacity} -> {got} ({got / capacity:.2f}x), span warnings {warnings}")
    assert same == len(expected), [(out, ref) for out, ref in zip(outputs, expected) if out != ref]
    assert got == launch.dcp_size * capacity
    assert warnings == [int(spans)] * NNODES


@pytest.mark.parametrize("dcp_size, dcp_comm", [(2, "a2a"), (4, "lse")], ids=["dcp2-a2a", "dcp4-lse"])
def test_tokens_and_capacity(work, reference, dcp_size, dcp_comm):
    with TwoNodes(str(work / "model"), work, dcp_size, dcp_comm) as launch:
        check_launch(launch, reference)


def test_killed_node_scheduler_ends_both_nodes(work, reference):
    """dcp 4 a2a (a group across nodes): tokens and capacity as above, then SIGKILL node 1's
    TP 3 scheduler: both nodes must exit on their own, no process of either left."""
    with TwoNodes(str(work / "model"), work, 4, "a2a") as launch:
        check_launch(launch, reference)
        node0, node1 = (psutil.Process(node.process.pid) for node in launch.nodes)
        processes = [node0, node1] + node0.children(recursive=True) + node1.children(recursive=True)
        schedulers = [p for p in node1.children(recursive=True) if "TP3" in " ".join([p.name()] + p.cmdline())]
        assert len(schedulers) == 1, [(p.pid, p.name(), p.cmdline()) for p in processes]
        start = time.time()
        os.kill(schedulers[0].pid, signal.SIGKILL)
        exit_s = []
        for rank, node in enumerate(launch.nodes):
            try:
                node.process.wait(timeout=max(1.0, start + 120 - time.time()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"node {rank} still running 120 s after node 1's TP3 scheduler was "
                            f"killed; see {node.log_path}")
            exit_s.append(time.time() - start)
        _, alive = psutil.wait_procs(processes, timeout=10)
        left = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        log0 = launch.log(0)
        print(f"after the kill: node 0 exited in {exit_s[0]:.1f} s (code "
              f"{launch.nodes[0].process.returncode}), node 1 in {exit_s[1]:.1f} s; "
              f"{len(processes)} processes, left: {left}")
        assert not left
        assert re.search(r"Connection (reset|closed) by peer", log0), log0[-3000:]
