"""TRL's dataset formats are read as alignkit records (issue 18, item 4): implicit-prompt preference rows
(split as ``trl.extract_prompt`` splits them), ``messages`` SFT rows, prompt-completion SFT rows,
conversational preference rows; the same file/row/field errors; the same token ids as trl.DPOTrainer."""

from __future__ import annotations

import json

import datasets
import pytest
from conftest import load_tiny
from trl.data_utils import extract_prompt, maybe_extract_prompt

from alignkit.data.loading import load_records, load_records_of_kinds
from alignkit.data.records import RecordError, from_trl


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SKY = [user("What color is the sky?")]
IMPLICIT = [
    {"chosen": SKY + [assistant("It is blue.")], "rejected": SKY + [assistant("It is green.")]},
    {"chosen": [{"role": "system", "content": "Be brief."}, user("2+2?"), assistant("4"), user("and 3+3?"),
                assistant("6")],
     "rejected": [{"role": "system", "content": "Be brief."}, user("2+2?"), assistant("4"), user("and 3+3?"),
                  assistant("7")]},
    {"chosen": SKY + [assistant("Blue.")], "rejected": SKY + [assistant("Blue."), assistant("Or green.")]},  # a prefix
]
TEXT_IMPLICIT = [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
                 {"chosen": "Q: 3+4? A: 7", "rejected": "Q: 3+4? A: 8"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def plain(dataset):
    return [{k: v for k, v in row.items() if v is not None} for row in dataset]


# ------------------------------------------------------------------------------------ conversion


def test_implicit_prompt_rows_split_as_trl_does(tmp_path):
    for rows in (IMPLICIT, TEXT_IMPLICIT):
        path = write_jsonl(tmp_path / "pairs.jsonl", rows)
        loaded = plain(load_records(path, "preference"))
        assert loaded == [extract_prompt(r) for r in rows]
    # TRL's maybe_extract_prompt: a text prompt beside conversational responses is replaced by the shared prefix
    row = {"prompt": "What color is the sky?", **IMPLICIT[0]}
    assert from_trl(row, "preference", source="s", row=1) == maybe_extract_prompt(row)
    assert plain(load_records([row], "preference")) == [maybe_extract_prompt(row)]


def test_other_fields_ride_along_and_explicit_rows_are_untouched():
    row = {**IMPLICIT[0], "id": 7}
    assert from_trl(row, "preference", source="s", row=1)["id"] == 7
    explicit = {"prompt": SKY, "chosen": [assistant("Blue.")], "rejected": [assistant("Green.")]}
    assert from_trl(explicit, "preference", source="s", row=1) is explicit  # conversational preference as it is
    assert plain(load_records([explicit], "preference")) == [explicit]


def test_messages_and_prompt_completion_sft_rows(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!")]},
            {"messages": [user("2+2?"), assistant("4"), user("and 3+3?"), assistant("6"), assistant(" (six)")]}]
    loaded = plain(load_records(write_jsonl(tmp_path / "sft.jsonl", rows), "sft"))
    assert loaded == [{"prompt": [{"role": "system", "content": "Be brief."}, user("Hi")],
                       "response": [assistant("Hello!")]},
                      {"prompt": [user("2+2?"), assistant("4"), user("and 3+3?")],
                       "response": [assistant("6"), assistant(" (six)")]}]
    completion = [{"prompt": "Start with 3. Add 4.", "completion": " 7"},
                  {"prompt": SKY, "completion": [assistant("Blue.")]}]
    assert plain(load_records(completion[:1], "sft")) == [{"prompt": "Start with 3. Add 4.", "response": " 7"}]
    assert plain(load_records(completion[1:], "sft")) == [{"prompt": SKY, "response": [assistant("Blue.")]}]


def test_datasets_sources_are_converted(tmp_path):
    ds = datasets.Dataset.from_list(IMPLICIT[:2])
    assert plain(load_records(ds, "preference")) == [extract_prompt(r) for r in IMPLICIT[:2]]
    ds.save_to_disk(str(tmp_path / "saved"))
    assert plain(load_records(str(tmp_path / "saved"), "preference")) == [extract_prompt(r) for r in IMPLICIT[:2]]
    sft = datasets.Dataset.from_list([{"messages": [user("Hi"), assistant("Hello!")]}])
    assert plain(load_records(sft, "sft")) == [{"prompt": [user("Hi")], "response": [assistant("Hello!")]}]
    bad = datasets.Dataset.from_list([IMPLICIT[0], {"chosen": [user("a"), assistant("b")],
                                                    "rejected": [user("c"), assistant("d")]}])
    with pytest.raises(RecordError) as e:
        load_records(bad, "preference")
    assert (e.value.row, e.value.field) == (2, "prompt")


def test_each_method_reads_them():
    from alignkit.trainers.kto import KTOTrainer

    records, kind = load_records_of_kinds(IMPLICIT, KTOTrainer.record_kind)  # unpaired first, then preference
    assert kind == "preference" and plain(records)[0] == extract_prompt(IMPLICIT[0])
    records, kind = load_records_of_kinds(IMPLICIT, "negatives")  # D2O: the rejected responses with their prompt
    assert plain(records)[0]["rejected"] == [assistant("It is green.")]
    unpaired = [{"prompt": SKY, "completion": [assistant("Blue.")], "label": True}]
    assert load_records_of_kinds(unpaired, KTOTrainer.record_kind)[1].name == "unpaired"


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("row, kind, field, message", [
    ({"chosen": [user("a"), assistant("b")], "rejected": [user("c"), assistant("d")]}, "preference", "prompt",
     "share no prompt"),
    ({"chosen": "blue", "rejected": "green"}, "preference", "prompt", "share no prompt"),
    ({"chosen": SKY + [assistant("Blue."), user("sure?"), assistant("yes")],
      "rejected": SKY + [assistant("Blue."), user("really?"), assistant("no")]},
     "preference", "chosen[2].role", "role 'user' after the prompt shared by 'chosen' and 'rejected' (messages 0..1)"),
    ({"chosen": SKY + [assistant("x")], "rejected": "plain text"}, "preference", "rejected", "in one format"),
    ({"chosen": SKY + [assistant("x")], "rejected": SKY + [{"role": "assistant"}]}, "preference",
     "rejected[1].content", "missing 'content'"),
    ({"chosen": SKY + [assistant("x")], "rejected": SKY}, "preference", "prompt",
     "'rejected' holds nothing but the start of the other response"),
    ({"messages": [user("Hi")]}, "sft", "messages[0].role", "ends with role 'user'"),
    ({"messages": [assistant("Hi")]}, "sft", "messages", "no prompt"),
    ({"messages": [user("Hi"), {"role": "bot", "content": "x"}]}, "sft", "messages[1].role", "not one of"),
    ({"messages": "Hi"}, "sft", "messages", "expected a list of chat messages, got str"),
    ({"messages": []}, "sft", "messages", "empty list of messages"),
])
def test_errors_name_file_row_and_the_rows_own_field(tmp_path, row, kind, field, message):
    good = IMPLICIT[0] if kind == "preference" else {"messages": [user("Hi"), assistant("Hello!")]}
    path = write_jsonl(tmp_path / "data.jsonl", [good, good, row])
    with pytest.raises(RecordError) as e:
        load_records(path, kind)
    assert (e.value.source, e.value.row, e.value.field) == (str(path), 3, field)
    assert message in e.value.message, e.value.message
    assert str(e.value).startswith(f"{path}, row 3, field '{field}': ")


def test_cli_train_reads_trl_rows_and_refuses_a_bad_one_in_one_line(tmp_path, capsys, monkeypatch):
    from alignkit.cli import main
    from alignkit.tasks.arithmetic import make_chat_preference_pairs

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    pairs = make_chat_preference_pairs(8, seed=0, split="train")
    rows = [{"chosen": p["prompt"] + [assistant(p["chosen"])], "rejected": p["prompt"] + [assistant(p["rejected"])]}
            for p in pairs]
    data = write_jsonl(tmp_path / "trl.jsonl", rows)
    args = ["train", "dpo", "--train_data", str(data), "--output_dir", str(tmp_path / "o"), "--max_steps", "1",
            "--per_device_train_batch_size", "4", "--eval_strategy", "no", "--save_strategy", "no", "--use_cpu", "true",
            "--report_to", "none"]
    assert main(args) == 0
    capsys.readouterr()
    write_jsonl(data, rows[:3] + [{"chosen": rows[3]["chosen"], "rejected": [user("other")] + rows[3]["rejected"][1:]}])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1  # the model loaded (its progress bar) before the data
    assert err.strip().splitlines()[-1:] == [f"alignkit train: error: {data}, row 4, field 'prompt': missing required field, and 'chosen' and "
                   "'rejected' share no prompt to take it from (TRL's implicit-prompt format holds the whole "
                   "conversation in both)"]


# ------------------------------------------------------------------------------------ the same tokens as TRL


def test_token_ids_equal_trl_dpo_trainer(tiny_model_path, tokenizer, tmp_path):
    import trl

    from alignkit.trainers import DPOConfig, DPOTrainer

    rows = IMPLICIT[:2] + [{"prompt": SKY, "chosen": [assistant("Blue.")], "rejected": [assistant("Green.")]}]
    theirs = trl.DPOTrainer(
        model=load_tiny(tiny_model_path),
        args=trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, max_length=None,
                           bf16=False),
        train_dataset=datasets.Dataset.from_list(rows[:2]), processing_class=tokenizer,
    ).train_dataset
    theirs_explicit = trl.DPOTrainer(
        model=load_tiny(tiny_model_path),
        args=trl.DPOConfig(output_dir=str(tmp_path / "trl2"), report_to="none", use_cpu=True, max_length=None,
                           bf16=False),
        train_dataset=datasets.Dataset.from_list(rows[2:]), processing_class=tokenizer,
    ).train_dataset
    ours_trainer = DPOTrainer(model=load_tiny(tiny_model_path),
                              args=DPOConfig(output_dir=str(tmp_path / "ak"), report_to="none", use_cpu=True,
                                             reference="none", max_length=None),
                              train_dataset=rows, processing_class=tokenizer)
    ours = ours_trainer.tokenize_records(write_jsonl(tmp_path / "rows.jsonl", rows), "train")
    expected = [theirs[0], theirs[1], theirs_explicit[0]]
    assert len(ours) == 3
    for mine, trl_row in zip(ours, expected):
        assert mine["prompt_ids"] == trl_row["prompt_ids"]
        assert mine["response_ids"] == [trl_row["chosen_ids"], trl_row["rejected_ids"]]
    assert tokenizer.decode(ours[0]["response_ids"][0]).startswith("It is blue.")
