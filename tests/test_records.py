"""Record formats and loading: every error names its source, row and field; every source loads."""

import json
import pickle
import time

import datasets
import pytest

from alignkit.data.loading import load_records
from alignkit.data.records import SCHEMAS, RecordError, is_conversational, message_text, validate_record

PAIR = {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}
CHAT_PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2 ="}]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def load_error(tmp_path, records, kind="preference", name="data.jsonl") -> RecordError:
    path = write_jsonl(tmp_path / name, records)
    with pytest.raises(RecordError) as info:
        load_records(path, kind)
    assert info.value.source == str(path)
    return info.value


# ------------------------------------------------------------------------------------ errors


def test_error_message_format():
    error = RecordError("data/train.jsonl", 7, "rejected", "empty response")
    assert str(error) == "data/train.jsonl, row 7, field 'rejected': empty response"
    assert str(RecordError("data/train.jsonl", None, None, "no records")) == "data/train.jsonl: no records"
    assert str(RecordError("<list>", 3, None, "bad")) == "<list>, row 3: bad"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.source, copy.row, copy.field, copy.message) == ("data/train.jsonl", 7, "rejected", "empty response")
    assert isinstance(error, ValueError)


def test_missing_field(tmp_path):
    error = load_error(tmp_path, [PAIR, {"prompt": "x", "chosen": "y"}])
    assert (error.row, error.field) == (2, "rejected")
    assert "missing" in error.message


def test_wrong_type_int_prompt(tmp_path):
    error = load_error(tmp_path, [PAIR, PAIR, {**PAIR, "prompt": 17}])
    assert (error.row, error.field) == (3, "prompt")
    assert "expected str" in error.message and "got int" in error.message


def test_empty_response_whitespace(tmp_path):
    error = load_error(tmp_path, [{**PAIR, "chosen": " \n\t "}])
    assert (error.row, error.field) == (1, "chosen")
    assert error.message == "empty response"


def test_empty_assistant_message_response(tmp_path):
    error = load_error(tmp_path, [{**PAIR, "rejected": [{"role": "assistant", "content": "  "}]}])
    assert (error.row, error.field, error.message) == (1, "rejected", "empty response")


def test_non_utf8_bytes_on_line_3(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps(PAIR).encode()
    bad = json.dumps({**PAIR, "prompt": "caf\u00e9"}, ensure_ascii=False).encode("latin-1")
    path.write_bytes(good + b"\n" + good + b"\n" + bad + b"\n")
    with pytest.raises(RecordError) as info:
        load_records(path, "preference")
    error = info.value
    assert (error.row, error.field) == (3, None)
    assert "UTF-8" in error.message
    offset = 2 * (len(good) + 1) + bad.index(b"\xe9")
    assert f"byte offset {offset}" in error.message


def test_invalid_json_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(PAIR) + "\n\n" + '{"prompt": "x", "chosen": "y",}\n', encoding="utf-8")
    with pytest.raises(RecordError) as info:
        load_records(path, "preference")
    error = info.value
    assert (error.row, error.field) == (3, None)  # blank line 2 is skipped but still counted
    assert "invalid JSON" in error.message and "Expecting property name" in error.message


def test_bad_chat_role(tmp_path):
    prompt = CHAT_PROMPT + [{"role": "robot", "content": "beep"}]
    error = load_error(tmp_path, [{**PAIR, "prompt": prompt}])
    assert (error.row, error.field) == (1, "prompt[2].role")
    assert "'robot'" in error.message and "user" in error.message


def test_response_message_must_be_assistant(tmp_path):
    error = load_error(tmp_path, [{**PAIR, "chosen": [{"role": "user", "content": "4"}]}])
    assert (error.row, error.field) == (1, "chosen[0].role")
    assert "assistant" in error.message


