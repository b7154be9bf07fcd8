"""``--dcp-comm lse``'s weight step on SGLang's real linear layers, without processes: each
rank of a DCP group (tp = D = 2, 4 query heads, 1 KV head) widened to the group's heads must
hold exactly the full model's q rows, k/v rows and o_proj columns of its group; what the
path does not cover is named. The all-gather is simulated from every rank's shards."""

import pytest
import torch

HIDDEN, HEAD_DIM, HEADS, DCP = 16, 8, 4, 2
HEADS_PER_RANK = HEADS // DCP


class FakeGroup:
    """``GroupCoordinator.all_gather`` over ranks whose sends are known in advance:
    ``sends[c][i]`` is what rank ``c`` sends at its ``i``-th all-gather."""

    def __init__(self, rank, sends):
        self.rank_in_group, self.world_size, self.sends, self.calls = rank, len(sends), sends, 0

    def all_gather(self, x, dim):
        assert torch.equal(x, self.sends[self.rank_in_group][self.calls])
        gathered = torch.cat([sent[self.calls] for sent in self.sends], dim=dim)
        self.calls += 1
        return gathered


class Attention(torch.nn.Module):
    """The shape of SGLang's Llama/Qwen attention modules: what the weight step reads."""

    def __init__(self, rank, full):
        from sglang.srt.layers.linear import QKVParallelLinear, RowParallelLinear
        from sglang.srt.layers.radix_attention import RadixAttention

        super().__init__()
        self.num_heads, self.q_size = HEADS_PER_RANK, HEADS_PER_RANK * HEAD_DIM
        self.qkv_proj = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, 1, bias=True, tp_rank=rank,
                                          tp_size=DCP, params_dtype=torch.float32)
        self.o_proj = RowParallelLinear(HEADS * HEAD_DIM, HIDDEN, bias=True, tp_rank=rank,
                                        tp_size=DCP, params_dtype=torch.float32)
        self.attn = RadixAttention(HEADS_PER_RANK, HEAD_DIM, HEAD_DIM**-0.5, 1, layer_id=0)
        own = slice(rank * self.q_size, (rank + 1) * self.q_size)
        for name in ("weight", "bias"):  # rank r's q rows, the replicated KV head
            getattr(self.qkv_proj, name).data = torch.cat([full[f"q_{name}"][own], full[f"kv_{name}"]])
        self.o_proj.weight.data = full["o_weight"][:, own].contiguous()
        self.o_proj.bias.data = full["o_bias"]


class PerHeadNormAttention(Attention):
    """Like Cohere's attention with ``use_qk_norm``: a q norm weight per head of this rank,
    which widening to the group's heads would leave at ``Hq`` heads."""

    def __init__(self, rank, full):
        super().__init__(rank, full)
        self.q_norm = torch.nn.LayerNorm([HEADS_PER_RANK, HEAD_DIM])


