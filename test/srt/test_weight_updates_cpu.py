"""SGLang's weight-update paths under DCP on CPU: an engine started on one model and updated to
another must answer like a fresh engine started on the other.

Llama, tp 2, 4 query heads and 1 KV head (2 heads per rank), dcp 2, float32 random weights:
model A (seed 0) and model B (seed 1). The reference is a fresh dcp 1 engine on B. The DCP
engine (``--dcp-comm`` lse, whose layers hold their group's query heads, and a2a) starts on A
and reaches B by each path SGLang 0.5.14 offers on CPU, leaving B in between (back to A from
disk):

* ``update_weights_from_tensor`` (B's checkpoint tensors, by name);
* ``update_weights_from_disk`` (B's folder);
* ``update_weights_from_distributed`` (a gloo group of the engine's 2 ranks and this process
  as rank 0, which broadcasts B's tensors).

After each, the same greedy requests (mixed lengths, a prompt over the chunk size, prefix
hits) must give identical tokens and logprobs within ``LOGPROB_TOL``, and
``get_weights_by_name`` must return B's checkpoint tensors as SGLang's Llama returns them:
TP rank 0's ``q_proj`` rows, ``o_proj`` gathered over TP (not the group's heads). (The dcp 1
engine is no reference for shapes on CPU: SGLang pads its KV heads up to tp there.)
"""

import threading

import pytest
import torch
from test_e2e_cpu import LOGPROB_TOL, VOCAB_SIZE, cpu_engine_kwargs

from sglang_dcp.test.engine_compare import (
    EngineRun,
    SchedulerCounts,
    compare,
    mixed_scenario,
    run_scenario,
)
from sglang_dcp.test.gloo_group import free_port
from sglang_dcp.test.models import write_random_gqa_model

pytestmark = pytest.mark.e2e

TP_SIZE = 2
TRUNCATE = 100  # rows that get_weights_by_name returns
HEAD_DIM = 64


def checkpoint(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(f"{path}/model.safetensors")


def expected_weights(path: str) -> dict:
    """What SGLang's ``LlamaForCausalLM.get_weights_by_name`` returns at tp 2 (2 heads per
    rank): TP rank 0's q rows, and ``o_proj`` all-gathered over TP (the whole matrix)."""
    tensors = checkpoint(path)
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"
    return {q: tensors[q][: 2 * HEAD_DIM][:TRUNCATE], o: tensors[o][:TRUNCATE]}


class Trainer:
    """Rank 0 of a gloo group with the engine's ranks 1..tp: the process that sends weights
    for ``update_weights_from_distributed``."""

    GROUP = "dcp_test_weights"

    def __init__(self, engine):
        from sglang.srt.utils.common import init_custom_process_group

        port, world_size = free_port(), 1 + TP_SIZE
        joined = {}
        rank0 = threading.Thread(target=lambda: joined.setdefault("group", init_custom_process_group(
            backend="gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=world_size, rank=0,
            group_name=self.GROUP)))  # fmt: skip
        rank0.start()
        ok, message = engine.init_weights_update_group("127.0.0.1", port, 1, world_size, self.GROUP, "gloo")
        rank0.join()
        assert ok, message
        self.engine, self.group = engine, joined["group"]

    def send(self, tensors: dict):
        names = list(tensors)
        sender = threading.Thread(target=lambda: [
            torch.distributed.broadcast(tensors[name], src=0, group=self.group) for name in names])
        sender.start()
        ok, message = self.engine.update_weights_from_distributed(
            names, [str(tensors[n].dtype).removeprefix("torch.") for n in names],
            [list(tensors[n].shape) for n in names], self.GROUP)  # fmt: skip
        sender.join()
        assert ok, message

    def close(self):
        self.engine.destroy_weights_update_group(self.GROUP)
        torch.distributed.destroy_process_group(self.group)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    config = dict(num_attention_heads=4, num_key_value_heads=1, vocab_size=VOCAB_SIZE,
                  architecture="LlamaForCausalLM")  # fmt: skip
    return [write_random_gqa_model(str(tmp_path_factory.mktemp(f"model_{seed}")), seed=seed, **config)
            for seed in (0, 1)]  # fmt: skip


@pytest.fixture(scope="module")
def scenario():
    """Greedy batches only: without deterministic inference (which DCP refuses) SGLang samples
    from the process's RNG, whose state differs after earlier sampled runs."""
    return mixed_scenario(VOCAB_SIZE, [1, 17, 150], max_new_tokens=8)[:2]


@pytest.fixture(scope="module")
def reference(models, scenario):
    """The results of a fresh dcp 1 engine on B."""
    import sglang

    engine = sglang.Engine(model_path=models[1], **cpu_engine_kwargs(TP_SIZE))
    try:
        return run_scenario(engine, scenario, SchedulerCounts())
    finally:
        engine.shutdown()


@pytest.mark.parametrize("dcp_comm", ["lse", "a2a"])
def test_updated_engine_matches_a_fresh_one(models, scenario, reference, capfd, dcp_comm):
    import sglang

    model_a, model_b = models
    weights_b = expected_weights(model_b)
    capfd.readouterr()
    engine = sglang.Engine(model_path=model_a, dcp_size=2, dcp_comm=dcp_comm,
                           **{**cpu_engine_kwargs(TP_SIZE), "log_level": "info"})  # fmt: skip
    if dcp_comm == "lse":  # the layers hold their group's heads (no fallback to a2a)
        assert "compute the 4 query heads of their DCP group" in capfd.readouterr().err
    trainer = None
    try:
        def check(path):
            results = run_scenario(engine, scenario, SchedulerCounts())
            agreement = compare(EngineRun(0, reference), EngineRun(0, results))
            print(f"{dcp_comm}, {path}: {agreement}")
            assert agreement.identical_requests == agreement.num_requests, (path, agreement)
            assert agreement.max_logprob_diff < LOGPROB_TOL, (path, agreement)
            for name, want in weights_b.items():
                got = torch.tensor(engine.get_weights_by_name(name, TRUNCATE))
                assert got.shape == want.shape and torch.equal(got, want), (path, name, got.shape, want.shape)

        assert engine.update_weights_from_tensor(list(checkpoint(model_b).items()))[0]
        check("update_weights_from_tensor")
        for path in (model_a, model_b):
            result = engine.update_weights_from_disk(path)  # (success, message, ...)
            assert result[0], result
        check("update_weights_from_disk")
        assert engine.update_weights_from_disk(model_a)[0]
        trainer = Trainer(engine)
        trainer.send(checkpoint(model_b))
        check("update_weights_from_distributed")
    finally:
        if trainer is not None:
            trainer.close()
        engine.shutdown()

