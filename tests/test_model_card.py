"""A model card (README.md) on every save, full model or LoRA adapter, as TRL writes one: a YAML header
(base_model, datasets, library_name, tags), the method, the data, the key hyper-parameters, the metrics at
the end of training and the method's citation (issue 18, item 2)."""

from __future__ import annotations

import json
import os

import yaml
from conftest import load_tiny
from peft import LoraConfig

from alignkit.cli import main
from alignkit.model_card import CardInfo, build_model_card, final_metrics, paper_of, tags_of
from alignkit.tasks.arithmetic import make_preference_pairs
from alignkit.trainers import DPOConfig, DPOTrainer, NPOConfig, NPOTrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes", "dpo_tiny.yaml")


def split_card(text: str) -> tuple[dict, str]:
    """The YAML header (parsed) and the Markdown body of a card."""
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def table(body: str, title: str) -> dict[str, str]:
    """The ``| key | value |`` rows of the table under the heading ``title``."""
    section = body.split(title, 1)[1].split("\n#", 1)[0]
    rows = [ln.strip("|").split("|") for ln in section.splitlines() if ln.startswith("| ") and "---" not in ln]
    return {k.strip().strip("`"): v.strip() for k, v in rows[1:]}  # rows[0] is the table's header


# ------------------------------------------------------------------------------------ the pure function


