"""SFT: ``SFTConfig`` + ``SFTTrainer`` on (``prompt``, ``response``) records.

Supervised fine-tuning on positives, on the shared core: the loss is the mean negative log-likelihood
of the response tokens (prompt tokens masked), averaged over all response tokens of the batch as in
``transformers`` causal-LM training. It is the starting point of the per-step and on-policy methods
(the SFT model is their reference) and the baseline they are compared with; rejection-sampling
fine-tuning (RFT) is SFT on the model's own verified-correct samples (:func:`rft_records`).

Logged: ``loss/sft`` (token-mean NLL) and ``logps/response`` (mean summed log-prob of a response).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignkit.negatives import distinct_completions
from alignkit.trainers.base import AlignConfig, AlignTrainer


@dataclass
class SFTConfig(AlignConfig):
    """SFT settings: no reference policy, a larger default learning rate than the preference methods."""

    learning_rate: float = 2e-5
    reference: str = field(default="none", metadata={"help": "SFT has no reference term."})


class SFTTrainer(AlignTrainer):
    """Next-token NLL on the response of each (prompt, response) record; prompt tokens never count."""

    record_kind = "sft"
    uses_reference = False
    args: SFTConfig

    def group_responses(self, record):
        return [record["response"]]

    def compute_batch_loss(self, model, batch):
        policy = self.score(model, batch)
        loss = -policy.token_logps.sum() / policy.token_logps.numel()
        return loss, {"loss/sft": loss.detach(), "logps/response": policy.logps.detach().mean()}


def finetune(model, tokenizer, records, output_dir: str, *, batch_size: int, learning_rate: float,
             epochs: float | None = None, max_steps: int | None = None, logging_steps: int | None = None,
             logging_first_step: bool = False, **config) -> list[float]:
    """Fine-tune ``model`` in place on (prompt, response) ``records`` with :class:`SFTTrainer` for ``epochs``
    (or ``max_steps``) and return the logged training loss (token-mean NLL) of every logging interval
    (``logging_steps``; default one interval per epoch). ``config`` goes to :class:`SFTConfig` (schedule,
    warmup, weight decay, seed, max_length, ...). Nothing is saved: the caller saves the model it keeps."""
    if (epochs is None) == (max_steps is None):
        raise ValueError("give epochs or max_steps")
    steps_per_epoch = -(-len(records) // batch_size)
    defaults = dict(save_strategy="no", report_to="none", disable_tqdm=True, max_length=256)
    args = SFTConfig(output_dir=output_dir, per_device_train_batch_size=batch_size, learning_rate=learning_rate,
                     num_train_epochs=epochs if epochs is not None else 1, max_steps=max_steps if max_steps else -1,
                     logging_steps=logging_steps or steps_per_epoch, logging_first_step=logging_first_step,
                     **{**defaults, **config})
    trainer = SFTTrainer(model=model, args=args, train_dataset=list(records), processing_class=tokenizer)
    trainer.train()
    model.eval()
    return [h["loss/sft"] for h in trainer.state.log_history if "loss/sft" in h]


def sft_records(problems, field_name: str = "solution") -> list[dict]:
    """Problems with a gold ``solution`` -> SFT records (``prompt``, ``response``)."""
    return [{"prompt": p["prompt"], "response": p[field_name]} for p in problems]


def rft_records(verified_rows, per_prompt: int | None = None) -> list[dict]:
    """Rejection-sampling fine-tuning data: the distinct verified-correct completions of each prompt
    (at most ``per_prompt``) as SFT records. ``verified_rows`` come from
    :func:`alignkit.negatives.verify_rollouts`."""
    return [
        {"prompt": row["prompt"], "response": c["text"]}
        for row in verified_rows
        for c in distinct_completions(c for c in row["completions"] if c.get("correct"))[:per_prompt]
    ]
