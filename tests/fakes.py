"""Test doubles: a scripted rollout engine and a verifier that checks the last number."""

from __future__ import annotations

import re

from alignkit.rollout.base import Completion, SamplingConfig, check_generate_args
from alignkit.verifiers.base import Verdict, Verifier


class ScriptedEngine:
    """Returns scripted texts per prompt, cycling; records every call and sync."""

    def __init__(self, script: dict[str, list[str]]):
        self.script = script
        self.calls: list[tuple[list, int, SamplingConfig | None]] = []
        self.synced: list[object] = []

    def generate(self, prompts, n=1, sampling=None):
        check_generate_args(prompts, n)
        self.calls.append((list(prompts), n, sampling))
        out = []
        for p in prompts:
            texts = self.script[p if isinstance(p, str) else p[-1]["content"]]
            out.append([Completion(texts[k % len(texts)], [k], [-1.0], "stop") for k in range(n)])
        return out

    def sync_weights(self, model):
        self.synced.append(model)


class LastNumberVerifier(Verifier):
    """Correct iff the last integer in the text equals the problem's ``answer``."""

    name = "last-number"

    def verify(self, problem, completion):
        found = re.findall(r"-?\d+", completion)
        if not found:
            return Verdict(False, 0.0, "no answer found")
        if found[-1] == str(problem["answer"]):
            return Verdict(True, 1.0, "correct")
        return Verdict(False, 0.0, f"wrong answer: got {found[-1]}, expected {problem['answer']}")
