"""Response-group tokenization: TRL-style splits, chat prompts, truncation and the no-room error."""

import pytest

from alignkit.data.records import RecordError
from alignkit.data.tokenize import tokenize_group


def test_text_prompt_responses_end_with_eos(tokenizer):
    g = tokenize_group(tokenizer, "Start with 3. Add 4. What is the result?", ["3 + 4 = 7", "3 + 4 = 8"])
    assert g["prompt_ids"] == tokenizer("Start with 3. Add 4. What is the result?").input_ids
    assert all(r[-1] == tokenizer.eos_token_id for r in g["response_ids"])
    assert tokenizer.decode(g["response_ids"][1]).startswith("3 + 4 = 8")


def test_chat_prompt_uses_template_and_assistant_turn(tokenizer):
    prompt = [{"role": "user", "content": "Start with 3. Add 4."}]
    g = tokenize_group(tokenizer, prompt, [[{"role": "assistant", "content": "7"}]])
    assert tokenizer.decode(g["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(g["response_ids"][0]).startswith("7<|im_end|>")


def test_prompt_without_room_names_source_row_and_field(tokenizer):
    long_prompt = "Start with 3. Add 4. " * 20
    with pytest.raises(RecordError) as e:
        tokenize_group(tokenizer, long_prompt, ["7"], max_length=16, source="pairs.jsonl", row=5)
    assert (e.value.source, e.value.row, e.value.field) == ("pairs.jsonl", 5, "prompt")
    assert "leaves no room for the response within max_length=16" in str(e.value)


def test_truncation_keeps_prompt_end_and_cuts_responses(tokenizer):
    long_prompt = "Start with 3. Add 4. " * 20
    g = tokenize_group(tokenizer, long_prompt, ["3 + 4 = 7\nThe answer is 7."], max_length=24, max_prompt_length=16)
    full = tokenizer(long_prompt).input_ids
    assert g["prompt_ids"] == full[-16:]
    assert len(g["prompt_ids"]) + len(g["response_ids"][0]) == 24


class _BosTokenizer:
    """Adds a BOS id (1) unless told not to; the text ``<s>`` itself maps to the BOS id."""

    bos_token = "<s>"

    def __call__(self, text, add_special_tokens=True):
        ids = [1] if text.startswith("<s>") else []
        ids += [ord(c) for c in (text[3:] if ids else text)]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_a_rendered_prompt_that_starts_with_bos_gets_one_bos():
    from alignkit.rollout.base import prompt_token_ids

    tok = _BosTokenizer()
    assert prompt_token_ids(tok, "hi") == [1, ord("h"), ord("i")]
    assert prompt_token_ids(tok, "<s>hi") == [1, ord("h"), ord("i")]  # not [1, 1, ...]
