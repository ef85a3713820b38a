"""Step segmentation (spans tile the text on tricky inputs), Monte Carlo step values against a hand-made
deterministic engine (best-of-K, one batched call, identical prefixes sampled once, the verifier sees
prefix + continuation), first pit and advantages on hand-built values, prefix continuation tokens."""

import random

import pytest
from fakes import LastNumberVerifier

from alignkit.rollout.base import (
    Completion,
    check_generate_args,
    prompt_token_ids,
    render_prompt,
)
from alignkit.steps import (
    advantages,
    check_continuation_tokens,
    continuation_prompt,
    estimate_step_values,
    first_pit,
    segment_steps,
    split_steps,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OK, BAD = "The answer is 5.", "The answer is 4."


class PrefixEngine:
    """Continuations chosen by the engine prompt (prompt text + prefix): ``script[text]`` is cycled over the
    n samples of that prompt. Records every call."""

    def __init__(self, script: dict[str, list[str]], default: list[str] | None = None):
        self.script, self.default = script, default
        self.calls: list[tuple[list, int, object]] = []
        self.synced = []

    def generate(self, prompts, n=1, sampling=None):
        check_generate_args(prompts, n)
        self.calls.append((list(prompts), n, sampling))
        out = []
        for p in prompts:
            texts = self.script.get(p, self.default)
            if texts is None:
                raise KeyError(f"no script for {p!r}")
            out.append([Completion(texts[k % len(texts)], [0] * (1 + k % 2), None, "stop") for k in range(n)])
        return out

    def sync_weights(self, model):
        self.synced.append(model)


# ------------------------------------------------------------------------------------ segmentation


@pytest.mark.parametrize(
    "text, split, expected",
    [
        ("1 + 2 = 3\n3 * 2 = 6\nThe answer is 6.", "newline", ["1 + 2 = 3\n", "3 * 2 = 6\n", "The answer is 6."]),
        ("a\n\n\nb\r\nc\r\n", "newline", ["a\n\n\n", "b\r\n", "c\r\n"]),  # blank lines join, CRLF, final newline
        ("\n\n  a\nb", "newline", ["\n\n  a\n", "b"]),  # leading blank lines join the first step
        ("a\rb", "newline", ["a\r", "b"]),
        ("one line, no newline", "newline", ["one line, no newline"]),
        ("Step 1: x = 2\nStep 2: y = 3\nThe answer is 5.", "step", ["Step 1: x = 2\n", "Step 2: y = 3\nThe answer is 5."]),
        ("Let us think.\nStep 1: a\n\nstep 2 : b", "step", ["Let us think.\n", "Step 1: a\n\n", "step 2 : b"]),
        ("It is 3.5 now. Then 7! Done?\nThe answer is 2.", "sentence", ["It is 3.5 now. ", "Then 7! ", "Done?\n", "The answer is 2."]),
        ("a; b;  c", r";\s*", ["a; ", "b;  ", "c"]),
        ("   ", "newline", ["   "]),
        ("", "newline", []),
    ],
)
def test_segmentation_tiles_tricky_text(text, split, expected):
    spans = segment_steps(text, split)
    assert [text[a:b] for a, b in spans] == expected
    assert "".join(expected) == text
    assert all(b > a for a, b in spans) and all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))


def test_step_markers_up_to_two_digits():
    text = "".join(f"Step {k}: v{k}\n" for k in range(1, 13)) + "The answer is 12."
    steps = split_steps(text, "step")
    assert len(steps) == 12
    assert steps[9] == "Step 10: v10\n" and steps[11] == "Step 12: v12\nThe answer is 12."