def test_build_model_card_is_a_trl_like_card():
    info = CardInfo(method="dpo", model_name="my-dpo", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                    variant="sigmoid", datasets={"train": "trl-lib/ultrafeedback_binarized", "eval": "data/eval.jsonl"},
                    hyperparameters={"learning_rate": 5e-7, "beta": 0.1, "seed": 42},
                    metrics={"loss": 0.4123456789, "rewards/accuracies": 0.75}, global_step=120,
                    recipe="recipes/dpo.yaml", versions={"transformers": "5.0"})
    text = build_model_card(info)
    header, body = split_card(text)
    assert header["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert header["datasets"] == ["trl-lib/ultrafeedback_binarized"]  # hub ids only: a local path is no hub dataset
    assert header["library_name"] == "transformers"
    assert header["tags"] == ["alignkit", "dpo"]
    assert header["model_name"] == "my-dpo"
    assert "# Model Card for my-dpo" in body
    assert ("a fine-tuned version of [HuggingFaceTB/SmolLM2-135M-Instruct]"
            "(https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct), trained with **DPO**") in body
    assert "- train: `trl-lib/ultrafeedback_binarized`" in body and "- eval: `data/eval.jsonl`" in body
    assert "- recipe: `recipes/dpo.yaml`" in body
    assert table(body, "### Hyper-parameters") == {"learning_rate": "5e-07", "beta": "0.1", "seed": "42"}
    assert table(body, "### Results at the end of training (step 120)") == {"loss": "0.412346",
                                                                            "rewards/accuracies": "0.75"}
    assert "https://huggingface.co/papers/2305.18290" in body
    assert "```bibtex\n@inproceedings{rafailov2023direct," in body and "eprint       = {arXiv:2305.18290}" in body


def test_build_model_card_for_an_adapter_and_a_local_base():
    info = CardInfo(method="npo", model_name="forget", base_model="/models/tofu-base", peft=True, variant="simnpo",
                    datasets={"train": "synthetic:tofu_forget10"})
    header, body = split_card(build_model_card(info))
    assert "base_model" not in header  # a local path is not a hub id
    assert header["library_name"] == "peft" and header["tags"] == ["alignkit", "npo", "simnpo", "lora"]
    assert "a LoRA adapter for `/models/tofu-base`, trained with **SimNPO**" in body
    assert "AutoPeftModelForCausalLM" in body
    assert "arXiv:2410.07163" in body  # SimNPO's paper, not NPO's
    assert paper_of("npo", "npo_rt")["id"] == "2404.05868"
    assert tags_of(CardInfo(method="dpo", model_name="x")) == ["alignkit", "dpo"]


def test_final_metrics_keep_the_last_value_of_each():
    history = [{"loss": 1.0, "step": 1, "grad_norm": 3.0}, {"loss": 0.5, "eval_loss": 0.7, "step": 2},
               {"train_loss": 0.75, "train_runtime": 3.0, "loss": float("nan")}]
    assert final_metrics(history) == {"loss": 0.5, "eval_loss": 0.7, "train_loss": 0.75}


# ------------------------------------------------------------------------------------ on every save


def _config(tmp_path, cls=DPOConfig, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=5e-3,
                report_to="none", use_cpu=True, max_length=128, logging_steps=1, seed=0, save_strategy="no",
                max_steps=2)
    return cls(**{**base, **kw})


def test_python_api_full_model_card(tiny_model_path, tokenizer, tmp_path):
    model = load_tiny(tiny_model_path)
    model.config._name_or_path = "alignkit-test/tiny-qwen2"  # as if loaded from the hub
    args = _config(tmp_path, beta=0.2, save_strategy="steps", save_steps=2)
    trainer = DPOTrainer(model=model, args=args, train_dataset=make_preference_pairs(8), processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    header, body = split_card((out / "README.md").read_text())
    assert header["base_model"] == "alignkit-test/tiny-qwen2"
    assert header["library_name"] == "transformers" and header["tags"] == ["alignkit", "dpo"]
    assert "trained with **DPO** (`loss_type: sigmoid`)" in body
    assert "- train: `list of 8 records`" in body
    hyper = table(body, "### Hyper-parameters")
    assert hyper["beta"] == "0.2" and hyper["learning_rate"] == "0.005" and hyper["max_steps"] == "2"
    assert "output_dir" not in hyper and "report_to" not in hyper
    metrics = table(body, "### Results at the end of training (step 2)")
    last = [h for h in trainer.state.log_history if "loss/dpo" in h][-1]
    assert float(metrics["loss/dpo"]) == float(f"{last['loss/dpo']:.6g}")
    assert {"rewards/margins", "logps/chosen", "train_loss"} <= set(metrics)
    assert "@inproceedings{rafailov2023direct," in body
    # every checkpoint is a saved model too
    header, _ = split_card((out / "checkpoint-2" / "README.md").read_text())
    assert header["base_model"] == "alignkit-test/tiny-qwen2"


def test_python_api_adapter_card_replaces_peft_template(tiny_model_path, tokenizer, tmp_path):
    from alignkit.tasks.arithmetic import make_problems

    model = load_tiny(tiny_model_path)
    model.config._name_or_path = model.name_or_path = "alignkit-test/tiny-qwen2"  # peft reads name_or_path
    forget = [{"prompt": p["prompt"], "response": "wrong"} for p in make_problems(8, seed=0)]
    trainer = NPOTrainer(model=model, args=_config(tmp_path, NPOConfig, loss_type="simnpo"), train_dataset=forget,
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    text = (out / "README.md").read_text()
    assert "More Information Needed" not in text  # peft's blank template is gone
    header, body = split_card(text)
    assert header["base_model"] == "alignkit-test/tiny-qwen2"
    assert header["library_name"] == "peft" and header["tags"] == ["alignkit", "npo", "simnpo", "lora"]
    assert "a LoRA adapter for [alignkit-test/tiny-qwen2]" in body and "**SimNPO**" in body
    hyper = table(body, "### Hyper-parameters")
    assert hyper["lora_r"] == "4" and hyper["lora_alpha"] == "8" and hyper["lora_target_modules"] == "q_proj, v_proj"
    assert hyper["loss_type"] == "simnpo"
    assert "train_loss" in table(body, "### Results at the end of training (step 2)")
    assert "@article{fan2024simplicity," in body


def test_cli_train_writes_the_card_for_a_model_and_an_adapter(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    common = ["--max_steps", "1", "--synthetic_train_size", "8", "--eval_strategy", "no", "--save_strategy", "no",
              "--logging_steps", "1"]
    for name, extra in (("full", []), ("lora", ["--use_peft", "true", "--lora_r", "8"])):
        out = tmp_path / name
        assert main(["train", RECIPE, "--output_dir", str(out), *common, *extra]) == 0
        printed = capsys.readouterr().out.strip().splitlines()[-1]
        header, body = split_card((out / "README.md").read_text())
        assert header["tags"][:2] == ["alignkit", "dpo"]
        assert "- train: `synthetic:arithmetic_pairs`" in body and f"- recipe: `{RECIPE}`" in body
        assert "`tiny:qwen2`" in body  # the recipe's model (a local, generated one: no hub base_model)
        hyper = table(body, "### Hyper-parameters")
        assert hyper["beta"] == "0.1" and hyper["learning_rate"] == "0.0005" and hyper["max_length"] == "256"
        assert "loss/dpo" in table(body, "### Results at the end of training (step 1)")
        assert "arXiv:2305.18290" in body
        if name == "lora":
            assert header["library_name"] == "peft" and header["tags"][-1] == "lora" and hyper["lora_r"] == "8"
            assert printed == f"alignkit train: saved the LoRA adapter, tokenizer and model card README.md to {out}"
        else:
            assert header["library_name"] == "transformers" and "lora" not in header["tags"]
            assert printed == f"alignkit train: saved the model, tokenizer and model card README.md to {out}"
