"""Chat by default (alignkit.data.prompts) and the chat arithmetic task's sources."""

import json

import pytest

from alignkit.data.prompts import as_chat, chat_mode, format_prompt, format_records, use_chat
from alignkit.recipes import DataArguments, load_data
from alignkit.tasks.arithmetic import CHAT_EXAMPLE, CHAT_SYSTEM, is_held_out, make_chat_problems


class NoTemplate:
    chat_template = None


def test_chat_mode_spellings_and_errors(tokenizer):
    assert [chat_mode(v) for v in ("auto", True, False, "yes", "off", "TRUE")] == [
        "auto", "true", "false", "true", "false", "true"]
    with pytest.raises(ValueError, match="chat must be one of"):
        chat_mode("sometimes")
    assert use_chat(tokenizer) and not use_chat(NoTemplate()) and not use_chat(tokenizer, False)
    with pytest.raises(ValueError, match="no chat template"):
        use_chat(NoTemplate(), True)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        use_chat(None, "auto")


def test_text_becomes_a_user_message_with_an_optional_system_message(tokenizer):
    assert as_chat("2+2?") == [{"role": "user", "content": "2+2?"}]
    assert as_chat("2+2?", "Be brief.") == [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "2+2?"}]
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert as_chat(conversation, "other") == conversation  # an existing system message is kept
    assert format_prompt("Q", NoTemplate()) == "Q"  # auto without a template: raw text
    assert format_prompt("Q", tokenizer, "false") == "Q"
    assert format_prompt("Q", tokenizer) == [{"role": "user", "content": "Q"}]


def test_format_records_lists_and_datasets(tokenizer):
    import datasets

    records = [{"prompt": "a", "answer": "1"}, {"prompt": [{"role": "user", "content": "b"}], "answer": "2"}]
    out = format_records(records, tokenizer, "auto", "Sys")
    assert out[0] == {"prompt": [{"role": "system", "content": "Sys"}, {"role": "user", "content": "a"}], "answer": "1"}
    assert out[1]["prompt"][0] == {"role": "system", "content": "Sys"} and records[0]["prompt"] == "a"  # not mutated
    table = datasets.Dataset.from_list([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}])
    formatted = format_records(table, tokenizer)
    assert formatted[1]["prompt"] == [{"role": "user", "content": "b"}]
    assert format_records(records, tokenizer, "false") is records


def test_recipe_sources_are_chat_formatted_for_a_chat_tokenizer(tokenizer, tmp_path):
    args = DataArguments(synthetic_train_size=4, system_prompt="Think.")
    problems = load_data("synthetic:arithmetic_problems", args, "problems", train=True, tokenizer=tokenizer)
    assert problems[0]["prompt"][0] == {"role": "system", "content": "Think."}
    assert problems[0]["prompt"][1]["role"] == "user" and problems[0]["prompt"][1]["content"].startswith("Start with")
    raw = load_data("synthetic:arithmetic_problems", DataArguments(synthetic_train_size=4, chat="false"), "problems",
                    train=True, tokenizer=tokenizer)
    assert isinstance(raw[0]["prompt"], str)
    # a local file is loaded (errors still name it) and formatted
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "What is 2+2?", "answer": "4"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    from alignkit.data.records import RecordError

    with pytest.raises(RecordError, match=r"p.jsonl, row 2"):
        load_data(str(path), DataArguments(), "problems", train=True, tokenizer=tokenizer)


def test_chat_task_parts_are_disjoint_and_prompts_are_the_one_shot_chat():
    train = make_chat_problems(400, seed=0)
    held_out = make_chat_problems(150, seed=3, split="heldout")
    questions = {p["question"] for p in train}
    assert len(questions) == 400 and not questions & {p["question"] for p in held_out}
    assert all(not is_held_out(q) for q in questions) and all(is_held_out(p["question"]) for p in held_out)
    assert CHAT_EXAMPLE[0] not in questions | {p["question"] for p in held_out}
    p = train[0]
    assert [m["role"] for m in p["prompt"]] == ["system", "user", "assistant", "user"]
    assert p["prompt"][0]["content"] == CHAT_SYSTEM and p["prompt"][-1]["content"] == p["question"]
    assert p["solution"].endswith(f"The answer is {p['answer']}.") and len(p["steps"]) == 2
    # the recipe sources: train and held-out parts, SFT records and offline pairs
    args = DataArguments(synthetic_train_size=8, synthetic_eval_size=8)
    assert load_data("synthetic:arithmetic_chat_problems", args, "problems", train=False)[0]["question"] in {
        q["question"] for q in make_chat_problems(8, seed=10_000, split="heldout")}
    sft = load_data("synthetic:arithmetic_chat_sft", args, "sft", train=True)
    assert sft[0]["prompt"] == train[0]["prompt"] and sft[0]["response"] == train[0]["solution"]
    pairs = load_data("synthetic:arithmetic_chat_pairs", args, "preference", train=True)
    assert pairs[0]["chosen"] == train[0]["solution"] and pairs[0]["rejected"] != pairs[0]["chosen"]
