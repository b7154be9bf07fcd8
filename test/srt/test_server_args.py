"""``--dcp-size`` through the real user path: plugin loading, then SGLang's own argv parser.

Each test calls ``sglang.srt.server_args.prepare_server_args(argv)`` (what ``sglang serve``
and ``python -m sglang.launch_server`` do) after ``load_plugins()`` has installed
``DCPServerArgs`` over SGLang's ``ServerArgs``. No engine starts and no weights load: the
model folders hold only a config.json. Covered:

* every refusal of ``DCPServerArgs`` (flags, attention backends, CUDA graphs, models) raises
  ``DCPConfigError`` with one line that names the fix; a bad value raises argparse's
  ``SystemExit``;
* the accepted settings resolve to the logical page ``page_size * dcp_size``, the DCP
  attention backend and eager prefill; with no flag the arguments equal stock SGLang's;
* ``--dcp-comm``: a2a or lse, any other value refused (argparse, and one line from Python),
  ignored with ``--dcp-size 1``;
* the flag and its aliases appear in ``python -m sglang.launch_server --help``;
* ``require_hooks_applied`` notices a hook that did not apply.

``--device cuda`` runs only the argument logic (nothing touches a GPU), so the CUDA rules
(flashinfer, prefill CUDA graphs) are checked on a CPU-only host too.
"""

import os
import argparse
import dataclasses
import logging
import re
import shlex
import subprocess
import sys

import pytest
from sglang.srt.model_executor.cuda_graph_config import Backend
from sglang.srt.plugins.hook_registry import HookRegistry
from transformers import AutoConfig

from sglang_dcp.test.models import write_dummy_gqa_model
from sglang_dcp.hooks import HOOKS, require_hooks_applied
from sglang_dcp.server_args import DCPConfigError, DCPServerArgs

# Small dimensions shared by every model folder.
SMALL = dict(
    hidden_size=256,
    num_hidden_layers=2,
    intermediate_size=512,
    vocab_size=1024,
    max_position_embeddings=4096,
)


