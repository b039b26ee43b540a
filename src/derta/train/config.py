"""derta train's settings: `DertaConfig` (TrainingArguments plus DeRTa's), from a YAML file and the flags.

Every numeric setting is range-checked with the flag's name whether it came from a flag or the YAML, and a
YAML key that is unknown or of the wrong type is one line naming the file and line. The YAML is read without
aliases (`*name`: a few hundred bytes of them expand to megabytes) and refuses a key given twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import yaml
from transformers import TrainingArguments

from derta.inference.shard import launched_processes
from derta.io import NUMERIC_RULES, InputError, check_number, read_text
from derta.models.precision import CPU_BF16_CHOICES
from derta.train.defaults import CLI_TO_CONFIG, FULL_FT_LR, LORA_LR
from derta.train.defaults import DEFAULTS as D


@dataclass
class DertaConfig(TrainingArguments):
    """`TrainingArguments` plus what DeRTa needs, so accelerate, DeepSpeed, FSDP and bf16 work unchanged (their
    settings go in the YAML config). Paper defaults where the paper gives them (`defaults.DEFAULTS`)."""

    learning_rate: float = field(
        default=D["learning_rate"], metadata={"help": f"{FULL_FT_LR} full fine-tuning, {LORA_LR} LoRA (paper)"}
    )
    num_train_epochs: float = D["num_train_epochs"]
    per_device_train_batch_size: int = D["per_device_train_batch_size"]
    gradient_accumulation_steps: int = D["gradient_accumulation_steps"]
    lr_scheduler_type: str = D["lr_scheduler_type"]
    warmup_steps: float = D["warmup_steps"]
    logging_steps: float = D["logging_steps"]
    save_steps: float = D["save_steps"]
    save_total_limit: int | None = D["save_total_limit"]
    seed: int = D["seed"]
    report_to: str | list[str] | None = "none"
    remove_unused_columns: bool = False
    # DeRTa
    max_length: int = field(default=D["max_length"], metadata={"help": "rows are truncated to this many tokens"})
    template: str = field(
        default=D["template"], metadata={"help": "prompt format for text rows: auto|chat|inst|raw|format string"}
    )
    refusal_phrase: str = D["refusal_phrase"]
    # None: what each row carries from `data build` (else 1.0); a value overrides every RTO row.
    rto_keep_ratio: float | None = field(
        default=None, metadata={"help": "share of each RTO row's positions trained, re-drawn every epoch"}
    )
    rto_weight: float | None = field(default=None, metadata={"help": "loss weight of RTO tokens"})
    loss_impl: str = field(
        default="chunked", metadata={"help": "chunked (labelled positions only) | full (all logits)"}
    )
    padding_free: bool = field(
        default=True, metadata={"help": "pack each batch into one sequence (else pad, length-grouped)"}
    )
    cpu_bf16: str = field(
        default="auto",
        metadata={"help": "bf16 autocast on the CPU: auto (when the CPU has AVX512-BF16 or AMX) | on | off (float32)"},
    )
    trunk_cache_gb: float = field(
        default=D["trunk_cache_gb"],
        metadata={
            "help": "memory for the frozen layers' hidden states, kept per row and reused when only the top layers "
            "train (train.trunk); 0: off"
        },
    )
    row_attention: bool = field(
        default=D["row_attention"],
        metadata={
            "help": "with packing on sdpa: attention runs once per packed row, causal, instead of over the whole "
            "packed sequence under a block mask (train.attention); false: transformers' sdpa"
        },
    )
    allow_nonfinite_loss: bool = field(
        default=False,
        metadata={"help": "go on when the loss is NaN or infinite (default: stop with an error, no model saved)"},
    )
    # LoRA (peft)
    use_lora: bool = False
    lora_r: int = D["lora_r"]
    lora_alpha: int = D["lora_alpha"]
    lora_dropout: float = D["lora_dropout"]
    lora_target_modules: str = D["lora_target_modules"]
    lora_layers: int | None = field(
        default=None,
        metadata={"help": "LoRA on the top N decoder layers only: no backward through the layers below (CPU runs)"},
    )
    merge_lora: bool = False
    # Qi et al.'s token-wise constrained objective (docs/baselines.md): stay close to this model on the first tokens.
    constrain_to: str | None = field(
        default=None,
        metadata={
            "help": "reference model of the token-wise constrained objective (Qi et al.); None: plain cross-entropy"
        },
    )
    constraint_beta: float = field(
        default=D["constraint_beta"],
        metadata={
            "help": "beta of the constrained objective; the first token gets 5x, tokens 2-5 20x (Qi et al.'s schedule)"
        },
    )
    # DPO (rows from `data build --recipe dpo`), trained with TRL's DPOTrainer
    dpo_beta: float = field(default=D["dpo_beta"], metadata={"help": "DPO's beta (strength of the KL term)"})
    dpo_sft_weight: float = field(
        default=D["dpo_sft_weight"],
        metadata={
            "help": "weight of the SFT (NLL of chosen) term "
            "added to DPO's loss; helpful rows are trained only through it"
        },
    )
    # Circuit Breakers (rows from `data build --recipe circuit-breakers`, with --lora), trained by train.circuit
    cb_alpha: float = field(
        default=D["cb_alpha"],
        metadata={"help": "scale of the schedule: rerouting weight alpha(1 - t/2T), retain weight alpha t/2T"},
    )
    cb_layers: str = field(
        default=D["cb_layers"],
        metadata={
            "help": "comma-separated layers whose hidden states are rerouted (1 = first layer's output); auto (the "
            "paper's depths) or top:N (those depths within the top N layers)"
        },
    )
    cb_skip_massive: float = field(
        default=D["cb_skip_massive"],
        metadata={
            "help": "rerouting cosine without the dimensions whose RMS exceeds this many times the median's "
            "(massive activations; train.circuit); 0: every dimension, as the paper"
        },
    )
    cb_warmup_steps: int = field(
        default=D["cb_warmup_steps"],
        metadata={
            "help": "optimizer steps of rerouting alone before the retain loss enters the schedule "
            "(train.circuit: large hidden states); 0: the paper's schedule"
        },
    )


# Every numeric setting's flag and range rule (io.NUMERIC_RULES), checked whether it came from a flag or the
# YAML: Trainer would take -5 steps as "one epoch" without a word.
_SETTING_RULES = {
    field: ("--" + dest.replace("_", "-"), NUMERIC_RULES[dest])
    for dest, field in CLI_TO_CONFIG.items()
    if dest in NUMERIC_RULES
}


def check_ranges(config: DertaConfig, explicit: set[str], source=None) -> None:
    """One line naming the flag for a setting out of range (NaN and infinities included)."""

    for name, (flag, rule) in _SETTING_RULES.items():
        if name == "max_steps" and name not in explicit:
            continue  # Trainer's own default, -1: "use the epochs"
        check_number(getattr(config, name), flag, rule, source)
    if not config.refusal_phrase.strip():
        raise InputError("--refusal-phrase must not be empty", source)


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader without aliases and with unique keys (what derta reads every YAML file with)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in derta configs", mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key '{key}' is given twice (first on line {seen[key]})", key_node.start_mark
                    )
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_yaml(path) -> tuple[object, dict]:
    """A YAML file read with `StrictLoader`, and the line of each top-level key; errors name the file and line."""
    text = read_text(path, "config file")
    try:
        return yaml.load(text, Loader=StrictLoader), _yaml_lines(text)  # noqa: S506 (StrictLoader is a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        kind = "syntax error" if isinstance(e, (yaml.scanner.ScannerError, yaml.parser.ParserError)) else "error"
        raise InputError(f"YAML {kind}: {what}", path, mark.line + 1 if mark else None) from None
    except (RecursionError, ValueError) as e:  # nesting deeper than the stack; an integer of thousands of digits
        what = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())[:120]
        raise InputError(f"YAML that cannot be read: {what}", path) from None


def _yaml_lines(text: str) -> dict:
    """Line number of each top-level key of a YAML mapping."""
    node = yaml.compose(text, Loader=StrictLoader)
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def _wrong_type(f, value) -> str | None:
    """What a YAML value for field `f` should be, when it is not (None when it fits or the type is not simple)."""
    names = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}
    spec = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    kinds = {t.strip() for t in spec.replace("Optional[", "").replace("]", "").split("|")}
    if kinds - {"None", *names}:
        return None  # lists, dicts, enums: TrainingArguments checks those itself
    want = " or ".join(names[k] for k in sorted(kinds - {"None"}))
    if value is None:
        return None if "None" in kinds else want
    if isinstance(value, bool):
        return None if "bool" in kinds else want
    if isinstance(value, int) and kinds & {"int", "float"} or isinstance(value, float) and "float" in kinds:
        return None
    return None if isinstance(value, str) and "str" in kinds else want


def check_report_to(report_to, source=None) -> None:
    """Each logging integration named in report_to must be one transformers knows and whose library is installed:
    Trainer would otherwise fail after the model has loaded."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise InputError(
                f"report_to: unknown integration '{name}': use none or one of {', '.join(INTEGRATION_TO_CALLBACK)}",
                source,
            )
        if name not in get_available_reporting_integrations():
            raise InputError(f"report_to: {name} is not installed (pip install it, or set report_to: none)", source)


