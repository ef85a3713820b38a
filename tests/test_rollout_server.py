"""The server rollout backend against a fake vLLM OpenAI-compatible server (stdlib, in a thread).

Fast unit tests of the client's side (request fields, conversions, retries, adapter bookkeeping) and of
``alignkit serve``'s command line; the real server is tested in ``tests/test_vllm_server.py`` (marker
``vllm``).

The fake answers ``/v1/completions`` the way vLLM does (``choices`` with ``index``, ``text`` cut before
the stop string, ``finish_reason`` / ``stop_reason``, ``logprobs.tokens`` as ``"token_id:N"`` with
``return_tokens_as_token_ids``), loads / unloads LoRA adapters, and can fail or stall on demand.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alignkit.rollout import SamplingConfig
from alignkit.rollout.base import Completion, RolloutEngine, prompt_token_ids
from alignkit.rollout.server import ServerEngine, ServerError

BASE = "tiny-base"


class FakeVLLM:
    """State and behaviour of the fake server; ``handler`` is its request handler class."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        self.log: list[tuple[str, str, dict | None]] = []
        self.adapters: dict[str, str] = {}
        self.fail_next = 0
        self.fail_mode = "503"  # 503, 429, 400 or drop
        self.delay = 0.0
        self.health_failures = 0
        self.lock = threading.Lock()

    def script(self, prompt_ids: list[int], index: int, model: str) -> str:
        return f"{len(prompt_ids)} tokens, sample {index}. STOP then more from {model}"

    def completion(self, body: dict) -> dict:
        ids = body["prompt"]
        choices = []
        for i in range(body.get("n", 1)):
            tokens = self.tok(self.script(ids, i, body["model"]))["input_ids"] + [self.eos]
            finish, stop_reason = "stop", None
            for stop in body.get("stop") or []:  # vLLM: stop at the token that completes the stop string
                for k in range(1, len(tokens) + 1):
                    if stop in self.tok.decode(tokens[:k], skip_special_tokens=True):
                        tokens, stop_reason = tokens[:k], stop
                        break
                if stop_reason:
                    break
            if len(tokens) > body["max_tokens"]:
                tokens, finish, stop_reason = tokens[: body["max_tokens"]], "length", None
            text = self.tok.decode(tokens, skip_special_tokens=True)
            if stop_reason:
                text = text[: text.index(stop_reason)]
            logprobs = [-(0.5 + 0.01 * k + 0.1 * i) for k in range(len(tokens))]
            choices.append({
                "index": i,
                "text": text,
                "logprobs": {
                    "text_offset": list(range(len(tokens))),
                    "token_logprobs": logprobs,
                    "tokens": [f"token_id:{t}" for t in tokens],
                    "top_logprobs": [{f"token_id:{t}": lp} for t, lp in zip(tokens, logprobs)],
                },
                "finish_reason": finish,
                "stop_reason": stop_reason,
            })
        return {"id": "cmpl-1", "object": "text_completion", "model": body["model"], "choices": choices}

    @property
    def handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, payload, headers: dict | None = None):
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, message: str):
                self._send(status, {"object": "error", "message": message, "type": "BadRequestError", "code": status})

            def _injected_failure(self) -> bool:
                with fake.lock:
                    if fake.fail_next <= 0:
                        return False
                    fake.fail_next -= 1
                if fake.fail_mode == "drop":
                    self.close_connection = True
                    self.connection.close()
                elif fake.fail_mode == "429":
                    self._send(429, {"message": "rate limited"}, {"Retry-After": "0"})
                elif fake.fail_mode == "400":
                    self._error(400, "bad request: injected")
                else:
                    self._error(503, "server overloaded")
                return True

            def do_GET(self):
                fake.log.append(("GET", self.path, None))
                if self.path == "/health":
                    with fake.lock:
                        if fake.health_failures > 0:
                            fake.health_failures -= 1
                            return self._error(503, "starting")
                    return self._send(200, "")
                if self.path == "/v1/models":
                    return self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in [BASE, *fake.adapters]]})
                self._error(404, "not found")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                fake.log.append(("POST", self.path, body))
                if self._injected_failure():
                    return
                if fake.delay:
                    time.sleep(fake.delay)
                if self.path == "/v1/completions":
                    if body.get("model") not in [BASE, *fake.adapters]:
                        return self._error(404, f"The model `{body.get('model')}` does not exist.")
                    return self._send(200, fake.completion(body))
                if self.path == "/v1/load_lora_adapter":
                    name, path = body["lora_name"], body["lora_path"]
                    if name in fake.adapters:
                        return self._error(400, f"The lora adapter '{name}' has already been loaded.")
                    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
                        return self._error(400, f"no adapter at {path}")
                    fake.adapters[name] = path
                    return self._send(200, f"Success: LoRA adapter '{name}' added successfully.")
                if self.path == "/v1/unload_lora_adapter":
                    if fake.adapters.pop(body["lora_name"], None) is None:
                        return self._error(404, f"The lora adapter '{body['lora_name']}' cannot be found.")
                    return self._send(200, f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")
                self._error(404, "not found")

        return Handler


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that timed out on purpose: not news
        pass


@pytest.fixture
def fake(tokenizer):
    state = FakeVLLM(tokenizer)
    server = QuietServer(("127.0.0.1", 0), state.handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def _engine(fake, tokenizer, **kwargs) -> ServerEngine:
    kwargs.setdefault("backoff", 0.001)
    engine = ServerEngine(fake.url + "/v1/", tokenizer, **kwargs)
    engine.sleeps = []
    engine._sleep = engine.sleeps.append  # record backoff delays instead of sleeping
    return engine


def _completions(fake):
    return [body for method, path, body in fake.log if path == "/v1/completions"]


PROMPTS = ["What is 3 + 4?", [{"role": "user", "content": "Compute 12 * 3."}], "Hi"]


def test_generate_shapes_order_and_request_fields(fake, tokenizer):
    engine = _engine(fake, tokenizer)
    assert isinstance(engine, RolloutEngine)
    out = engine.generate(PROMPTS, n=3, sampling=SamplingConfig(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=5))
    assert [len(g) for g in out] == [3, 3, 3]
    # prompt order and sample order survive the concurrent requests: the fake writes both into the text
    for p, group in zip(PROMPTS, out):
        n_prompt = len(prompt_token_ids(tokenizer, p))
        assert [c.text for c in group] == [fake.script([0] * n_prompt, i, BASE) for i in range(3)]
        assert all(isinstance(c, Completion) and c.finish_reason == "stop" and c.stop_string is None for c in group)
    bodies = sorted(_completions(fake), key=lambda b: b["seed"])
    assert [b["prompt"] for b in bodies] == [prompt_token_ids(tokenizer, p) for p in PROMPTS]
    b = bodies[0]
    assert b["model"] == BASE  # resolved from /v1/models
    assert (b["n"], b["max_tokens"], b["temperature"], b["top_p"], b["top_k"]) == (3, 64, 0.7, 0.9, -1)
    assert b["logprobs"] == 1 and b["return_tokens_as_token_ids"] is True and b["skip_special_tokens"] is True
    assert [x["seed"] for x in bodies] == [5, 8, 11]  # distinct per prompt: seed + index * n
    assert "stop" not in b


def test_token_ids_logprobs_and_eos_are_converted(fake, tokenizer):
    engine = _engine(fake, tokenizer, model_name=BASE)
    [[c0, c1]] = engine.generate(["Hi"], n=2, sampling=SamplingConfig(max_new_tokens=64))
    expected = tokenizer(fake.script(prompt_token_ids(tokenizer, "Hi"), 0, BASE))["input_ids"] + [tokenizer.eos_token_id]
    assert c0.token_ids == expected and c0.token_ids[-1] == tokenizer.eos_token_id  # eos kept
    assert c0.logprobs == pytest.approx([-(0.5 + 0.01 * k) for k in range(len(expected))])
    assert c1.logprobs[0] == pytest.approx(-0.6)
    assert c0.sum_logprob == pytest.approx(sum(c0.logprobs))
    assert c0.text == tokenizer.decode(expected, skip_special_tokens=True)  # no special tokens in the text


def test_stop_string_and_length_finish_reasons(fake, tokenizer):
    engine = _engine(fake, tokenizer, model_name=BASE)
    [[c]] = engine.generate(["Hi"], sampling=SamplingConfig(max_new_tokens=64, stop=["STOP"]))
    assert c.finish_reason == "stop" and c.stop_string == "STOP"
    assert c.text == f"{len(prompt_token_ids(tokenizer, 'Hi'))} tokens, sample 0. " and "STOP" not in c.text
    assert "STOP" in tokenizer.decode(c.token_ids) and "STOP" not in tokenizer.decode(c.token_ids[:-1])
    assert len(c.logprobs) == len(c.token_ids)
    [[c]] = engine.generate(["Hi"], sampling=SamplingConfig(max_new_tokens=3))
    assert c.finish_reason == "length" and len(c.token_ids) == len(c.logprobs) == 3
    assert c.token_ids[-1] != tokenizer.eos_token_id
    [[c]] = engine.generate(["Hi"], sampling=SamplingConfig(max_new_tokens=3, logprobs=False))
    assert c.logprobs is None and len(c.token_ids) == 3
    # without a tokenizer: text prompts go as text and the server's (already cut) text is kept
    bare = _engine(fake, None, model_name=BASE)
    [[c]] = bare.generate(["Hi"], sampling=SamplingConfig(max_new_tokens=64, stop=["STOP"]))
    assert (c.text, c.stop_string, c.finish_reason) == ("2 tokens, sample 0. ", "STOP", "stop")
    assert _completions(fake)[-1]["prompt"] == "Hi"
    with pytest.raises(ValueError, match="need a tokenizer"):
        bare.generate([[{"role": "user", "content": "x"}]])


def test_greedy_sends_temperature_zero_and_top_k_passes_through(fake, tokenizer):
    engine = _engine(fake, tokenizer, model_name=BASE)
    engine.generate(["Hi"], sampling=SamplingConfig(temperature=0, top_p=0.5, top_k=5))
    engine.generate(["Hi"], sampling=SamplingConfig(temperature=1.0, top_k=5, stop="X"))
    greedy, sampled = _completions(fake)
    assert (greedy["temperature"], greedy["top_p"], greedy["top_k"]) == (0.0, 1.0, -1) and "seed" not in greedy
    assert (sampled["top_k"], sampled["stop"]) == (5, ["X"])


@pytest.mark.parametrize("mode", ["503", "429", "drop"])
def test_transient_failures_are_retried_with_exponential_backoff(fake, tokenizer, mode):
    engine = _engine(fake, tokenizer, model_name=BASE, backoff=0.01, max_retries=4)
    fake.fail_next, fake.fail_mode = 3, mode
    [[c]] = engine.generate(["Hi"], sampling=SamplingConfig(max_new_tokens=4))
    assert len(c.token_ids) == 4
    assert len(_completions(fake)) == 4  # three failures, then the answer
    assert engine.sleeps == pytest.approx([0.01, 0.02, 0.04])


def test_backoff_is_capped_and_retries_run_out(fake, tokenizer):
    engine = _engine(fake, tokenizer, model_name=BASE, backoff=1.0, max_backoff=1.5, max_retries=2)
    fake.fail_next = 10
    with pytest.raises(ServerError, match=r"after 3 attempt\(s\): HTTP 503: server overloaded"):
        engine.generate(["Hi"])
    assert len(_completions(fake)) == 3 and engine.sleeps == [1.0, 1.5]


def test_client_errors_are_not_retried(fake, tokenizer):
    engine = _engine(fake, tokenizer, model_name=BASE)
    fake.fail_next, fake.fail_mode = 5, "400"
    with pytest.raises(ServerError, match="HTTP 400: bad request: injected") as info:
        engine.generate(["Hi"])
    assert info.value.status == 400 and len(_completions(fake)) == 1 and engine.sleeps == []
    fake.fail_next = 0
    engine.model_name = "no-such-model"
    with pytest.raises(ServerError, match="does not exist"):
        engine.generate(["Hi"])


def test_timeout_is_a_clear_error_and_not_retried(fake, tokenizer):
    engine = _engine(fake, tokenizer, model_name=BASE, timeout=0.2)
    fake.delay = 1.0
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"/v1/completions: no response within timeout=0.2s"):
        engine.generate(["Hi"])
    assert time.monotonic() - start < 0.9 and len(_completions(fake)) == 1


def test_unreachable_server_fails_after_retries(tokenizer):
    engine = ServerEngine("http://127.0.0.1:9", tokenizer, model_name=BASE, max_retries=2, backoff=0.001)
    with pytest.raises(ServerError, match=r"failed after 3 attempt\(s\): cannot connect"):
        engine.generate(["Hi"])


def test_wait_until_ready_polls_health(fake, tokenizer):
    engine = _engine(fake, tokenizer)
    fake.health_failures = 2
    engine.wait_until_ready(timeout=5, interval=0.01)
    assert [p for _, p, _ in fake.log].count("/health") == 3 and len(engine.sleeps) == 2
    down = ServerEngine("http://127.0.0.1:9", tokenizer)
    with pytest.raises(TimeoutError, match="not ready within 0.2s"):
        down.wait_until_ready(timeout=0.2, interval=0.05)


def test_lora_sync_loads_new_adapter_then_unloads_old_and_switches_model(fake, tokenizer, tiny_model_path, tmp_path):
    from peft import LoraConfig, get_peft_model

    from tests.conftest import load_tiny

    model = get_peft_model(load_tiny(tiny_model_path), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    engine = _engine(fake, tokenizer, adapter_dir=str(tmp_path / "shared"))
    engine.sync_weights(model)
    loads = [(p, b) for m, p, b in fake.log if "lora" in p]
    assert [p for p, _ in loads] == ["/v1/load_lora_adapter"]
    first = loads[0][1]
    v1 = first["lora_name"]
    assert re.fullmatch(r"alignkit-[0-9a-f]{8}-r0-v1", v1)
    assert os.path.isfile(os.path.join(first["lora_path"], "adapter_config.json"))
    assert first["lora_path"].startswith(str(tmp_path / "shared"))
    assert engine.model_name == v1 and engine.base_model_name == BASE
    engine.generate(["Hi"], sampling=SamplingConfig(max_new_tokens=4))
    assert _completions(fake)[-1]["model"] == v1

    engine.sync_weights(model)
    v2 = v1[:-1] + "2"
    lora_calls = [(p, b["lora_name"]) for m, p, b in fake.log if "lora" in p]
    assert lora_calls[1:] == [("/v1/load_lora_adapter", v2), ("/v1/unload_lora_adapter", v1)]
    assert list(fake.adapters) == [v2] and not os.path.exists(first["lora_path"])
    engine.generate(["Hi"], sampling=SamplingConfig(max_new_tokens=4))
    assert _completions(fake)[-1]["model"] == v2
    # a second engine (a restarted run) never collides with the names already loaded
    other = _engine(fake, tokenizer, adapter_dir=str(tmp_path / "shared"))
    other.sync_weights(model)
    assert other.model_name not in (v1, v2) and len(fake.adapters) == 2
    shutil.rmtree(tmp_path / "shared")


def test_adapter_forgotten_by_a_restarted_server_is_loaded_again(fake, tokenizer, tiny_model_path, tmp_path):
    from peft import LoraConfig, get_peft_model

    from tests.conftest import load_tiny

    model = get_peft_model(load_tiny(tiny_model_path), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    engine = _engine(fake, tokenizer, adapter_dir=str(tmp_path))
    engine.sync_weights(model)
    name, path = engine.model_name, fake.adapters[engine.model_name]
    fake.adapters.clear()  # what a restart does to adapters loaded at runtime
    out = engine.generate(PROMPTS, n=2, sampling=SamplingConfig(max_new_tokens=8))
    assert [len(g) for g in out] == [2, 2, 2] and fake.adapters == {name: path}
    loads = [b for m, p, b in fake.log if p == "/v1/load_lora_adapter"]
    assert len(loads) == 2 and loads[1] == {"lora_name": name, "lora_path": path}  # once, for three requests
    assert {b["model"] for b in _completions(fake)} == {name}
    # a 404 for anything else is an error as before
    engine.model_name = "no-such-model"
    with pytest.raises(ServerError, match="does not exist"):
        engine.generate(["Hi"], sampling=SamplingConfig(max_new_tokens=4))


def test_lora_load_refused_explains_server_flags(fake, tokenizer, tiny_model_path, tmp_path):
    from peft import LoraConfig, get_peft_model

    from tests.conftest import load_tiny

    model = get_peft_model(load_tiny(tiny_model_path), LoraConfig(r=4, target_modules=["q_proj"]))
    engine = _engine(fake, tokenizer, model_name=BASE, adapter_dir=str(tmp_path))
    fake.fail_next, fake.fail_mode = 1, "400"
    with pytest.raises(ServerError, match=r"loading adapter 'alignkit-\w+-r0-v1' from .*: .*HTTP 400"):
        engine.sync_weights(model)
    assert engine.model_name == BASE and not any(tmp_path.iterdir())  # nothing switched, nothing left behind


def test_full_model_sync_is_not_implemented(fake, tokenizer, tiny_model_path):
    from tests.conftest import load_tiny

    engine = _engine(fake, tokenizer, model_name=BASE)
    with pytest.raises(NotImplementedError, match="restart"):
        engine.sync_weights(load_tiny(tiny_model_path))


def test_make_engine_builds_a_server_engine(tokenizer):
    from alignkit.rollout import make_engine

    engine = make_engine("server", None, tokenizer, base_url="http://h:1/v1", adapter_dir="/x", timeout=5.0)
    assert isinstance(engine, ServerEngine)
    assert (engine.base_url, engine.adapter_dir, engine.timeout) == ("http://h:1", "/x", 5.0)


def test_serve_dry_run_builds_the_vllm_command(capsys):
    from alignkit.cli import main
    from alignkit.rollout.serve import serve_main

    assert serve_main(["--model", "/models/m", "--port", "8123", "--enable_lora", "--max_lora_rank", "16",
                       "--gpu_memory_utilization", "0.5", "--dry_run", "--", "--enforce-eager", "--max-num-seqs", "8"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("VLLM_ALLOW_RUNTIME_LORA_UPDATING=True ")
    assert " serve /models/m " in line and "--port 8123" in line and "--gpu-memory-utilization 0.5" in line
    assert "--enable-lora --max-lora-rank 16" in line and line.endswith("--enforce-eager --max-num-seqs 8")
    assert main(["serve", "--model", "/models/m", "--dry_run"]) == 0
    line = capsys.readouterr().out.strip()
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in line and "--enable-lora" not in line and "--port 8000" in line


def test_serve_on_cpu_adds_the_vllm_cpu_workarounds(monkeypatch):
    from alignkit.rollout import serve

    args = serve.build_parser().parse_args(["--model", "/models/m", "--seed", "3"])
    cmd, _ = serve.build_command(args, [], on_cpu=True)
    assert "--no-enable-chunked-prefill" in cmd  # seeded requests + chunked prefill kill the CPU engine
    assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == str(1 << 30) and "--gpu-memory-utilization" not in cmd
    cmd, _ = serve.build_command(args, ["--enable-chunked-prefill", "--kv-cache-memory-bytes=5"], on_cpu=True)
    assert "--no-enable-chunked-prefill" not in cmd and "--kv-cache-memory-bytes" not in cmd  # the user's choice
    cmd, _ = serve.build_command(args, [], on_cpu=False)
    assert "--no-enable-chunked-prefill" not in cmd and cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.9"
    # vllm-cpu's `vllm` command cannot start (no "vllm" distribution): its API server module instead
    monkeypatch.setattr(serve, "_has_distribution", lambda name: name == "vllm-cpu")
    cmd, _ = serve.build_command(args, [], on_cpu=True)
    assert cmd[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "/models/m"]
    monkeypatch.setattr(serve, "_has_distribution", lambda name: name == "vllm")
    cmd, _ = serve.build_command(args, [], on_cpu=False)
    assert cmd[1:5] == ["-m", "vllm.entrypoints.cli.main", "serve", "/models/m"]


def test_serve_without_vllm_is_a_clear_error(monkeypatch, capsys):
    import importlib.util

    from alignkit.rollout import serve

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    monkeypatch.setattr(serve.os, "execvpe", lambda *a: pytest.fail("must not exec without vllm"))
    assert serve.serve_main(["--model", "/models/m"]) == 1
    assert "vLLM is not installed" in capsys.readouterr().err
