"""Every malformed input is a named error: exit 2, one line naming the file, row and field (or argument),
nothing written, no traceback (the corpus: tests/malformed_inputs.py). The exit-code contract of
``alignkit`` (0 / 1 gate / 2 bad input / 3 bug). Oversized rows refused or cut before they are tokenized
whole, with the same kept tokens."""

from __future__ import annotations

import json
import random
import resource
import time

import pytest

from malformed_inputs import CASES, OUTPUTS, run_case
from alignkit.data.records import RecordError


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_input_is_a_named_error(case, tmp_path, tiny_model_path):
    result = run_case(case, tmp_path / "case", str(tiny_model_path))
    assert result.code == case.code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f": error: " in result.line, result.stderr[-3000:]  # one line: "alignkit verify: error: ..."
    for fragment in case.expect:
        assert fragment in result.line, (fragment, result.line)
    assert result.written == [], f"{case.command} wrote {result.written} from a refused input"


def test_the_corpus_covers_every_command_and_the_issue_classes():
    commands = {c.command for c in CASES}
    assert commands == set(OUTPUTS)
    assert len(CASES) >= 45 and len({c.name for c in CASES}) == len(CASES)
    groups = {c.group for c in CASES}
    assert {"records", "JSONL syntax", "types", "encodings", "sizes", "arguments"} <= groups
    issue = ["JSON nested 100,000 deep", "problem without its gold answer", "answer holding an object", "answer NaN",
             "empty input file", "old_score Infinity", "new_score 1e999", "invalid UTF-8 (pyarrow fast path)",
             "10 MB prompt"]
    assert not [n for n in issue if n not in {c.name for c in CASES}]


# ------------------------------------------------------------------------------------ exit codes


