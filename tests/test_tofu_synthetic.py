"""The synthetic TOFU-like task (deterministic world, TOFU split names, paraphrases and perturbed
answers), the TOFU-format loader (named errors), and the whole pipeline on CPU: fine-tune a tiny model
on every fact -> unlearn the forget split with NPO -> evaluate (forget quality against a retain-only model)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.data.loading import load_records
from alignkit.data.records import RecordError
from alignkit.recipes import DataArguments, load_data
from alignkit.tasks import synthetic_tofu as st
from alignkit.tasks import synthetic_tofu_models as stm
from alignkit.tasks.tofu import load_tofu_eval_items, load_tofu_records


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_world_is_deterministic_and_tofu_shaped():
    spec = st.SyntheticTofuSpec()
    world = st.make_world(spec)
    assert world == st.make_world(spec) and world != st.make_world(st.SyntheticTofuSpec(seed=1))
    assert len(world) == 40 * len(st.ATTRIBUTES) and len({w["id"] for w in world}) == len(world)
    for item in world:
        assert item["value"] in item["answer"] and item["value"] in item["paraphrased_answer"]
        assert item["answer"] != item["paraphrased_answer"]
        assert len(item["perturbed_answer"]) == spec.num_perturbed
        for wrong in item["perturbed_answer"]:  # the paraphrase's wording with a wrong value
            assert wrong != item["paraphrased_answer"] and item["value"] not in wrong.split()
            assert len(wrong.split()) >= 3


def test_splits_follow_tofu_names():
    forget, retain = st.records("forget10"), st.records("retain90")
    assert len(forget) == 20 and len(retain) == 180
    assert not {r["id"] for r in forget} & {r["id"] for r in retain}
    assert {r["id"] for r in forget} | {r["id"] for r in retain} == {w["id"] for w in st.make_world()}
    assert len(st.records("forget05")) == 10
    with pytest.raises(ValueError, match="forget01"):
        st.records("forget01")  # 0.4 of a person
    with pytest.raises(ValueError, match="unknown split"):
        st.records("holdout10")
    assert len(load_records(forget, "sft")) == 20  # valid sft records
    items = st.eval_items("forget10")
    assert [it["prompt"] for it in items] == [r["prompt"] for r in forget]
    # recipe sources: one world per seed for train and eval
    args = DataArguments(synthetic_seed=0)
    assert load_data("synthetic:tofu_forget10", args, "sft", train=True) == forget
    assert load_data("synthetic:tofu_forget10", args, "sft", train=False) == forget


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_tofu_format_loader_and_named_errors(tmp_path):
    rows = [{"question": f"Who is author {i}?", "answer": f"Author {i} writes.",
             "paraphrased_answer": f"Author {i} is a writer.",
             "perturbed_answer": [f"Author {i} paints.", f"Author {i} sings."]} for i in range(3)]
    _write_jsonl(tmp_path / "forget10.json", [{k: r[k] for k in ("question", "answer")} for r in rows])
    _write_jsonl(tmp_path / "forget10_perturbed.json", rows)
    records = load_tofu_records(str(tmp_path), "forget10")
    assert records[1] == {"id": "forget10-2", "prompt": [{"role": "user", "content": "Who is author 1?"}],
                          "response": "Author 1 writes."}
    items = load_tofu_eval_items(str(tmp_path), "forget10")  # reads forget10_perturbed
    assert items[2]["perturbed_answer"] == ["Author 2 paints.", "Author 2 sings."]
    assert load_data("tofu:forget10", DataArguments(tofu_data=str(tmp_path)), "sft", train=True) == records

    bad = tmp_path / "bad"
    bad.mkdir()
    _write_jsonl(bad / "retain90.json", [rows[0], {"question": "Who?", "answr": "typo"}])
    with pytest.raises(RecordError, match=r"retain90.json, row 2, field 'answer': missing") as err:
        load_tofu_records(str(bad), "retain90")
    assert err.value.row == 2 and err.value.field == "answer"
    _write_jsonl(bad / "forget10_perturbed.json", [rows[0], {**rows[1], "perturbed_answer": []}])
    with pytest.raises(RecordError, match="forget10_perturbed.json, row 2, field 'perturbed_answer'"):
        load_tofu_eval_items(str(bad), "forget10")
    (bad / "forget05.json").write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(RecordError, match="forget05.json, row 2: invalid JSON"):
        load_tofu_records(str(bad), "forget05")
    with pytest.raises(FileNotFoundError, match="no TOFU subset 'forget01'"):
        load_tofu_records(str(bad), "forget01")


def test_pipeline_finetune_unlearn_evaluate(tmp_path):
    """Small world (10 people, forget10 = 1 person): fine-tune -> forget probability high; NPO -> it
    drops; the evaluation JSON has per-item results and forget quality against the retain-only model."""
    from alignkit.evaluation.unlearning import evaluate_unlearning, load_results, save_results
    from alignkit.trainers import NPOConfig, NPOTrainer

    torch.manual_seed(0)
    spec = st.SyntheticTofuSpec(num_people=10, seed=3)
    base = stm.make_task_model(tmp_path / "base", spec, hidden_size=64, num_layers=2)
    tokenizer = AutoTokenizer.from_pretrained(base)
    splits = {"forget": st.eval_items("forget10", spec), "retain": st.eval_items("retain90", spec)}

    retain_model = AutoModelForCausalLM.from_pretrained(base)
    stm.finetune(retain_model, tokenizer, st.records("retain90", spec), epochs=25, learning_rate=5e-3)
    save_results(evaluate_unlearning(retain_model, tokenizer, splits, generate=False), tmp_path / "retain.json")

    model = AutoModelForCausalLM.from_pretrained(base)
    losses = stm.finetune(model, tokenizer, st.all_records(spec), epochs=25, learning_rate=5e-3)
    assert losses[-1] < 0.2 * losses[0]
    before = evaluate_unlearning(model, tokenizer, splits, reference_results=tmp_path / "retain.json", max_new_tokens=16)
    assert before["summary"]["forget/probability"] > 0.6
    never_seen = load_results(tmp_path / "retain.json")["summary"]["forget/probability"]
    assert before["summary"]["forget/probability"] > 2 * never_seen

    config = NPOConfig(output_dir=str(tmp_path / "npo"), loss_type="npo_rt", learning_rate=3e-3, max_steps=12,
                       per_device_train_batch_size=5, lr_scheduler_type="constant", save_strategy="no",
                       report_to="none", use_cpu=True, logging_steps=4, disable_tqdm=True)
    NPOTrainer(model, config, train_dataset=st.records("forget10", spec), retain_dataset=st.records("retain90", spec),
               processing_class=tokenizer).train()
    after = evaluate_unlearning(model, tokenizer, splits, reference_results=tmp_path / "retain.json", max_new_tokens=16)
    save_results(after, tmp_path / "after.json")
    saved = load_results(tmp_path / "after.json")
    assert saved["summary"]["forget/probability"] < 0.5 * before["summary"]["forget/probability"]
    assert len(saved["splits"]["forget"]["items"]) == 5 and "truth_ratio" in saved["splits"]["forget"]["items"][0]
    assert 0.0 <= saved["summary"]["forget_quality"] <= 1.0 and saved["summary"]["model_utility"] > 0
