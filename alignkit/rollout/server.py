"""The server backend: a client of a vLLM OpenAI-compatible server (``vllm serve`` / ``alignkit serve``).

Standard library only (``urllib.request`` + ``json``). One ``POST /v1/completions`` per prompt, sent
concurrently from a small thread pool, with:

* ``prompt`` = the prompt's token ids (:func:`prompt_token_ids`, the trainers' tokenization), ``n``,
  every sampling setting spelled out (``temperature``, ``top_p``, ``top_k`` (``-1`` = off, accepted by
  every vLLM >= 0.10), ``min_p=0``, no penalties), so the model's ``generation_config`` defaults that the
  server would otherwise apply (``--generation-config auto``) do not leak in;
* ``logprobs=1``: ``choices[i].logprobs.token_logprobs`` holds the sampled tokens' log-probs (raw
  log-probs: the server's default ``--logprobs-mode raw_logprobs``, vLLM >= 0.10.1; raw before that in
  V1); 1 rather than 0 so no server can read it as "off" (the extra top-1 entry is ignored);
* ``return_tokens_as_token_ids=True``: ``logprobs.tokens`` come back as ``"token_id:123"`` strings, so
  the generated token ids (end-of-sequence token included) are exact; ``return_token_ids=True``
  (vLLM >= 0.10.2) also adds ``choices[i].token_ids``, used when present. Unknown request fields are
  ignored (with a warning) by older servers.

Errors: connection failures (refused, reset, dropped), 5xx and 429 are retried with exponential
backoff (``Retry-After`` honoured, capped); other 4xx are raised at once as :class:`ServerError`; no
answer within ``timeout`` raises :class:`TimeoutError` (not retried: the request may still be running).

LoRA sync (``sync_weights(peft_model)``): the adapter is saved under ``adapter_dir`` (a path the server
can read), loaded with ``POST /v1/load_lora_adapter {"lora_name", "lora_path"}``, the previous one is
unloaded with ``POST /v1/unload_lora_adapter {"lora_name"}``, and later requests use the new name as
``model`` (names carry a random run id and the rank, so a restarted run or several ranks never
collide). The server needs ``--enable-lora --max-lora-rank R`` and the environment variable
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` (``alignkit serve --enable_lora`` sets both). Adapters loaded at
runtime do not survive a server restart: when the server answers 404 for the synced adapter's name, the
adapter is loaded again from its saved copy and the request sent once more.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from alignkit.rollout.base import Completion, Prompt, SamplingConfig, check_generate_args, prompt_token_ids
from alignkit.rollout.vllm import finish_completion, is_peft_model, save_adapter

logger = logging.getLogger(__name__)

TOKEN_ID_PREFIX = "token_id:"


class ServerError(RuntimeError):
    """The server answered with an error, or could not be reached after the retries."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _error_text(payload: bytes) -> str:
    """The ``message`` of a vLLM / OpenAI error body, else the body itself (shortened)."""
    text = payload.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        return text[:500]
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if data.get("message"):
            return str(data["message"])
        if data.get("detail"):
            return str(data["detail"])
    return text[:500]


def _token_id(token: str) -> int:
    if not isinstance(token, str) or not token.startswith(TOKEN_ID_PREFIX):
        raise ServerError(
            f"the server returned token {token!r} instead of 'token_id:N': it ignored return_tokens_as_token_ids "
            "(use vLLM >= 0.10)"
        )
    return int(token[len(TOKEN_ID_PREFIX) :])


