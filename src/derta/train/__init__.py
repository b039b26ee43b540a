"""Training: a config dataclass and a thin Trainer subclass per method.

defaults.py    the paper's settings (DertaConfig's defaults) and derta train's flags, light to import
config.py      DertaConfig (TrainingArguments plus DeRTa's), from YAML and flags, range-checked
losses.py      the token-level loss: labelled positions only, RTO weighted, Qi et al.'s constraint
collators.py   padded and packed batches; RTO positions re-drawn every epoch
trainer.py     DertaTrainer and checkpoints that say when they are complete
trunk.py       the frozen layers' hidden states, kept per row and reused when only the top layers train
dpo.py         the DPO baseline on TRL's DPOTrainer
run.py         `derta train`: rows, model, LoRA, trainer, and the saved model with its log
"""
