"""A thin transformers.Trainer subclass: token-weighted evaluation, nothing else re-invented."""
from __future__ import annotations

from transformers import Trainer

from archtune.train.evaluation import token_weighted_loss


class ArchtuneTrainer(Trainer):
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        result = token_weighted_loss(self.model, dataset, self.data_collator,
                                     self.args.per_device_eval_batch_size, self.args.device)
        metrics = {f"{metric_key_prefix}_loss": result["eval_loss"],
                   f"{metric_key_prefix}_tokens": result["eval_tokens"]}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