class ServerEngine:
    """Rollouts from a vLLM OpenAI-compatible server.

    Args:
        base_url: the server, e.g. ``http://localhost:8000`` (a trailing ``/v1`` is accepted).
        tokenizer: the trainer's tokenizer: prompts are sent as its token ids and completions decoded
            with it. Without one, prompts must be text and the server's text is kept.
        model_name: the served model name; default: the first model ``GET /v1/models`` lists.
        api_key: sent as ``Authorization: Bearer``; default: ``$VLLM_API_KEY``.
        timeout: seconds to wait for one response.
        max_retries: retries of a request after a connection error, 5xx or 429.
        backoff: first retry delay in seconds, doubled each retry, capped at ``max_backoff``.
        max_concurrency: requests in flight at once.
        adapter_dir: directory, readable by the server, where synced LoRA adapters are written
            (default: a local temporary directory, fine when the server runs on this machine).
        adapter_prefix: prefix of the served adapter names (``<prefix>-<run id>-r<rank>-v<k>``).
    """

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        tokenizer=None,
        *,
        model_name: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_concurrency: int = 8,
        adapter_dir: str | None = None,
        adapter_prefix: str = "alignkit",
    ):
        base = base_url.rstrip("/")
        base = base.removesuffix("/v1")
        self.base_url = base
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.base_model_name = model_name
        self.api_key = api_key if api_key is not None else os.environ.get("VLLM_API_KEY")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_concurrency = max(1, max_concurrency)
        self.adapter_prefix = adapter_prefix
        self.adapter_dir = adapter_dir
        self._adapter_version = 0
        self._run_id = uuid.uuid4().hex[:8]  # adapter names stay unique if a run restarts against the same server
        self._adapter_name: str | None = None
        self._adapter_path: str | None = None  # the directory of this version (removed when replaced)
        self._adapter_lora_path: str | None = None  # what the server loads (the adapter inside it)
        self._reload_lock = threading.Lock()
        self._sleep = time.sleep  # replaced in tests

    # -- HTTP ----------------------------------------------------------------------------------------

    def _backoff_delay(self, attempt: int, retry_after: str | None) -> float:
        delay = self.backoff * (2**attempt)
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        return min(delay, self.max_backoff)

    def request(
        self, method: str, path: str, body: dict | None = None, *, retry: bool = True, timeout: float | None = None
    ):
        """Send one request (with retries) and return the decoded JSON (or text) answer."""
        url = self.base_url + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        timeout = self.timeout if timeout is None else timeout
        attempts = self.max_retries + 1 if retry else 1
        last = "no attempt"
        for attempt in range(attempts):
            retry_after = None
            req = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    payload = resp.read()
                    text = payload.decode("utf-8", "replace")
                    try:
                        return json.loads(text) if text.strip() else None
                    except ValueError:
                        return text
            except urllib.error.HTTPError as e:
                status, message = e.code, _error_text(e.read() or b"")
                if status != 429 and status < 500:
                    raise ServerError(f"{method} {url} -> HTTP {status}: {message}", status) from None
                retry_after = e.headers.get("Retry-After") if e.headers else None
                last = f"HTTP {status}: {message}"
            except TimeoutError as e:
                raise self._timeout(method, url, timeout) from e
            except urllib.error.URLError as e:
                if isinstance(e.reason, TimeoutError):
                    raise self._timeout(method, url, timeout) from e
                last = f"cannot connect ({e.reason})"
            except (http.client.HTTPException, ConnectionError, OSError) as e:  # dropped / reset connections
                last = f"connection error ({type(e).__name__}: {e})"
            if attempt + 1 < attempts:
                delay = self._backoff_delay(attempt, retry_after)
                logger.warning(
                    "%s %s failed (%s); retry %d/%d in %.1fs", method, url, last, attempt + 1, attempts - 1, delay
                )
                self._sleep(delay)
        raise ServerError(f"{method} {url} failed after {attempts} attempt(s): {last}")

    def _timeout(self, method: str, url: str, timeout: float) -> TimeoutError:
        return TimeoutError(
            f"{method} {url}: no response within timeout={timeout:g}s (the server may be overloaded, or the "
            "generation longer than the timeout allows: raise timeout / server_timeout, or lower n or max_new_tokens)"
        )

    def wait_until_ready(self, timeout: float = 300.0, interval: float = 1.0) -> None:
        """Poll ``GET /health`` until it answers 200; :class:`TimeoutError` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            try:
                self.request("GET", "/health", retry=False, timeout=max(min(interval * 5, 10.0), 0.1))
                return
            except (ServerError, TimeoutError) as e:
                last = str(e)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the vLLM server at {self.base_url} was not ready within {timeout:g}s ({last})")
            self._sleep(interval)

    def models(self) -> list[str]:
        """Ids served now (the base model first, then loaded adapters), from ``GET /v1/models``."""
        data = self.request("GET", "/v1/models")
        return [m["id"] for m in (data or {}).get("data", [])]

    def _model(self) -> str:
        if self.model_name is None:
            served = self.models()
            if not served:
                raise ServerError(f"the server at {self.base_url} serves no model")
            self.model_name = self.base_model_name = served[0]
        return self.model_name

    # -- generate ------------------------------------------------------------------------------------

    def request_body(self, prompt, n: int, sampling: SamplingConfig, seed: int | None) -> dict:
        body: dict[str, Any] = {
            "model": self._model(),
            "prompt": prompt,
            "n": n,
            "max_tokens": sampling.max_new_tokens,
            "temperature": 0.0 if sampling.greedy else sampling.temperature,
            "top_p": 1.0 if sampling.greedy else sampling.top_p,
            "top_k": sampling.top_k if (sampling.top_k and not sampling.greedy) else -1,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "logprobs": 1,
            "return_tokens_as_token_ids": True,
            "return_token_ids": True,
            "skip_special_tokens": True,
            "include_stop_str_in_output": False,
            "stream": False,
        }
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if seed is not None:
            body["seed"] = seed
        return body

    def generate(
        self, prompts: Sequence[Prompt], n: int = 1, sampling: SamplingConfig | None = None
    ) -> list[list[Completion]]:
        check_generate_args(prompts, n)
        sampling = sampling or SamplingConfig()
        if not prompts:
            return []
        if self.tokenizer is not None:
            encoded: list[Any] = [prompt_token_ids(self.tokenizer, p) for p in prompts]
        else:
            if not all(isinstance(p, str) for p in prompts):
                raise ValueError("chat-message prompts need a tokenizer (ServerEngine(tokenizer=...))")
            encoded = list(prompts)
        self._model()  # resolve the model name once, before the threads start
        bodies = [
            self.request_body(x, n, sampling, None if sampling.seed is None else sampling.seed + i * n)
            for i, x in enumerate(encoded)
        ]
        workers = min(self.max_concurrency, len(bodies))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="alignkit-server") as pool:
            answers = list(pool.map(self._complete, bodies))
        return [self._completions(answer, n, sampling) for answer in answers]

    def _complete(self, body: dict):
        """``POST /v1/completions``; a synced adapter the server no longer knows is loaded again once."""
        try:
            return self.request("POST", "/v1/completions", body)
        except ServerError as e:
            if e.status != 404 or self._adapter_name is None or body.get("model") != self._adapter_name:
                raise
            self._reload_adapter(body["model"], e)
            return self.request("POST", "/v1/completions", body)

    def _reload_adapter(self, name: str, error: ServerError) -> None:
        """Load adapter ``name`` again (the server restarted and lost its runtime-loaded adapters)."""
        with self._reload_lock:  # one reload, whichever request thread sees the 404 first
            if name in self.models():
                return
            logger.warning("the server does not know adapter %r (%s): it restarted? loading it again from %s",
                           name, error, self._adapter_lora_path)
            self.request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": self._adapter_lora_path})

    def _completions(self, answer: dict, n: int, sampling: SamplingConfig) -> list[Completion]:
        choices = sorted((answer or {}).get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise ServerError(f"the server returned {len(choices)} choices for n={n}")
        out = []
        for choice in choices:
            lp = choice.get("logprobs") or {}
            tokens = lp.get("tokens")
            token_ids = choice.get("token_ids")
            if token_ids is None:
                if tokens is None:
                    raise ServerError("the server returned neither token_ids nor logprobs.tokens")
                token_ids = [_token_id(t) for t in tokens]
            logprobs = None
            if sampling.logprobs:
                values = lp.get("token_logprobs")
                if values is None:
                    raise ServerError("the server returned no logprobs although logprobs were requested")
                logprobs = [float("-inf") if v is None else float(v) for v in values]
            out.append(
                finish_completion(
                    self.tokenizer, token_ids, logprobs, choice.get("finish_reason"), choice.get("stop_reason"),
                    sampling, text=choice.get("text"),
                )
            )
        return out

    # -- weight sync ---------------------------------------------------------------------------------

    def sync_weights(self, model) -> None:
        """Serve ``model``'s current LoRA adapter (peft models only; see the module doc)."""
        if not is_peft_model(model):
            raise NotImplementedError(
                "the server backend syncs LoRA adapters only: a vLLM server cannot receive full weights over "
                "HTTP. Train with LoRA (use_peft=true), or save the model (trainer.save_model(DIR)) and restart "
                "the server from it (alignkit serve --model DIR), or use the colocated vllm backend, which "
                "loads full weights in place."
            )
        base_name = self._model() if self._adapter_name is None else self.base_model_name
        if self.adapter_dir is None:
            self.adapter_dir = tempfile.mkdtemp(prefix="alignkit-server-lora-")
            logger.info("server backend: adapters go to %s (set adapter_dir if the server is remote)", self.adapter_dir)
        rank = os.environ.get("RANK", "0")
        version = self._adapter_version + 1
        name = f"{self.adapter_prefix}-{self._run_id}-r{rank}-v{version}"
        directory = os.path.join(os.path.abspath(self.adapter_dir), name)
        path = save_adapter(model, directory)
        try:
            self.request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        except ServerError as e:
            shutil.rmtree(directory, ignore_errors=True)
            hint = ""
            if e.status in (404, 405):
                hint = (
                    " (runtime LoRA loading is off: start the server with --enable-lora and "
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, e.g. `alignkit serve --model M --enable_lora`)"
                )
            raise ServerError(f"loading adapter {name!r} from {path} failed: {e}{hint}", e.status) from None
        previous, previous_dir = self._adapter_name, self._adapter_path
        self._adapter_version, self._adapter_name, self._adapter_path = version, name, directory
        self._adapter_lora_path = path
        self.base_model_name = base_name
        self.model_name = name
        if previous is not None:
            try:
                self.request("POST", "/v1/unload_lora_adapter", {"lora_name": previous})
            except (ServerError, TimeoutError) as e:
                logger.warning("unloading the previous adapter %r failed: %s", previous, e)
            if previous_dir:
                shutil.rmtree(previous_dir, ignore_errors=True)
