"""Helpers of the HTTP benchmarks: the byte tokenizer must decode every id a model can sample."""

from transformers import PreTrainedTokenizerFast

from sglang_dcp.test.serving import write_byte_tokenizer


def test_byte_tokenizer_covers_the_model_vocabulary(tmp_path):
    write_byte_tokenizer(str(tmp_path), vocab_size=300, model_vocab_size=1000)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert len(tokenizer) == 1000
    # bench_serving sees a streamed token only once it decodes to text (TTFT, TPOT)
    assert all(tokenizer.decode([i]) for i in (299, 300, 999))