def test_message_with_non_string_content(tmp_path):
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["not", "text"]}]
    error = load_error(tmp_path, [PAIR, {**PAIR, "prompt": prompt}])
    assert (error.row, error.field) == (2, "prompt[1].content")
    assert "expected content to be str, got list" in error.message


def test_message_not_a_dict(tmp_path):
    error = load_error(tmp_path, [{**PAIR, "prompt": [{"role": "user", "content": "hi"}, "oops"]}])
    assert (error.row, error.field) == (1, "prompt[1]")
    assert "got str" in error.message


def test_record_not_an_object(tmp_path):
    error = load_error(tmp_path, [PAIR, ["prompt", "chosen"]])
    assert (error.row, error.field) == (2, None)
    assert "got list" in error.message


def test_mixed_text_and_chat_prompt_column(tmp_path):
    error = load_error(tmp_path, [PAIR, PAIR, {**PAIR, "prompt": CHAT_PROMPT}, PAIR])
    assert (error.row, error.field) == (3, "prompt")
    assert "all text or all chat messages" in error.message
    assert "row 1" in error.message


def test_mixed_column_in_list_source():
    with pytest.raises(RecordError) as info:
        load_records([{**PAIR, "chosen": [{"role": "assistant", "content": "4"}]}, PAIR], "preference")
    assert (info.value.source, info.value.row, info.value.field) == ("<list>", 2, "chosen")


def test_unknown_kind(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [PAIR])
    with pytest.raises(ValueError, match="unknown record kind 'pairs'") as info:
        load_records(path, "pairs")
    for kind in ("preference", "negatives", "sft", "problems", "flips"):
        assert kind in str(info.value)
    with pytest.raises(ValueError, match="known kinds"):
        validate_record(PAIR, "pairs", source="<x>", row=1)


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        load_records(str(missing), "preference")
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        load_records("train.jsonl", "preference")  # a relative name with a data-file suffix
    with pytest.raises(FileNotFoundError, match="a/b/c"):
        load_records("a/b/c", "preference")  # two slashes: not a Hub id


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(RecordError) as info:
        load_records(path, "preference")
    assert (info.value.row, info.value.field) == (None, None)
    assert "no records" in info.value.message


def test_empty_list_and_dataset():
    with pytest.raises(RecordError, match="no records"):
        load_records([], "sft")
    with pytest.raises(RecordError, match="no records"):
        load_records(datasets.Dataset.from_dict({"prompt": [], "response": []}), "sft")


# ------------------------------------------------------------------------------------ sources


