"""GSM8K-format records become problems records; malformed ones name the file, row and field."""

import json

import pytest

from alignkit.data.records import RecordError, validate_record
from alignkit.recipes import DataArguments, load_data
from alignkit.tasks.gsm8k import gsm8k_problem
from alignkit.verifiers import get_verifier

RAW = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
    "altogether in April and May.\n#### 1,072",
}


def test_conversion_cleans_calculator_notes_and_keeps_gold():
    p = gsm8k_problem(RAW, index=4)
    validate_record(p, "problems", source="t", row=1)
    assert p["answer"] == "1072" and p["id"] == 4
    assert "<<" not in p["solution"] and p["solution"].endswith("The answer is 1072.")
    assert p["prompt"][0]["role"] == "user" and p["prompt"][0]["content"].startswith("Natalia")
    math = get_verifier("math")
    assert math.verify(p, p["solution"]).correct
    assert not math.verify(p, "So she sold 72 clips. The answer is 72.").correct


def test_local_file_through_recipe_source_and_errors(tmp_path):
    good = tmp_path / "gsm.jsonl"
    good.write_text(json.dumps(RAW) + "\n" + json.dumps({**RAW, "answer": "forty #### 40"}) + "\n")
    problems = load_data(f"gsm8k:{good}", DataArguments(), "problems", train=True)
    assert [p["answer"] for p in problems] == ["1072", "40"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RAW) + "\n" + json.dumps({**RAW, "answer": "no final line"}) + "\n")
    with pytest.raises(RecordError, match=r"bad.jsonl, row 2, field 'answer'"):
        load_data(f"gsm8k:{bad}", DataArguments(), "problems", train=True)
