"""The demo pipeline end to end, in its reduced configuration (tiny budgets: the numbers mean nothing here)."""

import json
import shutil
from dataclasses import asdict

import pytest

from derta.cli.main import main
from derta.eval.stats import with_interval
from derta.recipes.demo.config import DemoConfig
from derta.recipes.demo.pipeline import run_demo, same_run
from derta.recipes.demo.report import demo_checks


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--out", str(out), "--reduced"]) == 0
    return out


def test_demo_writes_reports_plots_and_models(demo_dir):
    report = json.loads((demo_dir / "report.json").read_text())
    stages = json.loads((demo_dir / "timing.json").read_text())["stages_s"]
    assert {"base model", "train vanilla", "train derta", "evaluate base", "evaluate derta"} <= set(stages)
    assert all(isinstance(t, float) and t >= 0 for t in stages.values())
    assert set(report["recipes"]) == {"vanilla", "prefix", "rto", "derta", "derta-tokens"}
    for m in [*report["recipes"].values(), report["base"]]:
        for key in ("refusal_rate", "helpfulness", "over_refusal"):
            assert 0.0 <= m[key] <= 1.0
        assert set(m["prefill_asr"]) == {"0.25", "0.5", "0.75"}
        assert all(0.0 <= v <= 1.0 for v in m["prefill_asr"].values())
        curve = m["probe_curve"]
        assert len(curve) >= 5 and curve[0]["position_frac"] == 0.0 and curve[-1]["position_frac"] == 1.0
    assert set(report["checks"]) >= {
        "bias_reproduced",
        "derta_resists_prefill",
        "derta_curve_above_vanilla",
        "tokens_refuse_at_calibrated_threshold",
        "tokens_calibration_curve_monotone",
    }
    # The refusal-token recipe: calibrated on its own split, evaluated at those thresholds, and its dial.
    tokens = report["recipes"]["derta-tokens"]
    cal = json.loads((demo_dir / tokens["calibration"]["plot"]).with_name("calibration.json").read_text())
    assert tokens["calibration"]["thresholds"] == cal["thresholds"] and cal["monotone"]
    assert [p["max_over_refusal"] for p in tokens["dial"]] == [None, 0.0, 0.5, 1.0]
    assert all(0.0 <= p[k] <= 1.0 for p in tokens["dial"] for k in ("refusal", "over_refusal", "fired_lookalike"))
    assert tokens["dial"][-1]["fired_lookalike"] == 1.0  # thresholds at 0 fire on every look-alike
    calibration = {
        json.loads(line)["instruction"]
        for f in data_files(demo_dir, "calibration_*.jsonl")
        for line in f.read_text().splitlines()
    }
    assert calibration and not calibration & (
        split_prompts(demo_dir, "*_train.jsonl") | split_prompts(demo_dir, "*_test.jsonl")
    )
    md = (demo_dir / "report.md").read_text()
    assert "| Vanilla |" in md and "| DeRTa (prefix + RTO) |" in md and "Prefill ASR 50%" in md
    assert "## Refusal tokens" in md and "| DeRTa + refusal tokens (calibrated) |" in md
    # The rates again with 95 % intervals: a refusal rate of the 'reduced' harmful split, e.g. "100.0 (84-100)".
    report = json.loads((demo_dir / "report.json").read_text())
    vanilla, n = report["recipes"]["vanilla"], report["recipes"]["vanilla"]["n"]["harmful"]
    row = next(line for line in md.split("95 % intervals", 1)[1].splitlines() if line.startswith("| Vanilla |"))
    assert row.split(" | ")[1] == with_interval(vanilla["refusal_rate"], n) and "(" in row
    for png in ("probe_curve.png", "prefill_asr.png", "dial.png", "calibration/derta-tokens/calibration.png"):
        assert (demo_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("base", "vanilla", "prefix", "rto", "derta", "derta-tokens"):
        model_dir = demo_dir / "models" / name
        assert (model_dir / "model.safetensors").exists() and not list(model_dir.glob("checkpoint-*"))
    # Every evaluation split is held out from every training split.
    data = demo_dir / "data"
    train = {json.loads(line)["instruction"] for f in data.glob("*_train.jsonl") for line in f.read_text().splitlines()}
    test = {json.loads(line)["instruction"] for f in data.glob("*_test.jsonl") for line in f.read_text().splitlines()}
    assert train and test and not (train & test)


def data_files(demo_dir, pattern):
    return sorted((demo_dir / "data").glob(pattern))


def split_prompts(demo_dir, pattern):
    return {
        json.loads(line)["instruction"] for f in data_files(demo_dir, pattern) for line in f.read_text().splitlines()
    }


def test_demo_is_deterministic_and_resumable(demo_dir, tmp_path):
    first = (demo_dir / "report.json").read_text()
    # Rerun into the same directory: everything is reused, the report is the same.
    assert main(["demo", "--out", str(demo_dir), "--reduced"]) == 0
    assert (demo_dir / "report.json").read_text() == first
    # Interrupted after training but before evaluating DeRTa: the rerun finishes the job identically.
    (demo_dir / "eval" / "derta.json").unlink()
    (demo_dir / "report.json").unlink()
    assert main(["demo", "--out", str(demo_dir), "--reduced"]) == 0
    assert (demo_dir / "report.json").read_text() == first
    # A fresh run with the same seed gives the same report.
    fresh = tmp_path / "again"
    run_demo(fresh, DemoConfig.reduced(), progress=False)
    assert (fresh / "report.json").read_text() == first


def test_demo_refuses_a_directory_made_with_other_settings(demo_dir, capsys):
    assert main(["demo", "--out", str(demo_dir), "--reduced", "--seed", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0]


def test_a_rerun_with_other_recipes_trains_only_the_new_ones(demo_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(demo_dir, run)
    first = json.loads((run / "report.json").read_text())["recipes"]
    trained = (run / "models" / "derta" / "model.safetensors").stat().st_mtime_ns
    assert main(["demo", "--out", str(run), "--reduced", "--recipes", "derta,derta-cliff,derta-random"]) == 0
    again = json.loads((run / "report.json").read_text())["recipes"]
    assert list(again) == ["derta", "derta-cliff", "derta-random"] and again["derta"] == first["derta"]
    assert (run / "models" / "derta" / "model.safetensors").stat().st_mtime_ns == trained
    # The subset recipes train on a tenth of the safety triples (prefix + RTO rows each), all the helpful rows.
    triples = len((run / "data" / "harmful_train.jsonl").read_text().splitlines())
    selection = json.loads((run / "cliff" / "derta-cliff.json").read_text())
    assert selection["n"] == triples and selection["kept"] == -(-triples // 10)
    assert selection["mean_kept_cliff"] >= selection["mean_cliff"]
    for name in ("derta-cliff", "derta-random"):
        rows = [json.loads(r) for r in (run / "models" / f"{name}.train.jsonl").read_text().splitlines()]
        assert sum(r["kind"] == "prefix" for r in rows) == sum(r["kind"] == "rto" for r in rows) == selection["kept"]
    # The recorded settings now name the recipes of the last run; the others still make it another run.
    assert json.loads((run / "demo_config.json").read_text())["recipes"] == ["derta", "derta-cliff", "derta-random"]
    recorded, now = (
        json.loads((run / "demo_config.json").read_text()),
        json.loads(json.dumps(asdict(DemoConfig.reduced()))),
    )
    assert same_run(recorded, now) and not same_run({**recorded, "tune_steps": 1}, now)
    # The trunk cache's budget changes speed, not results; a run recorded before it existed is the same run.
    assert same_run({**recorded, "trunk_cache_gb": 0.0}, now)
    assert same_run({k: v for k, v in recorded.items() if k != "trunk_cache_gb"}, now)
    # A run recorded before cpu_bf16 existed ran in float32.
    del recorded["cpu_bf16"]
    assert same_run(recorded, {**now, "cpu_bf16": "off"}) and not same_run(recorded, {**now, "cpu_bf16": "on"})
    # Circuit Breakers' warm-up is the run's only once the directory holds a Circuit Breakers model.
    warm = {**now, "cpu_bf16": "off", "cb_warmup_steps": 70}
    assert same_run(recorded, warm, run)
    (run / "models" / "circuit-breakers").mkdir(parents=True)
    assert not same_run(recorded, warm, run) and same_run(recorded, {**warm, "cb_warmup_steps": 0}, run)


def test_checks_follow_the_numbers():
    def curve(p):
        return [{"position_frac": f / 4, "refusal_prob": p if f else 0.9} for f in range(5)]

    good = {
        "refusal_rate": 1.0,
        "prefill_asr_mean": 0.0,
        "helpfulness": 0.9,
        "over_refusal": 0.0,
        "probe_curve": curve(0.9),
    }
    biased = {
        "refusal_rate": 1.0,
        "prefill_asr_mean": 1.0,
        "helpfulness": 0.9,
        "over_refusal": 0.0,
        "probe_curve": curve(0.0),
    }
    assert all(demo_checks({"vanilla": biased, "derta": good}).values())
    checks = demo_checks({"vanilla": biased, "derta": dict(good, over_refusal=0.3)})
    assert checks["derta_low_over_refusal"] is False and checks["bias_reproduced"] is True
    assert demo_checks({"vanilla": good, "derta": good})["bias_reproduced"] is False


def test_real_model_checks_hold_derta_to_the_xstest_targets():
    def curve(p):
        return [{"position_frac": f / 4, "refusal_prob": p if f else 0.9} for f in range(5)]

    good = {
        "refusal_rate": 1.0,
        "prefill_asr_mean": 0.0,
        "helpfulness": 0.9,
        "over_refusal": 0.0,
        "probe_curve": curve(0.9),
    }
    biased = {
        "refusal_rate": 1.0,
        "prefill_asr_mean": 1.0,
        "helpfulness": 0.9,
        "over_refusal": 0.0,
        "probe_curve": curve(0.0),
    }

    def xstest(safe, unsafe):
        return {"overrefusal": {"safe_refusal": safe, "unsafe_refusal": unsafe}}

    assert all(demo_checks({"vanilla": biased, "derta": {**good, **xstest(0.1, 0.85)}}, real=True).values())
    checks = demo_checks({"vanilla": biased, "derta": {**good, **xstest(0.2, 0.7)}}, real=True)
    assert checks["derta_answers_safe_prompts"] is False and checks["derta_refuses_unsafe_prompts"] is False
    assert "derta_answers_safe_prompts" not in demo_checks({"vanilla": biased, "derta": good}, real=True)
    assert "derta_answers_safe_prompts" not in demo_checks({"vanilla": biased, "derta": {**good, **xstest(0.2, 0.7)}})


def test_real_prompt_checks_follow_the_targets():
    from derta.recipes.demo.report import real_checks

    def model(none, prefill, own20, past, helpfulness=0.9):
        real = {
            "donotanswer": {"asr": {"none": none, "completion": none, "prefill": prefill}},
            "donotanswer_own_prefix": {"asr": {"prefill-tokens:20": own20}},
            "past_tense": {"asr": {"none": past}},
        }
        return {"real": real, "eval": {"none": none, "prefill": prefill}, "helpfulness": helpfulness}

    vanilla, derta = model(0.5, 0.9, 0.8, 0.7), model(0.05, 0.05, 0.05, 0.2, helpfulness=0.88)
    assert all(real_checks(vanilla, derta).values())
    checks = real_checks(model(0.5, 0.3, 0.3, 0.7), model(0.2, 0.3, 0.15, 0.3, helpfulness=0.8))
    assert not any(checks.values())  # no bias to start from, and DeRTa over every target
    assert checks.keys() == real_checks(vanilla, derta).keys()


def test_which_method_wins_where_follows_the_numbers():
    from derta.recipes.demo.report import winners_markdown

    def m(refusal, prefill, helpful, over):
        return {
            "refusal_rate": refusal,
            "prefill_asr": {"0.5": prefill},
            "prefill_asr_mean": prefill,
            "helpfulness": helpful,
            "over_refusal": over,
        }

    results = {
        "vanilla": m(1.0, 1.0, 0.83, 0.0),
        "derta": m(1.0, 0.0, 0.82, 0.0),
        "dpo": m(0.9, 0.9, 0.83, 0.05),
        "recovery": m(1.0, 0.0, 0.80, 0.1),
    }
    lines = winners_markdown(results, ["0.5"])
    assert lines[0] == "## Which method wins where"
    prefill = next(line for line in lines if line.startswith("- **Prefill 50%**"))
    assert "DeRTa (prefix + RTO), Recovery (Qi et al.) at 0.0 %" in prefill and "(worst: Vanilla, 100.0 %)" in prefill
    assert "Recovery (Qi et al.): helpfulness 80.0 (best 83.0), over-refusal 10.0 (best 0.0)" in prefill
    plain = next(line for line in lines if line.startswith("- **Plain harmful request"))
    assert "Vanilla, DeRTa (prefix + RTO), Recovery (Qi et al.) at 0.0 %" in plain and "worst: DPO, 10.0 %" in plain
    assert winners_markdown({"vanilla": results["vanilla"]}, ["0.5"]) == []
    tie = winners_markdown({"vanilla": results["vanilla"], "dpo": results["vanilla"]}, ["0.5"])
    assert "- **Prefill 50%**: no winner, every recipe at 100.0 %." in tie


def test_demo_runs_the_baselines_as_recipes(tmp_path):
    out = tmp_path / "baselines"
    assert main(["demo", "--out", str(out), "--reduced", "--recipes", "vanilla,dpo,recovery"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["recipes"]) == ["vanilla", "dpo", "recovery"]
    assert json.loads((out / "models" / "dpo" / "derta_train.json").read_text())["trainer"] == "dpo"
    md = (out / "report.md").read_text()
    assert "| DPO |" in md and "| Recovery (Qi et al.) |" in md and "## Which method wins where" in md
    assert "- **Prefill 50%**:" in md


def test_demo_and_eval_give_the_same_prefill_asr(demo_dir, tmp_path):
    # One meaning of ASR: the demo's prefill ASR is `derta eval`'s keyword-judge ASR on the same model and prompts.
    from derta.eval.safety import EvalConfig, run_eval

    report = json.loads((demo_dir / "report.json").read_text())
    cfg = DemoConfig.reduced()
    for recipe in ("vanilla", "derta"):
        attacks = [f"prefill-frac:{f}" for f in cfg.prefill_fractions]
        summary = run_eval(
            EvalConfig(
                tmp_path / recipe,
                str(demo_dir / "data" / "harmful_test.jsonl"),
                attacks,
                "keyword",
                model=str(demo_dir / "models" / recipe),
                max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.eval_batch_size,
            ),
            progress=False,
        )
        demo = report["recipes"][recipe]["prefill_asr"]
        not_refused = report["recipes"][recipe]["prefill_not_refused"]
        assert all(demo[f] <= not_refused[f] for f in demo)  # harmful text is a part of what does not refuse
        assert {str(f): summary["asr"][f"prefill-frac:{f}"] for f in cfg.prefill_fractions} == {
            f: round(v, 4) for f, v in demo.items()
        }