def config_from_cli(args) -> DertaConfig:
    """YAML first, then explicit flags on top."""
    values: dict = {}
    if args.config:
        loaded, lines = load_yaml(args.config)
        if not isinstance(loaded, dict):
            raise InputError("config must be a mapping of field: value", args.config)
        known = {f.name: f for f in fields(DertaConfig)}
        for key, value in loaded.items():
            if key not in known:
                raise InputError(f"unknown config field '{key}'", args.config, lines.get(key))
            if (want := _wrong_type(known[key], value)) is not None:
                raise InputError(
                    f"{key} must be {want}, not {type(value).__name__} {value!r}", args.config, lines.get(key)
                )
        values.update(loaded)
    for flag, name in CLI_TO_CONFIG.items():
        if getattr(args, flag, None) is not None:
            values[name] = getattr(args, flag)
    if getattr(args, "row_attention", None) is not None:
        values["row_attention"] = args.row_attention == "on"
    if args.max_steps is not None:
        values["num_train_epochs"] = 1  # ignored by Trainer when max_steps > 0
    if args.lora:
        values["use_lora"] = True
        values.setdefault("learning_rate", LORA_LR)
    if args.merge:
        if not values.get("use_lora"):
            raise InputError("--merge only applies with --lora")
        values["merge_lora"] = True
    if args.bf16:
        values["bf16"] = True
    # The CLI keeps transformers' logger at error level, from which TrainingArguments would infer disable_tqdm:
    # say it outright, so a run shows Trainer's progress bar (with ETA) and its loss lines unless --quiet.
    values["disable_tqdm"] = True if args.quiet else values.get("disable_tqdm", False)
    values["output_dir"] = args.out

    if launched_processes() == "cpu":
        values.setdefault("use_cpu", True)  # several CPU processes (gloo): without it each would train alone
    try:
        config = DertaConfig(**values)
    except (TypeError, ValueError) as e:
        raise InputError(f"bad training setting: {str(e).splitlines()[0]}", args.config) from None
    except ImportError as e:  # e.g. a deepspeed config without deepspeed installed
        raise InputError(
            f"the config needs a package that is not installed: {str(e).splitlines()[0]}", args.config
        ) from None
    if config.loss_impl not in ("chunked", "full"):
        raise InputError(f"unknown loss_impl '{config.loss_impl}': use chunked or full", args.config)
    if config.cpu_bf16 not in CPU_BF16_CHOICES:
        raise InputError(f"unknown cpu_bf16 '{config.cpu_bf16}': use {' | '.join(CPU_BF16_CHOICES)}", args.config)
    check_report_to(config.report_to, args.config)
    check_ranges(config, set(values), args.config)
    return config
