"""The shipped scale-out configs parse into a DertaConfig and the accelerate plugins Trainer would build.

The runs themselves need GPUs (8B full fine-tuning with DeepSpeed ZeRO-3, 70B LoRA with FSDP or
ZeRO-3); here each config goes through `derta train`'s own parsing on CPU, and the plugin objects
are built from it as Trainer builds them.
"""

from pathlib import Path

import pytest

from derta.cli.main import build_parser
from derta.train.config import config_from_cli
from derta.train.defaults import FULL_FT_LR, LORA_LR

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def on_cpu(path, tmp_path, drop=()):
    """A copy of the config with `use_cpu: true` (TrainingArguments refuses bf16 on a machine without a GPU)."""
    import yaml

    settings = yaml.safe_load(Path(path).read_text())
    for key in drop:
        settings.pop(key)
    copy = tmp_path / f"cpu_{Path(path).name}"
    copy.write_text(yaml.safe_dump({**settings, "use_cpu": True}))
    return copy


def parse(path, tmp_path, *extra):
    args = build_parser().parse_args(
        [
            "train",
            "--config",
            str(on_cpu(path, tmp_path)),
            "--model",
            "m",
            "--data",
            "d.jsonl",
            "--output",
            str(tmp_path / "out"),
            *extra,
        ]
    )
    return config_from_cli(args)


def test_every_shipped_config_is_tested():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == [
        "cpu_small.yaml",
        "full_ft_8b_zero3.yaml",
        "lora_1gpu.yaml",
        "lora_70b_fsdp.yaml",
        "lora_70b_zero3.yaml",
    ]


def test_one_gpu_config_is_the_papers_lora_run_on_one_device(tmp_path):
    config = parse(CONFIGS / "lora_1gpu.yaml", tmp_path)
    assert config.use_lora and config.bf16 and config.activation_checkpointing and config.learning_rate == LORA_LR
    assert (config.lora_r, config.lora_alpha, config.lora_dropout) == (96, 16, 0.05)
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps == 128  # on one GPU
    assert config.deepspeed is None and not config.fsdp


def test_cpu_config_trains_the_tiny_model(tiny_dir, synthetic, tmp_path):
    """The CPU config as shipped (flags override its layer count and steps for the 4-layer tiny model)."""
    import json

    from derta.cli.main import main

    safety = tmp_path / "safety.jsonl"
    safety.write_text("".join(json.dumps(t) + "\n" for t in synthetic.harmful_train[:8]))
    rows = tmp_path / "mix.jsonl"
    assert main(["data", "build", "--recipe", "derta", "--safety", str(safety), "--out", str(rows)]) == 0
    config = CONFIGS / "cpu_small.yaml"
    argv = [
        "train",
        "--config",
        str(config),
        "--model",
        str(tiny_dir),
        "--data",
        str(rows),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--lora-layers", "2", "--max-steps", "2", "--quiet"]) == 0
    log = json.loads((tmp_path / "o" / "derta_train.json").read_text())
    assert log["steps"] == 2 and log["config"]["use_lora"] and log["config"]["lora_r"] == 16
    assert log["config"]["use_cpu"] and log["config"]["max_length"] == 192


def deepspeed_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


ZERO3 = [("full_ft_8b_zero3.yaml", False), ("lora_70b_zero3.yaml", True)]


@pytest.mark.parametrize("name, lora", ZERO3)
def test_zero3_configs_parse_and_build_the_deepspeed_plugin(name, lora, tmp_path, capsys):
    """Without deepspeed (CI): one error line naming it; everything else, and accelerate's DeepSpeedPlugin, is built."""
    import yaml
    from accelerate.utils import DeepSpeedPlugin

    if deepspeed_installed():
        pytest.skip("deepspeed is installed: test_zero3_configs_with_deepspeed covers the whole path")
    from derta.cli.main import main

    assert (
        main(
            [
                "train",
                "--config",
                str(on_cpu(CONFIGS / name, tmp_path)),
                "--model",
                "m",
                "--data",
                "d.jsonl",
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a package that is not installed" in err[0] and "deepspeed" in err[0], err
    ds = yaml.safe_load((CONFIGS / name).read_text())["deepspeed"]
    config = parse(on_cpu(CONFIGS / name, tmp_path, drop=["deepspeed"]), tmp_path)
    assert config.bf16 and config.activation_checkpointing and config.use_lora is lora
    assert config.learning_rate == (LORA_LR if lora else FULL_FT_LR)
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps * 8 == 128  # on 8 GPUs
    plugin = DeepSpeedPlugin(hf_ds_config=ds)
    assert plugin.zero_stage == 3 and plugin.hf_ds_config.is_zero3()
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["bf16"]["enabled"] == "auto" and ds["train_micro_batch_size_per_gpu"] == "auto"


@pytest.mark.parametrize("name, lora", ZERO3)
def test_zero3_configs_with_deepspeed(name, lora, tmp_path):
    from accelerate.utils import DeepSpeedPlugin

    if not deepspeed_installed():
        pytest.skip("deepspeed is not installed (pip install deepspeed; GPU machines)")
    config = parse(CONFIGS / name, tmp_path)
    assert config.bf16 and config.activation_checkpointing and config.use_lora is lora
    assert isinstance(config.deepspeed_plugin, DeepSpeedPlugin) and config.deepspeed_plugin.zero_stage == 3
    ds = config.hf_deepspeed_config.config
    # The "auto" values are filled from the training settings, as the run would see them.
    assert ds["train_micro_batch_size_per_gpu"] == config.per_device_train_batch_size
    assert ds["gradient_accumulation_steps"] == config.gradient_accumulation_steps
    assert ds["gradient_clipping"] == config.max_grad_norm and ds["bf16"]["enabled"] is True
    # Flags still override the file (e.g. --grad-accum for another number of GPUs).
    assert (
        parse(CONFIGS / name, tmp_path, "--grad-accum", "4").hf_deepspeed_config.config["gradient_accumulation_steps"]
        == 4
    )


def test_fsdp_lora_config_builds_the_fsdp_plugin(tmp_path):
    from accelerate.utils import FullyShardedDataParallelPlugin

    config = parse(CONFIGS / "lora_70b_fsdp.yaml", tmp_path)
    assert config.use_lora and config.bf16 and config.learning_rate == LORA_LR
    assert (config.lora_r, config.lora_alpha, config.lora_dropout) == (96, 16, 0.05)
    assert config.fsdp and config.deepspeed is None and config.loss_impl == "full"
    plugin = FullyShardedDataParallelPlugin(**config.fsdp_plugin_args)  # what Trainer builds from it
    assert plugin.fsdp_version == 2 and plugin.activation_checkpointing and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]


@pytest.mark.parametrize("name", ["lora_70b_fsdp.yaml"] + (["lora_70b_zero3.yaml"] if deepspeed_installed() else []))
def test_merge_is_refused_under_sharded_training(name, tmp_path, capsys):
    from derta.cli.main import main

    data = tmp_path / "d.jsonl"
    data.write_text('{"kind": "helpful", "instruction": "hi", "response": "hello"}\n')
    assert (
        main(
            [
                "train",
                "--config",
                str(on_cpu(CONFIGS / name, tmp_path)),
                "--model",
                "m",
                "--data",
                str(data),
                "--output",
                str(tmp_path / "out"),
                "--merge",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("derta: error: --merge needs the whole model in one process"), err
