"""Post-training: classification fine-tuning, instruction tuning (SFT) and DPO, on the pretraining Trainer.

    from minillm.finetune import FinetuneConfig, finetune, load_finetuned, load_language_model
    gpt, tokenizer = load_language_model("runs/pydoc")
    finetune(gpt, tokenizer, FinetuneConfig("classify", "sms.tsv", balance=True), {"lr": 5e-4}, "runs/spam")

``classify.py`` the classifier head and its data; ``sft.py`` the Alpaca prompt
and the collate with its masks; ``dpo.py`` the preference loss, rewards and
metrics; ``data.py`` reading, balancing, splitting and batching by epoch;
``run.py`` puts a task together on ``minillm.train.Trainer`` and reads runs
back. LoRA is ``minillm.nn.lora``. The derivations are in docs/finetuning.md.
"""

from .classify import GPTClassifier, accuracy, collate_classification, set_trainable
from .data import DataError, EpochBatches, balance, read_labelled, read_records, split_indices
from .dpo import DPOObjective, dpo_loss, reward_accuracy, sequence_log_probs
from .run import FinetuneConfig, FinetuneResult, finetune, load_finetuned, load_language_model
from .sft import collate_instructions, format_prompt

__all__ = [
    "GPTClassifier", "accuracy", "collate_classification", "set_trainable", "DataError", "EpochBatches",
    "balance", "read_labelled", "read_records", "split_indices", "DPOObjective", "dpo_loss",
    "reward_accuracy", "sequence_log_probs", "FinetuneConfig", "FinetuneResult", "finetune",
    "load_finetuned", "load_language_model", "collate_instructions", "format_prompt",
]
