"""Incremental detokenization equals a full decode and never emits half a character."""
import pytest

from jpaged.engine.detokenizer import DetokState, detokenize_incrementally


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from jpaged.models.loader import load_tokenizer
    return load_tokenizer(default_model_path)


@pytest.mark.parametrize("text", ["Hello, world! How are you?", "naïve café — 日本語のテキスト 🎉🚀 ok",
                                  "  spaces   and\nnewlines\t", "<|im_start|>user\nhi<|im_end|>"])
def test_streamed_text_equals_full_decode(tokenizer, text):
    ids = tokenizer(text).input_ids
    state, pieces = DetokState(), []
    for i in range(1, len(ids) + 1):
        piece = detokenize_incrementally(tokenizer, ids[:i], state)
        assert "\ufffd" not in piece  # never half a UTF-8 character
        pieces.append(piece)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
