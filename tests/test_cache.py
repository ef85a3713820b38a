"""The caches of alignkit: a changed middle-layer weight (same model path, same output dir) must miss.

The stale-cache case of issue 17: the reference log-probs were keyed by the norms of the first and last
parameters only, so a rerun with one middle-layer weight changed reused the first model's values.
"""

import torch
from conftest import load_tiny

from alignkit.scoring import score_responses
from alignkit.tasks.arithmetic import make_preference_pairs
from alignkit.trainers import DPOConfig, DPOTrainer


def _changed_middle_layer(path):
    """The tiny model with one middle-layer weight changed; first and last parameters untouched."""
    model = load_tiny(path)
    params = list(model.named_parameters())
    name, weight = next((n, p) for n, p in params if "layers.0.mlp.down_proj" in n)
    assert name not in (params[0][0], params[-1][0])
    with torch.no_grad():
        weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    return model


def test_reference_logps_cache_misses_when_a_middle_layer_weight_changes(tiny_model_path, tokenizer, tmp_path):
    pairs = make_preference_pairs(8)
    args = DPOConfig(output_dir=str(tmp_path / "out"), reference="precomputed", per_device_train_batch_size=4,
                     per_device_eval_batch_size=8, report_to="none", use_cpu=True, max_length=128, save_strategy="no")
    first = DPOTrainer(model=load_tiny(tiny_model_path), args=args, train_dataset=pairs, processing_class=tokenizer)
    first.get_train_dataloader()
    cached = torch.tensor(first.train_dataset["ref_logps"])

    changed = _changed_middle_layer(tiny_model_path)
    second = DPOTrainer(model=changed, args=args, train_dataset=pairs, processing_class=tokenizer)
    batch = second.data_collator([second.train_dataset[i] for i in range(len(pairs))])
    with torch.no_grad():
        live = score_responses(changed, batch).logps.view(-1, 2)
    second.get_train_dataloader()
    reused = torch.tensor(second.train_dataset["ref_logps"])
    assert (live - cached).abs().max() > 1e-3, "the change does not move the log-probs: the test proves nothing"
    torch.testing.assert_close(reused, live, atol=1e-4, rtol=0)