def qualified_name(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@pytest.fixture
def verified(monkeypatch):
    """This file's ``Attention`` counts as a verified attention class."""
    import sglang_dcp.model_executor.group_heads as group_heads

    monkeypatch.setattr(group_heads, "VERIFIED_ATTENTION_CLASSES",
                        group_heads.VERIFIED_ATTENTION_CLASSES | {qualified_name(Attention)})  # fmt: skip


@pytest.fixture
def full():
    gen = torch.Generator().manual_seed(0)
    shapes = dict(q_weight=(HEADS * HEAD_DIM, HIDDEN), kv_weight=(2 * HEAD_DIM, HIDDEN),
                  q_bias=(HEADS * HEAD_DIM,), kv_bias=(2 * HEAD_DIM,),
                  o_weight=(HIDDEN, HEADS * HEAD_DIM), o_bias=(HIDDEN,))
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


def sends(module):
    """What ``take_group_heads`` all-gathers, in order: q rows of the weight and bias, o_proj."""
    q_rows = module.q_size
    return [module.qkv_proj.weight.data[:q_rows], module.qkv_proj.bias.data[:q_rows],
            module.o_proj.weight.data]


def test_each_rank_holds_the_group_heads(full, verified):
    from sglang_dcp.model_executor.group_heads import (
        attention_modules,
        has_group_heads,
        take_group_heads,
    )

    ranks = [Attention(r, full) for r in range(DCP)]
    assert attention_modules(ranks[0]) == ([("", ranks[0])], "")
    all_sends = [sends(m) for m in ranks]
    for rank, module in enumerate(ranks):
        extra = take_group_heads(module, FakeGroup(rank, all_sends))
        qkv, o_proj = module.qkv_proj, module.o_proj
        assert torch.equal(qkv.weight, torch.cat([full["q_weight"], full["kv_weight"]]))
        assert torch.equal(qkv.bias, torch.cat([full["q_bias"], full["kv_bias"]]))
        assert torch.equal(o_proj.weight, full["o_weight"])
        assert (module.num_heads, module.q_size, module.attn.tp_q_head_num) == (
            HEADS, HEADS * HEAD_DIM, HEADS)
        assert qkv.output_size_per_partition == qkv.weight.shape[0] == sum(qkv.output_partition_sizes)
        assert o_proj.input_size_per_partition == o_proj.weight.shape[1]
        assert has_group_heads(module.attn)
        per_copy = HEADS_PER_RANK * HEAD_DIM * (2 * HIDDEN + 1) * 4  # q rows + bias, o columns
        assert extra == (DCP - 1) * per_copy
        # the model's own split still works: q of every head of the group, then k, v
        q, k, v = qkv(torch.ones(3, HIDDEN))[0].split([module.q_size, HEAD_DIM, HEAD_DIM], dim=-1)
        assert q.shape == (3, HEADS * HEAD_DIM) and k.shape == v.shape == (3, HEAD_DIM)


def query_head_counts(module):
    qkv = module.qkv_proj
    return (module.num_heads, module.q_size, qkv.num_heads, qkv.q_proj_shard_size,
            qkv.output_size_per_partition, list(qkv.output_partition_sizes),
            module.o_proj.input_size_per_partition, module.attn.tp_q_head_num)  # fmt: skip


def test_weight_methods_run_at_tp_shapes(full, monkeypatch):
    """``at_tp_shapes`` around a weight update: inside, each rank holds exactly TP's shard and
    head counts (what SGLang's loaders slice); after, the group's heads of the new weights,
    in the same storage (captured CUDA graphs read it)."""
    import types

    import sglang_dcp.model_executor.group_heads as group_heads

    ranks = [Attention(r, full) for r in range(DCP)]
    all_sends = [sends(m) for m in ranks]
    for rank, module in enumerate(ranks):
        group_heads.take_group_heads(module, FakeGroup(rank, all_sends))
    gen = torch.Generator().manual_seed(1)
    new = {name: torch.randn(t.shape, generator=gen) for name, t in full.items()}
    new_tp = [Attention(r, new) for r in range(DCP)]  # what TP rank r holds after the update
    new_sends = [sends(m) for m in new_tp]

    for rank, module in enumerate(ranks):
        storage = [p.data_ptr() for p in group_heads.widened_params(module)]
        old_tp = Attention(rank, full)

        def update(runner, name):  # a loader: checks the shapes, copies in place
            assert name == "q_proj" and not group_heads.has_group_heads(module.attn)
            assert query_head_counts(module) == query_head_counts(old_tp)
            for param, tp, loaded in zip(*(group_heads.widened_params(m) for m in (module, old_tp, new_tp[rank]))):
                assert torch.equal(param, tp)
                param.data.copy_(loaded)
            return "done"

        monkeypatch.setattr(group_heads, "get_dcp_group", lambda: FakeGroup(rank, new_sends))
        runner = types.SimpleNamespace(model=torch.nn.ModuleDict({"layer": module}),
                                       server_args=types.SimpleNamespace(dcp_size=DCP, dcp_comm="lse"))
        assert group_heads.at_tp_shapes(update, runner, "q_proj") == "done"
        assert group_heads.has_group_heads(module.attn)
        assert torch.equal(module.qkv_proj.weight, torch.cat([new["q_weight"], new["kv_weight"]]))
        assert torch.equal(module.qkv_proj.bias, torch.cat([new["q_bias"], new["kv_bias"]]))
        assert torch.equal(module.o_proj.weight, new["o_weight"])
        assert [p.data_ptr() for p in group_heads.widened_params(module)] == storage
        assert query_head_counts(module)[0] == HEADS


def test_weight_methods_pass_through_without_group_heads(full):
    import types

    from sglang_dcp.model_executor.group_heads import at_tp_shapes

    module = Attention(0, full)
    for args in (dict(dcp_size=1, dcp_comm="lse"), dict(dcp_size=DCP, dcp_comm="a2a"),
                 dict(dcp_size=DCP, dcp_comm="lse")):  # fmt: skip
        runner = types.SimpleNamespace(model=module, server_args=types.SimpleNamespace(**args))
        assert at_tp_shapes(lambda r, x: (r, x), runner, 3) == (runner, 3)


@pytest.mark.parametrize("change, phrase", [
    (lambda m: setattr(m.o_proj, "quant_method", object()), "object weights"),
    (lambda m: setattr(m, "q_size", 3), "no num_heads / q_size"),
    (lambda m: delattr(m, "num_heads"), "no num_heads / q_size"),
    (lambda m: setattr(m.o_proj, "input_is_parallel", False), "o_proj does not take"),
    (lambda m: setattr(m, "o_proj", torch.nn.Linear(2, 2)), "not built from qkv_proj"),
])  # fmt: skip
def test_uncovered_modules_are_named(full, verified, change, phrase):
    from sglang_dcp.model_executor.group_heads import attention_modules

    module = Attention(0, full)
    change(module)
    _, reason = attention_modules(torch.nn.ModuleDict({"layer": module}))
    assert reason.startswith("layer: ") and phrase in reason, reason


def test_a_stray_radix_attention_is_not_covered(full, verified):
    from sglang_dcp.model_executor.group_heads import attention_modules

    model = torch.nn.ModuleDict({"layer": Attention(0, full), "other": Attention(1, full).attn})
    assert "outside an attention module" in attention_modules(model)[1]


def test_an_attention_class_not_verified_is_not_covered(full, verified):
    """A module with state split by TP over the query heads outside qkv_proj / o_proj (here a
    per-head q norm) has the same qkv_proj, o_proj and attn as a covered one: only its class
    tells them apart."""
    from sglang_dcp.model_executor.group_heads import attention_modules

    _, reason = attention_modules(torch.nn.ModuleDict({"layer": PerHeadNormAttention(0, full)}))
    assert reason == f"layer: {qualified_name(PerHeadNormAttention)} is not an attention class verified with lse (VERIFIED_ATTENTION_CLASSES)"


def test_verified_attention_classes_exist():
    """Each name is an attention class of SGLang 0.5.14 (a rename would fall back silently)."""
    import importlib

    from sglang_dcp.model_executor.group_heads import VERIFIED_ATTENTION_CLASSES

    for name in VERIFIED_ATTENTION_CLASSES:
        module, cls = name.rsplit(".", 1)
        assert isinstance(getattr(importlib.import_module(module), cls), type), name
