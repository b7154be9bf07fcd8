"""Keep KV heads replicated when SGLang runs a DCP model on CPU.

On CPU, ``adjust_config_with_unaligned_cpu_tp`` pads the KV heads up to a multiple of tp
(with zero heads), so every rank gets a head of its own. DCP needs the ``D`` ranks of a
group to hold replicas of one real KV head, so under DCP the head counts are restored
after SGLang's adjustment (its other paddings, e.g. of intermediate sizes, stay).
"""

from sglang_dcp.distributed.parallel_state import dcp_is_initialized


def keep_kv_heads_replicated(original, model_config, load_config, tp_size):
    heads = (model_config.num_attention_heads, model_config.get_total_num_kv_heads())
    model_config = original(model_config, load_config, tp_size)
    if dcp_is_initialized():
        for config in (model_config, model_config.hf_config, model_config.hf_text_config):
            config.num_attention_heads, config.num_key_value_heads = heads
    return model_config
