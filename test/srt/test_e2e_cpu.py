"""End to end on CPU: real SGLang engines (torch_native + gloo), dcp=1 against dcp>1.

``--dcp-size 1`` must leave SGLang bit-identical: same tokens and logprobs as SGLang
without the plugin. The DCP cases cover Qwen3 (tp2 with 1 KV head, tp4 with 2), Llama, Qwen2,
Qwen3-MoE, Gemma and GLM-4 (tp2), each with ``--dcp-comm`` a2a and lse, and D = 4 (Qwen3 at tp4 with 1 KV
head). Each DCP case runs one scenario (mixed prompt lengths in one batch, a prompt longer than
the chunked-prefill size, radix-cache prefix hits, seeded sampling) through an engine without
DCP and one with DCP on the same float32 random weights, and requires identical tokens, top-5
logprobs within ``LOGPROB_TOL`` and exactly D times the logical KV capacity at the same memory
settings.
"""

import pytest

from sglang_dcp.test.engine_compare import (
    compare,
    mixed_scenario,
    run_engine,
    run_engine_isolated,
)
from sglang_dcp.test.models import write_kv_cache_scales, write_random_gqa_model
from sglang_dcp.test.serving import bind_cpu_threads

pytestmark = pytest.mark.e2e

# float32 end to end; DCP only reorders the softmax sums (one extra LSE merge).
LOGPROB_TOL = 1e-4
# FP8 rounds subnormal K/V differently when they are stored scaled
FP8_LOGPROB_TOL = 1e-2
VOCAB_SIZE = 1024
CHUNKED_PREFILL_SIZE = 64
PROMPT_LENGTHS = [1, 5, 17, 33, 64, 150]  # 150 > CHUNKED_PREFILL_SIZE


def cpu_engine_kwargs(tp_size: int) -> dict:
    bind_cpu_threads(tp_size)
    return dict(
        device="cpu",
        tp_size=tp_size,
        dtype="float32",
        mem_fraction_static=0.05,
        max_total_tokens=2048,
        chunked_prefill_size=CHUNKED_PREFILL_SIZE,
        skip_tokenizer_init=True,
        grammar_backend="none",
        disable_cuda_graph=True,
        random_seed=0,
        log_level="error",
    )


def run_dcp(model, scenario, capfd, dcp_comm, group_heads, **kwargs):
    """``run_engine`` with ``dcp_comm`` at log level info; with lse, its start-up lines must
    say that every layer took its group's ``group_heads`` query heads (no fallback to a2a) and
    that the KV pool left room for lse's extend pass."""
    capfd.readouterr()
    run = run_engine(model, scenario, dcp_comm=dcp_comm, **{**kwargs, "log_level": "info"})
    if dcp_comm == "lse":
        err = capfd.readouterr().err
        assert f"compute the {group_heads} query heads of their DCP group" in err
        assert "query heads, --dcp-comm lse)" in err  # reserve_extend_memory's line
    return run


@pytest.mark.parametrize("dcp_comm", ["a2a", "lse"])
@pytest.mark.parametrize(
    "tp_size,dcp_size,num_heads,num_kv_heads,architecture",
    [
        (2, 2, 4, 1, "Qwen3ForCausalLM"),
        (4, 2, 8, 2, "Qwen3ForCausalLM"),
        (4, 4, 8, 1, "Qwen3ForCausalLM"),
        (2, 2, 4, 1, "LlamaForCausalLM"),
        (2, 2, 4, 1, "Qwen2ForCausalLM"),
        (2, 2, 4, 1, "Qwen3MoeForCausalLM"),
        (2, 2, 4, 1, "GemmaForCausalLM"),
        (2, 2, 4, 1, "Glm4ForCausalLM"),
    ],
    ids=["tp2-dcp2-kv1", "tp4-dcp2-kv2", "tp4-dcp4-kv1", "tp2-dcp2-llama", "tp2-dcp2-qwen2",
         "tp2-dcp2-qwen3moe", "tp2-dcp2-gemma", "tp2-dcp2-glm4"],
)
def test_dcp_matches_tp(
    tmp_path_factory, reference_runs, capfd, tp_size, dcp_size, num_heads, num_kv_heads,
    architecture, dcp_comm,
):
    scenario = mixed_scenario(VOCAB_SIZE, PROMPT_LENGTHS, max_new_tokens=16)
    kwargs = cpu_engine_kwargs(tp_size)
    case = (tp_size, num_heads, num_kv_heads, architecture)
    if case not in reference_runs:
        model = write_random_gqa_model(
            str(tmp_path_factory.mktemp("model")),
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            vocab_size=VOCAB_SIZE,
            architecture=architecture,
        )
        reference_runs[case] = (model, run_engine(model, scenario, dcp_size=1, **kwargs))
    model, reference = reference_runs[case]
    candidate = run_dcp(model, scenario, capfd, dcp_comm, num_heads // tp_size * dcp_size,
                        dcp_size=dcp_size, **kwargs)

    assert candidate.capacity == dcp_size * reference.capacity
    agreement = compare(reference, candidate)
    print(f"{dcp_comm}: capacity {reference.capacity} -> {candidate.capacity}; {agreement}")
    assert agreement.identical_requests == agreement.num_requests, agreement
    assert agreement.max_logprob_diff < LOGPROB_TOL, agreement


def test_dcp1_is_bit_identical_to_stock_sglang(tmp_path):
    model = write_random_gqa_model(
        str(tmp_path / "model"), num_attention_heads=4, num_key_value_heads=1, vocab_size=VOCAB_SIZE
    )
    scenario = mixed_scenario(VOCAB_SIZE, PROMPT_LENGTHS, max_new_tokens=8)
    kwargs = cpu_engine_kwargs(2)
    # SGLANG_PLUGINS is a whitelist of plugin names: a name of no plugin loads none.
    stock = run_engine_isolated(model, scenario, env={"SGLANG_PLUGINS": "no-such-plugin"}, **kwargs)
    with_plugin = run_engine_isolated(model, scenario, env={"SGLANG_PLUGINS": "dcp"}, dcp_size=1, **kwargs)
    assert with_plugin == stock


def test_fp8_kv_cache_with_scales(tmp_path):
    """An FP8 KV cache stores ``kv / scale`` and every read multiplies by ``scale``. The
    reference is stock SGLang without scales (dcp 1); DCP runs with scale 0.5 on every layer,
    a power of two, so it stores the reference's values times 2 and reads them back halved:
    equal but for FP8 subnormals, which the scaled store rounds more finely. Greedy tokens
    must be identical. (The CUDA path reads with the same ``kv_scales``; before the fix it read
    ``k_scale`` from a store that never divided by it.)"""
    model = write_random_gqa_model(
        str(tmp_path / "model"), num_attention_heads=4, num_key_value_heads=1, vocab_size=VOCAB_SIZE
    )
    scales = write_kv_cache_scales(str(tmp_path / "kv_scales.json"), 0.5, 2, 2, "qwen3")
    greedy = mixed_scenario(VOCAB_SIZE, PROMPT_LENGTHS, max_new_tokens=16)[:2]
    kwargs = {**cpu_engine_kwargs(2), "kv_cache_dtype": "fp8_e4m3"}
    reference = run_engine(model, greedy, dcp_size=1, **kwargs)
    candidate = run_engine(model, greedy, dcp_size=2, quantization_param_path=scales, **kwargs)

    agreement = compare(reference, candidate)
    print(f"fp8 KV, scale 0.5: {agreement}")
    assert agreement.identical_requests == agreement.num_requests, agreement
    assert agreement.max_logprob_diff < FP8_LOGPROB_TOL, agreement