def test_exit_code_contract(tmp_path, monkeypatch, capsys):
    import alignkit.cli as cli

    def bug(argv):
        raise RuntimeError("an internal inconsistency")

    def library_value_error(argv):
        import numpy as np

        np.zeros(3).reshape(2, 2)  # ValueError raised inside numpy: a bug, not bad input

    monkeypatch.setitem(cli.COMMANDS, "verify", bug)
    assert cli.main(["verify"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: an internal inconsistency" in err and "this is a bug" in err
    monkeypatch.setitem(cli.COMMANDS, "verify", library_value_error)
    assert cli.main(["verify"]) == 3
    monkeypatch.undo()

    assert cli.main(["no-such-command"]) == 2  # usage
    with pytest.raises(SystemExit) as e:
        cli.main(["verify", "--no-such-flag"])
    assert e.value.code == 2

    # the gate: exit 1 only for NFR above --max-nfr, 0 within it
    flips = tmp_path / "flips.jsonl"
    flips.write_text("".join(json.dumps({"id": i, "reference": "7", "old": "7", "new": "8" if i < 3 else "7"}) + "\n"
                             for i in range(10)))
    out = tmp_path / "report"
    args = ["flips", "--predictions", str(flips), "--out", str(out), "--bootstrap", "0", "--no_plot"]
    assert cli.main([*args, "--max-nfr", "0.1"]) == 1
    assert cli.main([*args, "--max-nfr", "0.5"]) == 0
    json.loads((out / "flips.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))


def test_a_refused_verify_writes_nothing_and_a_valid_one_drops_no_row(tmp_path, capsys):
    from alignkit.cli import main

    good = {"prompt": "Start with 3. Add 4.", "answer": "7",
            "completions": [{"text": "The answer is 7."}, {"text": "The answer is 8."}]}
    rows = [good, {**good, "answer": "8"}, {**good, "answer": None}]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out, negs = tmp_path / "v.jsonl", tmp_path / "n.jsonl"
    args = ["verify", "--input", str(path), "--out", str(out), "--negatives", str(negs), "--num_workers", "1"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip().endswith(f"{path}, row 3, field 'answer': field is null: the math verifier "
                                                    "judges completions against 'answer' or 'solution', and a row "
                                                    "without its gold answer cannot be verified")
    assert not out.exists() and not negs.exists()
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n")
    assert main(args) == 0
    verified = [json.loads(line) for line in out.read_text().splitlines()]
    assert [[c["correct"] for c in r["completions"]] for r in verified] == [[True, False], [False, True]]
    negatives = [json.loads(line) for line in negs.read_text().splitlines()]
    assert [(n["answer"], n["rejected"]) for n in negatives] == [("7", "The answer is 8."), ("8", "The answer is 7.")]


# ------------------------------------------------------------------------------------ oversized rows


def _text(rng: random.Random, chars: int) -> str:
    words = "the quick brown fox jumps over 12 lazy dogs; x=3*4+5. Über naïve café\n".split(" ")
    out, n = [], 0
    while n < chars:
        w = rng.choice(words)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


def test_oversized_prompt_is_refused_before_tokenizing_it_whole(tokenizer):
    from alignkit.data.tokenize import tokenize_group

    prompt = _text(random.Random(0), 10_000_000)
    start, rss = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(RecordError) as e:
        tokenize_group(tokenizer, prompt, ["7"], max_length=1024, source="big.jsonl", row=3)
    seconds = time.process_time() - start
    assert (e.value.source, e.value.row, e.value.field) == ("big.jsonl", 3, "prompt")
    assert "refused before tokenizing it whole" in e.value.message
    assert seconds < 2.0, seconds  # tokenizing 10 MB whole takes minutes and gigabytes
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    assert grown_mb < 200, grown_mb


@pytest.mark.parametrize("chat", [False, True])
def test_long_rows_are_cut_before_tokenizing_with_the_same_kept_tokens(tokenizer, chat, monkeypatch):
    """With max_prompt_length a long prompt keeps its end and long responses are truncated: tokenizing only
    the characters that can matter gives exactly the tokens of tokenizing everything."""
    import alignkit.data.tokenize as tok

    rng = random.Random(1)
    cases = []
    for _ in range(6):
        prompt = _text(rng, rng.choice([200, 5_000, 40_000]))
        if chat:
            prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
        cases.append((prompt, [_text(rng, rng.choice([50, 30_000])), _text(rng, 40)]))
    bounded = [tok.tokenize_group(tokenizer, p, r, max_length=256, max_prompt_length=128) for p, r in cases]
    monkeypatch.setattr(tok, "_bounded_texts", lambda tk, p, r, *a, **k: (p, r))
    whole = [tok.tokenize_group(tokenizer, p, r, max_length=256, max_prompt_length=128) for p, r in cases]
    assert bounded == whole


def test_tokens_over_counts_a_piece_only(tokenizer):
    from alignkit.data.tokenize import max_chars_per_token, tokens_over

    per_token = max_chars_per_token(tokenizer)
    assert per_token == max(len(t) for t in tokenizer.get_vocab())
    assert tokens_over(tokenizer, "short prompt", 64) is None
    long = "Add 4 to 3. " * 5_000
    n = tokens_over(tokenizer, long, 64)
    assert n is not None and 64 < n < len(tokenizer(long)["input_ids"])


# ------------------------------------------------------------------------------------ flips fast path


def test_flips_fast_path_hands_non_finite_and_bad_utf8_to_the_row_reader(tmp_path):
    from alignkit.evaluation import flip_readers

    good = tmp_path / "good.jsonl"
    good.write_text('{"id": 1, "reference": "7", "old_score": 0.5, "new_score": 0.25}\n'
                    '{"id": 2, "reference": "8", "old_score": 1.0, "new_score": 0.0}\n')
    data = flip_readers._fast_flips(str(good))  # the vectorised read still takes a valid file
    assert list(data.old.score) == [0.5, 1.0]
    for name, content in [("inf.jsonl", b'{"id": 1, "reference": "7", "old_score": Infinity, "new_score": 0.5}\n'),
                          ("utf8.jsonl", b'{"id": 1, "reference": "\xff", "old": "7", "new": "8"}\n')]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(flip_readers._SlowPath):
            flip_readers._fast_flips(str(path))
        with pytest.raises(RecordError) as e:
            flip_readers.read_flips_file(path)
        assert e.value.row == 1