def test_jsonl_text_prompts(tmp_path):
    records = [PAIR, {"prompt": "3 + 4 =", "chosen": " 7", "rejected": " 8"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    dataset = load_records(path, "preference")
    assert isinstance(dataset, datasets.Dataset)
    assert dataset.to_list() == records


def test_jsonl_chat_prompts(tmp_path):
    answer = [{"role": "assistant", "content": "4"}]
    records = [{"prompt": CHAT_PROMPT, "chosen": answer, "rejected": [{"role": "assistant", "content": "5"}]}] * 2
    dataset = load_records(write_jsonl(tmp_path / "chat.jsonl", records), "preference")
    assert dataset[0]["prompt"] == CHAT_PROMPT
    assert dataset[1]["chosen"] == answer


def test_jsonl_with_bom_and_crlf(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(PAIR).encode() + b"\r\n" + json.dumps(PAIR).encode() + b"\r\n")
    assert len(load_records(path, "preference")) == 2


def test_json_list_file(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([PAIR, PAIR], indent=2), encoding="utf-8")
    assert load_records(path, "preference").to_list() == [PAIR, PAIR]
    path.write_text(json.dumps([PAIR, {**PAIR, "rejected": ""}], indent=2), encoding="utf-8")
    with pytest.raises(RecordError) as info:
        load_records(path, "preference")
    assert (info.value.row, info.value.field) == (2, "rejected")  # item number in the list


def test_json_lines_file_with_json_suffix(tmp_path):
    assert len(load_records(write_jsonl(tmp_path / "pairs.json", [PAIR] * 3), "preference")) == 3


def test_json_object_file_explained(tmp_path):
    path = tmp_path / "object.json"
    path.write_text(json.dumps({"data": [PAIR]}, indent=2), encoding="utf-8")
    with pytest.raises(RecordError, match="top-level list"):
        load_records(path, "preference")


def test_parquet(tmp_path):
    path = str(tmp_path / "pairs.parquet")
    datasets.Dataset.from_list([PAIR, {**PAIR, "prompt": "1 + 1 ="}]).to_parquet(path)
    dataset = load_records(path, "preference")
    assert dataset[1]["prompt"] == "1 + 1 ="

    datasets.Dataset.from_list([PAIR, {**PAIR, "rejected": " "}]).to_parquet(path)
    with pytest.raises(RecordError) as info:
        load_records(path, "preference")
    assert (info.value.source, info.value.row, info.value.field) == (path, 2, "rejected")


def test_save_to_disk_dir(tmp_path):
    path = tmp_path / "saved"
    datasets.Dataset.from_list([PAIR] * 3).save_to_disk(str(path))
    assert len(load_records(str(path), "preference")) == 3


def test_dataset_dict_dir_takes_split(tmp_path):
    path = tmp_path / "saved_dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([PAIR] * 3), "test": datasets.Dataset.from_list([PAIR])}
    ).save_to_disk(str(path))
    assert len(load_records(path, "preference", split="test")) == 1
    with pytest.raises(RecordError, match="no split 'validation'"):
        load_records(path, "preference", split="validation")


def test_in_memory_dataset():
    dataset = datasets.Dataset.from_list([PAIR, PAIR])
    assert load_records(dataset, "preference") is dataset
    bad = datasets.Dataset.from_list([{"prompt": "a", "response": "b"}, {"prompt": "a", "response": ""}])
    with pytest.raises(RecordError) as info:
        load_records(bad, "sft")
    assert (info.value.source, info.value.row, info.value.field) == ("<datasets.Dataset>", 2, "response")


def test_list_of_dicts():
    dataset = load_records([{"prompt": "forget me", "response": "secret"}] * 2, "sft")
    assert dataset.column_names == ["prompt", "response"]
    with pytest.raises(RecordError) as info:
        load_records([{"prompt": "a", "response": "b"}, {"prompt": "", "response": "b"}], "sft")
    assert (info.value.source, info.value.row, info.value.field) == ("<list>", 2, "prompt")
    assert "empty prompt" in info.value.message


def test_extra_fields_preserved(tmp_path):
    records = [
        {**PAIR, "id": "a", "ref_logps": [-1.5, -2.25], "meta": {"source": "x"}},
        {**PAIR, "id": "b", "ref_logps": [-0.5, -3.0], "meta": {"source": "y"}, "late": 1},
    ]
    dataset = load_records(write_jsonl(tmp_path / "extra.jsonl", records), "preference")
    assert dataset[0]["ref_logps"] == [-1.5, -2.25]
    assert dataset[1]["meta"] == {"source": "y"}
    assert dataset["late"] == [None, 1]  # a field only a later row has is kept too


def test_mixed_types_outside_format_columns_kept():
    records = [
        {"id": 1, "reference": 42, "old": "41", "new": 42},
        {"id": "two", "reference": "forty", "old": [1], "new": {"x": 1}},
    ]
    dataset = load_records(records, "flips")
    assert dataset.to_list() == records


def test_mixed_types_without_json_feature(tmp_path, monkeypatch):
    monkeypatch.delattr(datasets, "Json", raising=False)  # datasets < 4.7: no JSON columns
    records = [{"id": 1, "reference": 4, "old": 4, "new": 4}, {"id": 2, "reference": "four", "old": 4, "new": 4}]
    path = tmp_path / "flips.jsonl"
    path.write_text("\n" + "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    with pytest.raises(RecordError) as info:
        load_records(path, "flips")
    assert (info.value.row, info.value.field) == (3, "reference")  # line 3: line 1 is blank
    assert "number in row 2 but text" in info.value.message


def test_hub_id_goes_to_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([{"prompt": "p", "response": "r"}, {"prompt": "p", "response": " "}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(RecordError) as info:
        load_records("someorg/forget-set", "sft", split="forget", name="v1")
    assert calls == [("someorg/forget-set", "v1", "forget")]
    assert (info.value.source, info.value.row, info.value.field) == ("someorg/forget-set", 2, "response")


# ------------------------------------------------------------------------------------ kinds


def test_problems_answer_or_tests(tmp_path):
    answer_only = [{"prompt": "2 + 2?", "answer": 4}, {"prompt": "3 + 3?", "answer": "6", "solution": "3 + 3 = 6"}]
    assert len(load_records(write_jsonl(tmp_path / "a.jsonl", answer_only), "problems")) == 2
    tests_only = [{"prompt": "write f", "tests": ["assert f(1) == 2", "assert f(2) == 3"]}]
    assert load_records(write_jsonl(tmp_path / "t.jsonl", tests_only), "problems")[0]["tests"][1] == "assert f(2) == 3"
    assert len(load_records([{"prompt": "write g", "tests": "assert g() is None"}], "problems")) == 1

    error = load_error(tmp_path, [answer_only[0], {"prompt": "no key"}], kind="problems", name="n.jsonl")
    assert (error.row, error.field) == (2, None)
    assert "'answer' or 'tests'" in error.message

    error = load_error(tmp_path, [{"prompt": "p", "answer": True}], kind="problems", name="b.jsonl")
    assert (error.row, error.field) == (1, "answer") and "got bool" in error.message
    error = load_error(tmp_path, [{"prompt": "p", "tests": ["ok", 3]}], kind="problems", name="c.jsonl")
    assert (error.row, error.field) == (1, "tests[1]")


def test_flips_predictions_or_scores(tmp_path):
    predictions = [
        {"id": 1, "reference": "4", "old": "5", "new": "4"},
        {"id": 2, "reference": "6", "old": "6", "new": "7"},
    ]
    assert load_records(write_jsonl(tmp_path / "p.jsonl", predictions), "flips").to_list() == predictions
    scores = [{"id": "q1", "reference": {"answer": 4}, "old_score": 0, "new_score": 1.0}]
    assert load_records(write_jsonl(tmp_path / "s.jsonl", scores), "flips")[0]["new_score"] == 1.0

    error = load_error(tmp_path, [{"id": 1, "reference": "4", "old": "5"}], kind="flips", name="half.jsonl")
    assert (error.row, error.field) == (1, "new")
    error = load_error(tmp_path, [{"id": 1, "reference": "4"}], kind="flips", name="none.jsonl")
    assert (error.row, error.field) == (1, None) and "'old_score' and 'new_score'" in error.message
    bad_score = {"id": 1, "reference": 1, "old_score": "high", "new_score": 1}
    error = load_error(tmp_path, [bad_score], kind="flips", name="t.jsonl")
    assert (error.field, error.message) == ("old_score", "expected a number, got str")
    error = load_error(tmp_path, [{"id": 1.5, "reference": 1, "old": 1, "new": 1}], kind="flips", name="id.jsonl")
    assert error.field == "id" and "got float" in error.message


def test_negatives_samples(tmp_path):
    good = [{"prompt": "p", "rejected": "bad", "samples": ["s1", [{"role": "assistant", "content": "s2"}]]}]
    for record in good:
        validate_record(record, "negatives", source="<x>", row=1)
    assert len(load_records([{"prompt": "p", "rejected": "bad"}], "negatives")) == 1
    assert len(load_records([{"prompt": "p", "rejected": "bad", "samples": ["a", "b"]}] * 2, "negatives")) == 2

    error = load_error(tmp_path, [{"prompt": "p", "rejected": "r", "samples": ["fine", ""]}], kind="negatives")
    assert (error.row, error.field, error.message) == (1, "samples[1]", "empty response")


def test_schemas_registry():
    assert set(SCHEMAS) == {"preference", "negatives", "sft", "problems", "flips", "perstep"}
    assert SCHEMAS["preference"].required == ("prompt", "chosen", "rejected")
    assert SCHEMAS["flips"].one_of == (("old", "new"), ("old_score", "new_score"))
    assert "samples" in SCHEMAS["negatives"].optional
    assert SCHEMAS["perstep"].required == ("prompt", "response", "values")


def test_perstep_records_and_a_method_schema():
    from alignkit.data.records import Schema, get_schema

    good = {"prompt": "p", "response": "a\nb", "values": [0.5, 0.25, 0.0], "steps": ["a\n", "b"], "chosen": "c"}
    validate_record(good, "perstep", source="s.jsonl", row=4)
    for bad, field, message in [
        ({**good, "values": [0.5, 0.0]}, "values", "expected 3 values"),
        ({**good, "values": [0.5, 1.5, 0.0]}, "values[1]", "success rate"),
        ({**good, "steps": ["a\n", "c"]}, "steps", "concatenate"),
        ({**good, "response": [{"role": "assistant", "content": "a\nb"}]}, "response", "expected text"),
        ({**good, "chosen": ""}, "chosen", "empty response"),
    ]:
        with pytest.raises(RecordError, match=message) as info:
            validate_record(bad, "perstep", source="s.jsonl", row=4)
        assert (info.value.source, info.value.row, info.value.field) == ("s.jsonl", 4, field)
    # a method may declare its own schema over the known fields (TRL's unpaired format)
    unpaired = Schema("unpaired", required=("prompt", "completion", "label"))
    assert get_schema(unpaired) is unpaired
    validate_record({"prompt": "p", "completion": "c", "label": False}, unpaired, source="s", row=1)
    with pytest.raises(RecordError, match="field 'label': expected true or false"):
        validate_record({"prompt": "p", "completion": "c", "label": 1}, unpaired, source="s", row=1)
    with pytest.raises(RecordError, match="field 'completion': empty response"):
        validate_record({"prompt": "p", "completion": " ", "label": True}, unpaired, source="s", row=1)


def test_loading_picks_the_first_kind_the_rows_match(tmp_path):
    from alignkit.data.loading import load_records_of_kinds

    records, kind = load_records_of_kinds([{"prompt": "p", "answer": 3}], ("perstep", "problems"))
    assert kind == "problems" and len(records) == 1
    records, kind = load_records_of_kinds([{"prompt": "p", "response": "r", "values": [0.5, 0.0]}],
                                          ("perstep", "problems"))
    assert kind == "perstep"
    with pytest.raises(RecordError, match="row 2, field 'values'"):  # a perstep file with a bad row: its error
        load_records_of_kinds([{"prompt": "p", "response": "r", "values": [0.5, 0.0]},
                               {"prompt": "p", "response": "r", "values": "x"}], ("perstep", "problems"))
    with pytest.raises(RecordError, match="none of the kinds perstep, problems"):
        load_records_of_kinds([{"prompt": "p"}], ("perstep", "problems"))


def test_text_helpers():
    assert message_text("plain") == "plain"
    assert message_text([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]) == "ab"
    assert is_conversational(CHAT_PROMPT) and not is_conversational("text") and not is_conversational([])


def test_validation_is_fast():
    records = [{"prompt": f"question {i}", "chosen": "yes", "rejected": "no", "id": i} for i in range(100_000)]
    start = time.perf_counter()
    dataset = load_records(records, "preference")
    assert len(dataset) == 100_000
    assert time.perf_counter() - start < 5.0