def write_config(path, model_type, architecture, **fields):
    """Write a config-only model folder built by transformers' config class for ``model_type``."""
    config = AutoConfig.for_model(model_type, architectures=[architecture], **{**SMALL, **fields})
    config.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def plugins():
    from sglang.srt.plugins import load_plugins

    load_plugins()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Config-only model folders by name: ``gqa<K>`` is a Qwen3 with 8 query / K KV heads."""
    root = tmp_path_factory.mktemp("models")
    paths = {
        f"gqa{kv}": write_dummy_gqa_model(
            str(root / f"gqa{kv}"), num_attention_heads=8, num_key_value_heads=kv, **SMALL
        )
        for kv in (1, 2, 4)
    }
    gqa = dict(num_attention_heads=8, num_key_value_heads=1, head_dim=64)
    # SGLang's ModelConfig gives DeepseekV3ForCausalLM AttentionArch.MLA.
    paths["mla"] = write_config(
        root / "mla", "deepseek_v3", "DeepseekV3ForCausalLM",
        num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=64, q_lora_rank=None,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=128,
        first_k_dense_replace=2,
    )  # fmt: skip
    # Every layer uses a 4096-token window (no layer_types in MistralConfig).
    paths["mistral_swa"] = write_config(
        root / "mistral_swa", "mistral", "MistralForCausalLM", sliding_window=4096, **gqa
    )
    # layer_types: full_attention for layer 0, sliding_attention for layer 1.
    paths["qwen2_swa"] = write_config(
        root / "qwen2_swa", "qwen2", "Qwen2ForCausalLM",
        sliding_window=4096, use_sliding_window=True, max_window_layers=1, **gqa,
    )  # fmt: skip
    # A window that is switched off: plain full attention.
    paths["qwen2_no_swa"] = write_config(
        root / "qwen2_no_swa", "qwen2", "Qwen2ForCausalLM",
        sliding_window=4096, use_sliding_window=False, **gqa,
    )  # fmt: skip
    # SGLang's ModelConfig.is_hybrid_swa is True for GptOssForCausalLM.
    paths["gpt_oss"] = write_config(
        root / "gpt_oss", "gpt_oss", "GptOssForCausalLM",
        sliding_window=128, num_local_experts=4, num_experts_per_tok=2, **gqa,
    )  # fmt: skip
    # Gated DeltaNet (linear attention) layers interleaved with full attention.
    paths["qwen3_next"] = write_config(
        root / "qwen3_next", "qwen3_next", "Qwen3NextForCausalLM",
        num_experts=0, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=32, linear_value_head_dim=32, full_attention_interval=2, **gqa,
    )  # fmt: skip
    paths["bert"] = write_config(
        root / "bert", "bert", "BertModel", num_attention_heads=8, hidden_size=256,
        num_hidden_layers=2, intermediate_size=512, vocab_size=1024,
    )  # fmt: skip
    paths["loopcoder"] = write_config(
        root / "loopcoder", "llama", "IQuestLoopCoderForCausalLM", loop_num=2, **gqa
    )
    # 12 query / 2 KV heads: tp 6 puts each KV head on 3 ranks, so dcp 3 (logical page 3)
    paths["gqa2_12q"] = write_dummy_gqa_model(
        str(root / "gqa2_12q"), num_attention_heads=12, num_key_value_heads=2, **SMALL
    )
    return paths


@pytest.fixture(autouse=True)
def restore_process_state(monkeypatch):
    """Undo what ``prepare_server_args`` changes process-wide: root logging and one env var."""
    monkeypatch.delenv("NCCL_GRAPH_MIXING_SUPPORT", raising=False)  # set by DCP defaults
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def parse(models, model, flags, device="cpu"):
    from sglang.srt.server_args import prepare_server_args  # the patched class, at call time

    argv = ["--model-path", models[model], "--device", device, "--log-level", "error"]
    return prepare_server_args(argv + shlex.split(flags))


def rejection(models, model, flags, device="cpu"):
    """The one-line message of the ``DCPConfigError`` that ``flags`` raise."""
    with pytest.raises(DCPConfigError) as excinfo:
        parse(models, model, flags, device)
    message = str(excinfo.value)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


# Refused sizes: (model, flags, phrase of the message). gqa<K> has K KV heads.
REJECTED_SIZES = [
    pytest.param("gqa1", "--tp 2 --dcp-size 0", "--dcp-size must be an integer >= 1, got 0",
                 id="dcp0"),
    pytest.param("gqa1", "--tp 2 --dcp-size -1", "--dcp-size must be an integer >= 1, got -1",
                 id="dcp-negative"),
    # Divisibility of tp is checked first (the KV-head rule needs the model).
    pytest.param("gqa1", "--tp 3 --dcp-size 2", "--dcp-size 2 must divide --tp-size 3",
                 id="tp3-dcp2"),
    pytest.param("gqa1", "--tp 2 --dcp-size 4", "--dcp-size 4 must divide --tp-size 2",
                 id="tp2-dcp4"),
    # (tp / num_kv_heads) % dcp != 0
    pytest.param("gqa4", "--tp 4 --dcp-size 2", "num_kv_heads * dcp = 8, got 4", id="tp4-kv4-dcp2"),
    pytest.param("gqa2", "--tp 4 --dcp-size 4", "num_kv_heads * dcp = 8, got 4", id="tp4-kv2-dcp4"),
    pytest.param("gqa4", "--tp 2 --dcp-size 2", "num_kv_heads * dcp = 8, got 2", id="tp2-kv4-dcp2"),
]  # fmt: skip


def _flag(flags, phrase):
    return pytest.param(flags, phrase, id=re.sub(r"\W+", "-", flags).strip("-"))


# Refused flags on CPU, added to --tp 2 --dcp-size 2: (flags, phrase of the message).
REJECTED_FLAGS_ON_CPU = [
    # Features DCP does not combine with; checked before SGLang's own __post_init__.
    _flag("--enable-dp-attention --dp-size 2", "--enable-dp-attention is not supported"),
    _flag("--pp-size 2", "--pp-size > 1 is not supported with --dcp-size 2"),
    _flag("--enable-lmcache", "--enable-lmcache is not supported"),
    _flag("--enable-hisparse", "--enable-hisparse is not supported"),
    _flag("--disaggregation-mode prefill", "--disaggregation-mode is not supported"),
    _flag("--attn-cp-size 2", "--attn-cp-size > 1 is not supported"),
    _flag("--enable-prefill-cp", "--enable-prefill-cp is not supported"),
    _flag("--enable-two-batch-overlap", "--enable-two-batch-overlap is not supported"),
    _flag("--enable-pdmux", "--enable-pdmux is not supported"),
    # Attention backends: only torch_native has a DCP path on CPU.
    _flag("--attention-backend triton", "use --attention-backend torch_native with --dcp-size 2"),
    _flag("--attention-backend fa3", "--attention-backend fa3 has no DCP support; use --attention"),
    _flag("--prefill-attention-backend triton", "--prefill-attention-backend triton has no DCP"),
    _flag("--decode-attention-backend triton", "--decode-attention-backend triton has no DCP"),
    _flag("--enable-deterministic-inference", "--enable-deterministic-inference is not supported"),
    # Attention variants and modes that DCP does not implement
    _flag("--enable-mis", "--enable-mis is not supported"),
    _flag("--dllm-algorithm LowConfidence", "--dllm-algorithm is not supported"),
    _flag("--kv-canary log", "--kv-canary is not supported"),
    _flag("--kv-canary raise", "--kv-canary is not supported"),
    _flag("--enable-torch-compile", "--enable-torch-compile is not supported"),
    _flag("--debug-cuda-graph", "--debug-cuda-graph is not supported"),
    _flag("--chunked-prefill-size 1", "--chunked-prefill-size 1 is smaller than the logical page 2"),
]  # fmt: skip

# Refused flags on CUDA (flashinfer only, eager prefill), added to --tp 2 --dcp-size 2.
REJECTED_FLAGS_ON_CUDA = [
    _flag("--attention-backend triton", "triton has no DCP support; use --attention-backend flash"),
    _flag("--attention-backend torch_native", "use --attention-backend flashinfer with --dcp-size"),
    _flag("--decode-attention-backend fa3", "--decode-attention-backend fa3 has no DCP support"),
    _flag("--cuda-graph-backend-prefill breakable", "runs prefill without CUDA graphs"),
    _flag("--cuda-graph-backend-prefill tc_piecewise", "runs prefill without CUDA graphs"),
    _flag("--enable-breakable-cuda-graph", "runs prefill without CUDA graphs"),
    _flag("""--cuda-graph-config '{"prefill": {"backend": "breakable"}}'""",
          "runs prefill without CUDA graphs"),
    _flag("--enable-deterministic-inference", "--enable-deterministic-inference"),
    _flag("--cuda-graph-backend-decode breakable", "decode CUDA graphs whole (full) or not at all, not breakable"),
    _flag("--cuda-graph-backend-decode tc_piecewise", "(full) or not at all, not tc_piecewise"),
    _flag("""--cuda-graph-config '{"decode": {"backend": "breakable"}}'""", "not breakable"),
    # torch_memory_saver (CUDA only) would not hold lse's gathered weights
    _flag("--dcp-comm lse --enable-memory-saver", "--enable-memory-saver is not supported with --dcp-comm lse; use --dcp-comm a2a"),
]  # fmt: skip

# Refused models (DCP splits plain MHA/GQA full attention only): (model, flags, phrase).
REJECTED_MODELS = [
    pytest.param("mla", "", "this model uses MLA attention", id="mla"),
    pytest.param("mistral_swa", "", "this model uses sliding-window attention", id="mistral-swa"),
    pytest.param("qwen2_swa", "", "['full_attention', 'sliding_attention'] layers", id="qwen2-swa"),
    pytest.param("qwen3_next", "", "linear-attention/Mamba layers", id="qwen3-next"),
    # Checked before SGLang's own rules (GPT-OSS requires triton/fa3/trtllm backends).
    pytest.param("gpt_oss", "", "mixes sliding-window and full-attention layers", id="gpt-oss"),
    # No decode: embedding (encoder-only BERT: non-causal attention) and --is-embedding models
    pytest.param("bert", "", "this model is an embedding / classification model, which does not decode",
                 id="bert"),
    pytest.param("gqa1", "--is-embedding", "is an embedding / classification model", id="is-embedding"),
    # Later loops' layers call attention with k=None (read loop 0's cache)
    pytest.param("loopcoder", "", "IQuestLoopCoderForCausalLM: its layers read another layer's KV",
                 id="loopcoder-k-none"),
]  # fmt: skip


# HiCache settings DCP does not run, added to --tp 2 --dcp 2 --enable-hierarchical-cache:
# (flags, phrase of the message).
REJECTED_HICACHE = [
    _flag("--hicache-mem-layout page_head", "--hicache-mem-layout page_head (DCP runs layer_first, "
          "page_first, page_first_direct) is not supported with --dcp-size 2"),
    _flag("--hicache-mem-layout page_first_kv_split", "--hicache-mem-layout page_first_kv_split (DCP runs"),
    _flag("--hicache-io-backend kernel_ascend --hicache-mem-layout page_first_direct",
          "--hicache-io-backend kernel_ascend (DCP runs kernel, direct) is not supported"),
    *(_flag(f"--hicache-storage-backend {backend}", f"--hicache-storage-backend {backend} (DCP runs file)")
      for backend in ("mooncake", "hf3fs", "nixl", "aibrix", "dynamic", "eic", "simm")),
    _flag("--hicache-write-policy write_back", "--hicache-write-policy write_back (SGLang 0.5.14 miscounts"),
    _flag("--speculative-algorithm NGRAM", "--enable-hierarchical-cache with --speculative-algorithm is "
          "not supported with --dcp-size 2"),
]  # fmt: skip


@pytest.mark.parametrize("flags, phrase", REJECTED_HICACHE)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_rejected_hicache(models, flags, phrase, device):
    assert phrase in rejection(models, "gqa1", f"--tp 2 --dcp 2 --enable-hierarchical-cache {flags}", device)


@pytest.mark.parametrize("flags, layout, io_backend", [
    ("", "page_first", "kernel"),
    ("--hicache-mem-layout layer_first", "layer_first", "kernel"),
    ("--hicache-mem-layout layer_first --hicache-io-backend direct", "layer_first", "direct"),
    ("--hicache-mem-layout page_first_direct", "page_first_direct", "direct"),  # SGLang picks direct I/O
    ("--hicache-io-backend direct", "page_first_direct", "direct"),  # SGLang's own rewrite
    ("--hicache-storage-backend file --hicache-size 2", "page_first", "kernel"),
    ("--hicache-write-policy write_through_selective --hicache-ratio 3", "page_first", "kernel"),
])  # fmt: skip
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_accepted_hicache(models, flags, layout, io_backend, device):
    args = parse(models, "gqa1", f"--tp 2 --dcp 2 --enable-hierarchical-cache {flags}", device)
    assert (args.hicache_mem_layout, args.hicache_io_backend, args.page_size) == (layout, io_backend, 2)


@pytest.mark.parametrize("model, flags, phrase", REJECTED_SIZES)
def test_rejected_size(models, model, flags, phrase):
    assert phrase in rejection(models, model, flags)


@pytest.mark.parametrize("flags, phrase", REJECTED_FLAGS_ON_CPU)
def test_rejected_flag_on_cpu(models, flags, phrase):
    assert phrase in rejection(models, "gqa1", f"--tp 2 --dcp-size 2 {flags}")


@pytest.mark.parametrize("flags, phrase", REJECTED_FLAGS_ON_CUDA)
def test_rejected_flag_on_cuda(models, flags, phrase):
    assert phrase in rejection(models, "gqa1", f"--tp 2 --dcp-size 2 {flags}", device="cuda")


@pytest.mark.parametrize("model, flags, phrase", REJECTED_MODELS)
def test_rejected_model(models, model, flags, phrase):
    assert phrase in rejection(models, model, f"--tp 2 --dcp-size 2 {flags}")


# Speculative settings DCP does not run, added to --tp 2 --dcp 2 --speculative-algorithm A
# --speculative-draft-model-path <gqa1>: (A and flags, device, phrase of the message).
REJECTED_SPECULATIVE = [
    pytest.param("DFLASH", "cpu", "--speculative-algorithm DFLASH (DCP runs EAGLE, EAGLE3, NEXTN, "
                 "STANDALONE, NGRAM) is not supported with --dcp-size 2", id="dflash"),
    pytest.param("EAGLE --speculative-use-rejection-sampling", "cpu",
                 "--speculative-use-rejection-sampling is not supported", id="rejection-sampling"),
    pytest.param("EAGLE --speculative-adaptive", "cpu", "--speculative-adaptive is not supported",
                 id="adaptive"),
    pytest.param("EAGLE --enable-multi-layer-eagle", "cpu", "--enable-multi-layer-eagle is not",
                 id="multi-layer-eagle"),
    pytest.param("EAGLE3 --speculative-draft-window-size 64", "cpu",
                 "--speculative-draft-window-size is not supported", id="draft-window"),
    pytest.param("EAGLE --speculative-attention-mode decode", "cpu",
                 "--speculative-attention-mode decode is not supported", id="attention-mode-decode"),
    pytest.param("EAGLE --speculative-draft-attention-backend triton", "cpu",
                 "--speculative-draft-attention-backend triton has no DCP support", id="draft-backend"),
    pytest.param("EAGLE", "cuda", "--dcp-size 2 runs speculative decoding eagerly: no decode CUDA "
                 "graphs with --speculative-algorithm (pass --disable-cuda-graph).", id="cuda-graphs"),
]  # fmt: skip


@pytest.mark.parametrize("algorithm, device, phrase", REJECTED_SPECULATIVE)
def test_rejected_speculative(models, algorithm, device, phrase):
    flags = f"--tp 2 --dcp 2 --speculative-algorithm {algorithm} --speculative-draft-model-path"
    assert phrase in rejection(models, "gqa1", f"{flags} {models['gqa1']}", device)


def test_rejected_draft_model_kv_heads(models):
    """The draft's KV is striped like the target's: its KV heads must be replicated too."""
    flags = "--tp 2 --dcp 2 --speculative-algorithm STANDALONE --speculative-draft-model-path"
    message = rejection(models, "gqa1", f"{flags} {models['gqa2']}")
    assert "needs every KV head of the draft model replicated on a multiple of 2 TP ranks" in message


@pytest.mark.parametrize("algorithm", ["EAGLE", "NEXTN"])
def test_rejected_speculative_alias_resolved_by_sglang(models, tmp_path, algorithm):
    """SGLang turns EAGLE / NEXTN with a Gemma4 assistant draft into FROZEN_KV_MTP after the
    flags are read: the algorithm it resolved is checked too."""
    draft = write_config(tmp_path / "gemma4_assistant", "llama", "Gemma4AssistantForCausalLM",
                         num_attention_heads=8, num_key_value_heads=1)  # fmt: skip
    flags = f"--tp 2 --dcp 2 --speculative-algorithm {algorithm} --speculative-draft-model-path {draft}"
    assert rejection(models, "gqa1", flags).startswith(
        "--speculative-algorithm FROZEN_KV_MTP (DCP runs EAGLE, EAGLE3, NEXTN, STANDALONE, NGRAM), as "
        "SGLang resolved it for this draft model, is not supported with --dcp-size 2")  # fmt: skip


@pytest.mark.parametrize("algorithm", ["EAGLE", "EAGLE3", "NEXTN", "STANDALONE"])
def test_accepted_speculative(models, algorithm):
    flags = f"--tp 2 --dcp 2 --speculative-algorithm {algorithm} --speculative-draft-model-path"
    args = parse(models, "gqa1", f"{flags} {models['gqa1']}")
    assert (args.page_size, args.attention_backend) == (2, "torch_native")
    args = parse(models, "gqa1", f"{flags} {models['gqa1']} --disable-cuda-graph", device="cuda")
    assert (args.page_size, args.attention_backend) == (2, "flashinfer")


def test_accepted_ngram_on_cuda(models):
    """SGLang itself runs NGRAM on CUDA only (its CPU run is a test mode of this project)."""
    args = parse(models, "gqa1", "--tp 2 --dcp 2 --speculative-algorithm NGRAM --disable-cuda-graph",
                 device="cuda")  # fmt: skip
    assert (args.speculative_algorithm, args.page_size) == ("NGRAM", 2)


def test_rejected_device(models):
    message = rejection(models, "gqa1", "--tp 2 --dcp-size 2", device="xpu")
    assert "runs on CUDA (flashinfer) or CPU (torch_native), not on device 'xpu'" in message


@pytest.mark.parametrize("value", ["abc", "1.5"])
def test_non_integer_value_is_an_argparse_error(models, value, capsys):
    with pytest.raises(SystemExit) as excinfo:
        parse(models, "gqa1", f"--tp 2 --dcp-size {value}")
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    argument = "argument --dcp-size/--dcp/--decode-context-parallel-size"
    assert f"{argument}: invalid int value: '{value}'" in err


# Accepted settings: (model, flags, expected attributes of the resolved ServerArgs).
CPU_DCP = dict(attention_backend="torch_native", disable_prefill_cuda_graph=True)
ACCEPTED = [
    # Logical page = physical page (1 by default) x dcp.
    pytest.param("gqa1", "--tp 2 --dcp-size 2", dict(dcp_size=2, page_size=2, **CPU_DCP),
                 id="tp2-kv1-dcp2"),
    pytest.param("gqa1", "--tp 2 --dcp 2 --page-size 16", dict(dcp_size=2, page_size=32, **CPU_DCP),
                 id="alias-dcp-page16"),
    pytest.param("gqa1", "--tp 2 --decode-context-parallel-size 2",
                 dict(dcp_size=2, page_size=2, **CPU_DCP), id="alias-long"),
    pytest.param("gqa1", "--tp 4 --dcp-size 4", dict(dcp_size=4, page_size=4), id="tp4-kv1-dcp4"),
    pytest.param("gqa1", "--tp 4 --dcp-size 2", dict(dcp_size=2, page_size=2), id="tp4-kv1-dcp2"),
    pytest.param("gqa2", "--tp 4 --dcp-size 2", dict(dcp_size=2, page_size=2), id="tp4-kv2-dcp2"),
    pytest.param("gqa1", "--tp 2 --dcp-size 2 --attention-backend torch_native",
                 dict(attention_backend="torch_native"), id="explicit-torch-native"),
    pytest.param("gqa1", "--tp 2 --dcp-size 2 --prefill-attention-backend torch_native",
                 dict(prefill_attention_backend="torch_native"), id="explicit-prefill-backend"),
    # SGLang turns every CUDA graph off for torch_native, so prefill stays eager anyway.
    pytest.param("gqa1", "--tp 2 --dcp-size 2 --cuda-graph-backend-prefill breakable",
                 dict(page_size=2), id="prefill-graph-off-on-cpu"),
    pytest.param("qwen2_no_swa", "--tp 2 --dcp-size 2", dict(page_size=2), id="window-off"),
]  # fmt: skip


@pytest.mark.parametrize("model, flags, expected", ACCEPTED)
def test_accepted_on_cpu(models, model, flags, expected):
    args = parse(models, model, flags)
    assert type(args) is DCPServerArgs
    assert {name: getattr(args, name) for name in expected} == expected
    assert args.cuda_graph_config.prefill.backend == Backend.DISABLED


def test_accepted_on_cuda(models):
    args = parse(models, "gqa1", "--tp 2 --dcp-size 2 --page-size 16", device="cuda")
    assert (args.attention_backend, args.page_size) == ("flashinfer", 32)
    assert args.cuda_graph_config.prefill.backend == Backend.DISABLED
    assert args.cuda_graph_config.decode.backend != Backend.DISABLED  # decode graphs stay on
    assert os.environ["NCCL_GRAPH_MIXING_SUPPORT"] == "0"


@pytest.mark.parametrize(
    "flags", ["", "--dcp-size 1", "--dcp-size 1 --dcp-comm lse"], ids=["no-flag", "dcp1", "dcp1-lse"]
)
def test_dcp_1_is_stock_sglang(models, flags):
    """Without DCP the resolved arguments equal those of SGLang's own ServerArgs
    (``--dcp-comm`` is ignored with ``--dcp-size 1``)."""
    stock_class = DCPServerArgs.__mro__[1]
    assert stock_class.__module__ == "sglang.srt.server_args" and stock_class is not DCPServerArgs
    argv = ["--model-path", models["gqa1"], "--device", "cpu", "--tp", "2", "--random-seed", "0"]
    parser = argparse.ArgumentParser()
    stock_class.add_cli_args(parser)
    stock = dataclasses.asdict(stock_class.from_cli_args(parser.parse_args(argv)))

    args = parse(models, "gqa1", f"--tp 2 {flags} --random-seed 0 --log-level info")
    assert (args.dcp_size, args.page_size, args.disable_prefill_cuda_graph) == (1, 1, False)
    ours = dataclasses.asdict(args)
    assert ours.pop("dcp_size") == 1 and ours.pop("dcp_physical_page_size") is None
    assert ours.pop("dcp_comm") == ("lse" if "lse" in flags else "a2a")
    assert ours == stock


def test_dcp_3_on_cuda_takes_whole_logical_pages(models):
    """D = 3: logical page 3 (not a power of two; the allocator extends in PyTorch, see
    ``gpu/test_gpu_allocator.py``); the chunked-prefill size rounds down to whole pages."""
    args = parse(models, "gqa2_12q", "--tp 6 --dcp 3 --chunked-prefill-size 64", device="cuda")
    assert (args.page_size, args.dcp_physical_page_size, args.chunked_prefill_size) == (3, 1, 63)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_resolving_twice_changes_nothing(models, device):
    """``ServerArgs(**asdict(args))`` runs ``__post_init__`` again on resolved arguments."""
    import sglang.srt.server_args as server_args

    args = parse(models, "gqa1", "--tp 2 --dcp 2 --page-size 16 --chunked-prefill-size 96", device)
    resolved = dataclasses.asdict(args)
    again = dataclasses.asdict(server_args.ServerArgs(**resolved))
    if device == "cpu":  # SGLang's own second pass turns CPU decode graphs off (dcp 1 alike)
        resolved.pop("cuda_graph_config"), again.pop("cuda_graph_config")
    assert again == resolved
    assert (args.page_size, args.dcp_physical_page_size, args.chunked_prefill_size) == (32, 16, 96)


# SGLang's multi-node launch: (flags, whether a DCP group spans nodes). Node r runs TP ranks
# [r * tp / nnodes, (r + 1) * tp / nnodes); a DCP group is D consecutive TP ranks.
MULTI_NODE = [
    pytest.param("--tp 4 --dcp 2 --nnodes 2", False, id="tp4-2nodes-dcp2"),
    pytest.param("--tp 4 --dcp 4 --nnodes 2", True, id="tp4-2nodes-dcp4"),
    pytest.param("--tp 8 --dcp 2 --nnodes 4", False, id="tp8-4nodes-dcp2"),
    pytest.param("--tp 8 --dcp 4 --nnodes 4", True, id="tp8-4nodes-dcp4"),
    pytest.param("--tp 8 --dcp 8 --nnodes 2 --node-rank 1", True, id="tp8-2nodes-dcp8-node1"),
    pytest.param("--tp 4 --dcp 4", False, id="one-node"),
    pytest.param("--tp 4 --nnodes 2", False, id="dcp1"),
]  # fmt: skip


@pytest.mark.parametrize("flags, spans", MULTI_NODE)
def test_group_across_nodes_warns_once(models, flags, spans, caplog):
    import sglang.srt.server_args as server_args

    flags += " --dist-init-addr 127.0.0.1:5000" if "--nnodes" in flags else ""
    # parse() sets --log-level error on the root logger and replaces its handlers
    dcp_logger = logging.getLogger("sglang_dcp.server_args")
    dcp_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger=dcp_logger.name):
            args = parse(models, "gqa1", flags)
            server_args.ServerArgs(**dataclasses.asdict(args))  # resolving again: no second line
    finally:
        dcp_logger.removeHandler(caplog.handler)
    warnings = [r.getMessage() for r in caplog.records if "span nodes" in r.getMessage()]
    assert len(warnings) == int(spans), warnings
    if spans:
        d, tp, nnodes = (int(re.search(rf"--{f} (\d+)", flags).group(1)) for f in ("dcp", "tp", "nnodes"))
        assert warnings[0] == (
            f"DCP: --dcp-size {d} groups span nodes (--tp-size {tp} over --nnodes {nnodes} is "
            f"{tp // nnodes} TP ranks a node): their decode collectives cross the network at "
            f"every layer; a --dcp-size that divides {tp // nnodes} keeps each group inside a node"
        )


@pytest.mark.parametrize("comm", ["a2a", "lse"])
def test_dcp_comm_accepted(models, comm):
    assert parse(models, "gqa1", f"--tp 2 --dcp 2 --dcp-comm {comm}").dcp_comm == comm


@pytest.mark.parametrize("dcp", ["1", "2"])
def test_bad_dcp_comm_is_refused(models, dcp, capsys):
    with pytest.raises(SystemExit) as excinfo:
        parse(models, "gqa1", f"--tp 2 --dcp {dcp} --dcp-comm allgather")
    assert excinfo.value.code == 2
    assert "argument --dcp-comm: invalid choice: 'allgather'" in capsys.readouterr().err
    # Python callers (sglang.Engine(dcp_comm=...)) bypass argparse: the same value, one line.
    with pytest.raises(DCPConfigError, match="^--dcp-comm must be one of a2a, lse, got 'allgather'.$"):
        DCPServerArgs(model_path=models["gqa1"], device="cpu", tp_size=2, dcp_size=int(dcp),
                      dcp_comm="allgather")  # fmt: skip


# Starts a fresh interpreter that imports sglang and every plugin: ~10-30 s.
def test_launch_server_help_lists_the_flag():
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1", COLUMNS="200")
    env.setdefault("SGLANG_NCCL_SO_PATH", "/nonexistent/libnccl.so.2")
    result = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--help"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    line = "--dcp-size DCP_SIZE, --dcp DCP_SIZE, --decode-context-parallel-size DCP_SIZE"
    assert line in result.stdout
    assert "Decode context parallel size D" in result.stdout
    assert "--dcp-comm {a2a,lse}" in result.stdout


def test_hooks_applied():
    import sglang.srt.entrypoints.engine as engine
    import sglang.srt.server_args as server_args

    require_hooks_applied()
    assert server_args.ServerArgs is DCPServerArgs
    assert engine.Engine.server_args_class is DCPServerArgs


@pytest.mark.parametrize("target", [h.target for h in HOOKS], ids=lambda t: t.rsplit(".", 1)[-1])
def test_missing_hook_is_reported(models, monkeypatch, target):
    monkeypatch.setattr(HookRegistry, "_patched", HookRegistry._patched - {target})
    with pytest.raises(RuntimeError, match="hooks did not apply") as excinfo:
        require_hooks_applied()
    assert str(excinfo.value).endswith(f": {target}")
    # The launching process checks it for --dcp-size > 1 only.
    with pytest.raises(RuntimeError, match=re.escape(target)):
        parse(models, "gqa1", "--tp 2 --dcp-size 2")
    assert parse(models, "gqa1", "--tp 2").dcp_size == 1