def test_segmentation_always_concatenates_back():
    rng = random.Random(0)
    alphabet = ["a", "1", " ", "\n", "\r\n", "\r", ".", "!", "Step 3:", "Step 10:", "\t", "?"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        for split in ("newline", "step", "sentence", r"\d"):
            steps = split_steps(text, split)
            assert "".join(steps) == text, (text, split)
            assert sum(1 for s in steps if not s.strip()) <= (1 if not text.strip() else 0)


def test_bad_split_is_a_clear_error():
    with pytest.raises(ValueError, match="neither one of"):
        segment_steps("a\nb", "([")


# ------------------------------------------------------------------------------------ values


def _values(engine, problems, responses, **kw):
    return estimate_step_values(engine, LastNumberVerifier(), problems, responses, tokenizer=None, num_workers=1,
                                progress=False, **kw)


def test_q_values_best_of_k_and_one_batched_call():
    problem = {"prompt": "P?", "answer": "5"}
    response = "a\nb\n" + BAD
    engine = PrefixEngine({
        "P?": [OK, BAD, BAD, BAD],          # Q_0: 1 in 4; best-of-2: groups (OK, BAD), (BAD, BAD) -> 1 of 2
        "P?a\n": [OK, OK, BAD, BAD],        # plain 2/4; best-of-2 groups (OK, OK), (BAD, BAD) -> 1 of 2
        "P?a\nb\n": [BAD],                  # never
    })
    (plain,), cost = _values(engine, [problem], [response], num_rollouts=4, best_of=1)
    assert plain.values == [0.25, 0.5, 0.0, 0.0]  # the full incorrect response: its verdict, 0, not sampled
    assert plain.steps == ["a\n", "b\n", BAD] and plain.successes == [1, 2, 0]
    assert plain.advantages == [0.25, -0.5, 0.0] and plain.first_pit == 2
    assert len(engine.calls) == 1 and engine.calls[0][1] == 4
    assert engine.calls[0][0] == ["P?", "P?a\n", "P?a\nb\n"]  # prompt + prefix, nothing in between
    assert (cost.prefixes, cost.unique_prefixes, cost.continuations, cost.tokens_generated) == (3, 3, 12, 18)

    engine.calls.clear()
    (bok,), cost = _values(engine, [problem], [response], num_rollouts=2, best_of=2)
    assert bok.values == [0.5, 0.5, 0.0, 0.0] and bok.first_pit == 2
    assert len(engine.calls) == 1 and engine.calls[0][1] == 4  # n = M·K per prefix, still one call
    assert "responses" in cost.format() or "prefixes" in cost.format()


def test_identical_prefixes_are_sampled_once_and_the_verifier_sees_prefix_plus_continuation():
    p1, p2 = {"prompt": "P?", "answer": "5"}, {"prompt": "Q?", "answer": "7"}
    responses = ["a\nb\n" + BAD, "a\nx\n" + BAD, "7\n" + "The answer is 1."]
    problems = [p1, p1, p2]
    engine = PrefixEngine({}, default=[""])  # empty continuations: success only if the prefix holds the answer
    engine.script["P?a\nx\n"] = [OK]
    values, cost = _values(engine, problems, responses, num_rollouts=3)
    assert len(engine.calls) == 1
    prompts = engine.calls[0][0]
    assert sorted(prompts) == sorted(["P?", "P?a\n", "P?a\nb\n", "P?a\nx\n", "Q?", "Q?7\n"])
    assert (cost.prefixes, cost.unique_prefixes, cost.continuations) == (8, 6, 18)
    assert values[0].values == [0.0, 0.0, 0.0, 0.0] and values[0].first_pit is None  # nothing to blame
    assert values[1].values == [0.0, 0.0, 1.0, 0.0] and values[1].first_pit is None  # no drop below Q_0
    # "Q?7\n" + "" = "7\n": the verifier checked prefix + continuation
    assert values[2].values == [0.0, 1.0, 0.0] and values[2].first_pit is None
    assert values[2].advantages == [1.0, -1.0]


def test_given_steps_and_final_values_are_used():
    engine = PrefixEngine({}, default=[OK])
    (v,), _ = _values(engine, [{"prompt": "P?", "answer": "5"}], ["ab"], steps=[["a", "b"]], final_values=[1.0])
    assert v.values == [1.0, 1.0, 1.0] and engine.calls[0][0] == ["P?", "P?a"]
    with pytest.raises(ValueError, match="do not concatenate"):
        _values(engine, [{"prompt": "P?", "answer": "5"}], ["ab"], steps=[["a", "c"]])


@pytest.mark.parametrize(
    "values, pit",
    [
        ([0.5, 0.5, 0.0, 0.0], 2),
        ([0.5, 0.75, 0.25, 0.25, 0.5, 0.0], 5),
        ([0.5, 0.25, 0.5, 0.25, 0.5], 1),  # a tie between steps: the earliest
        ([1.0, 0.0], 1),
        ([0.0, 0.0, 0.0], None),  # all zero: no drop, no pit
        ([0.5, 0.5, 0.5], None),  # flat
        ([0.2, 0.5, 1.0], None),  # only rising
        ([0.3], None),
    ],
)
def test_first_pit(values, pit):
    assert first_pit(values) == pit


def test_advantages():
    assert advantages([0.5, 0.5, 0.0, 0.0]) == [0.0, -0.5, 0.0]
    assert advantages([0.25, 1.0]) == [0.75]
    assert advantages([0.1]) == []


# ------------------------------------------------------------------------------------ prefix continuation


def test_continuation_prompt_inserts_nothing_between_prompt_and_prefix(tokenizer):
    from alignkit.data.tokenize import tokenize_group

    chat = [{"role": "user", "content": "Start with 3. Add 4. What is the result?"}]
    prefix, rest = "3 + 4 = 7\n", "The answer is 7."
    for prompt in (chat, "Start with 3. Add 4. What is the result?"):
        text = continuation_prompt(tokenizer, prompt, prefix)
        assert text == render_prompt(tokenizer, prompt) + prefix
        engine_ids = prompt_token_ids(tokenizer, text)  # what HFEngine / vLLM / server feed the model
        group = tokenize_group(tokenizer, prompt, [prefix + rest])
        trained = group["prompt_ids"] + group["response_ids"][0]
        assert engine_ids == trained[: len(engine_ids)], "the engine sees other tokens than the trainer scores"
        after_prompt = engine_ids[len(group["prompt_ids"]):]
        assert tokenizer.eos_token_id not in after_prompt and tokenizer.decode(after_prompt) == prefix
        check_continuation_tokens(tokenizer, prompt, prefix)


class _BosTokenizer:
    """A tokenizer that adds a BOS token to every text and whose chat template starts with BOS too."""

    chat_template = "x"

    def _encode(self, text):
        ids = []
        if text.startswith("<s>"):
            ids, text = [1], text[3:]
        return ids + [ord(c) for c in text]

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, return_dict=False):
        text = "<s>U:" + messages[-1]["content"] + "\nA:"
        return self._encode(text) if tokenize else text

    def __call__(self, text):
        return {"input_ids": [1] + self._encode(text)}


def test_double_bos_is_detected():
    with pytest.raises(ValueError, match="special tokens"):
        check_continuation_tokens(_BosTokenizer(), [{"role": "user", "content": "hi"}], "a\n")
