"""`derta bench`: training and evaluation speed, measured side by side in one run.

Five comparisons, each new against old on the same model and data:

    loss        one training step (forward + backward) with the labelled-positions loss vs the
                full-logits loss: peak memory and time; each variant runs in a fresh subprocess
                so its peak memory is its own (CUDA max allocated on GPU, VmHWM - VmRSS on CPU)
    packing     training tokens/s with padding-free (packed) batches vs padded batches, on a
                length-skewed DeRTa-like mixture: short helpful rows, long RTO rows; packed rows under one
                block mask vs attended row by row (train.attention); float32 vs bf16 autocast where supported
    probe       derta.eval.probe's one teacher-forced pass vs probing by generation (one greedy step
                per response position, the same positions and probabilities)
    generation  HFBackend batched vs one prompt at a time (prompts/s); where the CPU does bf16 in hardware, batched
                float32 vs batched under bf16 autocast
    trunk       LoRA on the top layers (the top quarter, or --lora-layers): training tokens/s of an epoch after the
                first with the frozen layers recomputed vs their states kept from the first (train.trunk), and the
                kept one in float32 vs under bf16 autocast where the CPU does it (the real-model demo's path)

Writes OUT/bench.json (raw figures, ratios new ÷ old) and OUT/bench.md (a table).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from derta.data.synthetic import make_data
from derta.eval.probe import refusal_probabilities
from derta.inference.base import GenInput
from derta.inference.hf import HFBackend
from derta.io import NUMERIC_RULES, InputError, check_number, show_progress, write_json, write_text
from derta.models.loading import load_model, load_tokenizer
from derta.models.precision import resolve_cpu_bf16
from derta.models.refusal_tokens import REFUSAL_PHRASE, refusal_token_ids
from derta.models.templates import encode_prompt, encode_text, format_prompt, resolve_template
from derta.models.tiny import build_tiny, random_model
from derta.recipes.limit import limit, limit_markdown
from derta.recipes.throughput import packing_throughput, skewed_rows, to_device, trunk_throughput


@dataclass
class BenchConfig:
    model: str | None = None  # a checkpoint dir; default: build_tiny's architecture with `vocab` tokens
    vocab: int = 32000
    batch: int = 8
    seq: int = 1024
    steps: int = 3  # timed training steps per loss variant (the median is reported)
    pack_batches: int = 4  # batches of the skewed mixture per packing variant
    repeats: int = 2  # timed passes over them (the fastest counts)
    short: tuple[int, int] = (32, 96)  # helpful row lengths
    long: tuple[int, int] = (512, 1024)  # RTO row lengths
    prompts: int = 32  # generation prompts
    gen_batch: int = 16
    max_new_tokens: int = 32
    probe_pairs: int = 16
    lora_layers: int | None = None  # trunk part: LoRA on this many top layers (None: a quarter of them)
    seed: int = 0


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakMemory:
    """Peak memory above the starting point of a `with` block, in MB: CUDA max allocated, else RSS high-water mark."""

    def __init__(self, device):
        self.device, self.peak_mb = device, 0.0

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux), so the mark is this block's.
            Path("/proc/self/clear_refs").write_text("5")
            self.start = _rss_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _rss_kb("VmHWM") * 1024
        self.peak_mb = max(self.peak_mb, (peak - self.start) / 2**20)


def _load(cfg: BenchConfig, need_tokenizer: bool = False):
    """(model, tokenizer or None) on the best device, fp32 on CPU."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.model:
        return load_model(cfg.model, dtype="auto", device=device), load_tokenizer(cfg.model)
    if need_tokenizer:
        raise InputError("internal: the tokenizer-free bench model has no tokenizer")

    return random_model(cfg.vocab, max_positions=max(cfg.seq, cfg.long[1]), seed=cfg.seed).to(device), None


def loss_batch(cfg: BenchConfig, vocab: int) -> dict:
    """batch x seq random tokens, the first half of every row unlabelled (a prompt); odd rows are RTO rows."""
    import torch

    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(3, vocab, (cfg.batch, cfg.seq), generator=gen)
    labels = ids.clone()
    labels[:, : cfg.seq // 2] = -100
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "loss_weight": torch.tensor([1.0 if i % 2 == 0 else 0.5 for i in range(cfg.batch)]),
        "is_rto": torch.tensor([i % 2 == 1 for i in range(cfg.batch)]),
    }


def loss_step(cfg: BenchConfig, impl: str) -> dict:
    """Peak memory and time of a training step with one loss implementation (run in its own process)."""
    from derta.train.losses import batch_loss  # the training stack loads only when a step is timed

    model, _ = _load(cfg)
    model.train()
    device = next(model.parameters()).device
    batch = to_device(loss_batch(cfg, model.config.vocab_size), device)
    memory, times, loss = PeakMemory(device), [], None
    for _ in range(cfg.steps):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with memory:
            value, _ = batch_loss(model, batch, impl)
            value.backward()
        times.append(time.perf_counter() - start)
        loss = float(value.detach())
    return {
        "peak_memory_mb": round(memory.peak_mb, 1),
        "step_s": round(statistics.median(times), 4),
        "step_times_s": [round(t, 4) for t in times],
        "loss": loss,
    }


def _loss_step_subprocess(cfg: BenchConfig, impl: str) -> dict:
    """`loss_step` in a fresh Python, so one variant's freed memory cannot hide the other's peak."""
    code = (
        "import json, sys; from derta.recipes.bench import BenchConfig, loss_step; "
        "c = json.loads(sys.argv[1]); c['short'], c['long'] = tuple(c['short']), tuple(c['long']); "
        "print('BENCH ' + json.dumps(loss_step(BenchConfig(**c), sys.argv[2])))"
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(asdict(cfg)), impl], capture_output=True, text=True, env=env
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"loss bench ({impl}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(line[len("BENCH ") :])


def probe_pairs(cfg: BenchConfig) -> list[tuple[str, str]]:

    harmful = make_data(seed=cfg.seed).harmful_test
    return [
        (r["instruction"], r["harmful_response"]) for r in (harmful[i % len(harmful)] for i in range(cfg.probe_pairs))
    ]


def probe_vs_generation(cfg: BenchConfig, model, tokenizer) -> dict:
    """derta.probe's teacher-forced pass vs one greedy generation step per response position."""
    import torch

    pairs = probe_pairs(cfg)
    start = time.perf_counter()
    probed = refusal_probabilities(model, tokenizer, pairs, batch_size=cfg.gen_batch)
    probe_s = time.perf_counter() - start

    template = resolve_template(tokenizer, "auto")
    refusal = refusal_token_ids(tokenizer, REFUSAL_PHRASE)
    device = next(model.parameters()).device
    model.eval()
    generated, start = [], time.perf_counter()
    with torch.inference_mode():
        for instruction, response in pairs:
            prompt = encode_prompt(tokenizer, format_prompt(tokenizer, instruction, template), template)
            response_ids = encode_text(tokenizer, response)
            curve = []
            for k in range(len(response_ids) + 1):
                ids = torch.tensor([prompt + response_ids[:k]], device=device)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=1,
                    do_sample=False,
                    output_scores=True,
                    return_dict_in_generate=True,
                    pad_token_id=tokenizer.pad_token_id,
                )
                curve.append(float(torch.softmax(out.scores[0][0].float(), -1)[refusal].sum()))
            generated.append(curve)
    generation_s = time.perf_counter() - start
    positions = sum(len(c) for c in probed)
    diff = max(abs(a - b) for p, g in zip(probed, generated) for a, b in zip(p, g))
    return {
        "pairs": len(pairs),
        "positions": positions,
        "probe_s": round(probe_s, 3),
        "generation_s": round(generation_s, 3),
        "max_abs_probability_diff": diff,
    }


def generation_throughput(cfg: BenchConfig, model, tokenizer) -> dict:
    """HFBackend prompts/s, batched (longest first) vs one prompt at a time; greedy, so the same texts. Where the
    CPU does bf16 in hardware, batched under bf16 autocast too (`--cpu-bf16`), with its texts' agreement."""

    data_pairs = probe_pairs(BenchConfig(**{**asdict(cfg), "probe_pairs": cfg.prompts}))
    inputs = [GenInput(instruction) for instruction, _ in data_pairs][: cfg.prompts]
    variants = [("one_at_a_time", 1, "off"), ("batched", cfg.gen_batch, "off")]
    if resolve_cpu_bf16("auto", next(model.parameters()).device):
        variants.append(("batched_bf16", cfg.gen_batch, "on"))
    result, texts = {}, {}
    for name, batch_size, bf16 in variants:
        backend = HFBackend(model, tokenizer, batch_size=batch_size, max_new_tokens=cfg.max_new_tokens, cpu_bf16=bf16)
        start = time.perf_counter()
        texts[name] = backend.generate(inputs)
        seconds = time.perf_counter() - start
        result[name] = {
            "batch_size": batch_size,
            "seconds": round(seconds, 3),
            "prompts_per_s": round(len(inputs) / seconds, 3),
        }
    result["prompts"] = len(inputs)
    # Padding (and bf16's rounding) can flip a near-tie in greedy decoding, so agreement is reported, not assumed.
    for name, other in (("same_text_share", "one_at_a_time"), ("bf16_same_text_share", "batched_bf16")):
        if other in texts:
            result[name] = round(sum(a == b for a, b in zip(texts["batched"], texts[other])) / len(inputs), 3)
    return result


def _check(cfg: BenchConfig) -> None:
    for name in ("batch", "seq", "steps", "prompts", "probe_pairs", "pack_batches", "repeats"):
        check_number(getattr(cfg, name), "--" + name.replace("_", "-"), NUMERIC_RULES[name])
    if cfg.lora_layers is not None:
        check_number(cfg.lora_layers, "--lora-layers", NUMERIC_RULES["lora_layers"])
    if cfg.seq < 4:
        raise InputError("--seq must be at least 4 (half of each row is unlabelled)")
    if cfg.model and not Path(cfg.model).is_dir():
        raise InputError("--model must be a checkpoint directory", cfg.model)


def _text_model(cfg: BenchConfig, results: dict):
    """The model and tokenizer probing and generation are timed on: --model, else build_tiny's (2048-token BPE)."""
    if cfg.model:
        return _load(cfg, need_tokenizer=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny(Path(tmp) / "tiny", seed=cfg.seed)
        model, tokenizer = load_model(str(path)), load_tokenizer(str(path))
    results["text_model"] = "build_tiny (vocab 2048)"
    return model, tokenizer


def _ratios(results: dict) -> dict:
    """New ÷ old for each comparison."""
    loss, packing, generation, trunk = results["loss"], results["packing"], results["generation"], results["trunk"]
    return {
        "loss_peak_memory": round(loss["chunked"]["peak_memory_mb"] / max(loss["full"]["peak_memory_mb"], 1e-9), 3),
        "loss_step_time": round(loss["chunked"]["step_s"] / loss["full"]["step_s"], 3),
        "packing_tokens_per_s": round(packing["packed"]["tokens_per_s"] / packing["padded"]["tokens_per_s"], 3),
        "batched_generation": round(
            generation["batched"]["prompts_per_s"] / generation["one_at_a_time"]["prompts_per_s"], 3
        ),
        "probe_time": round(results["probe"]["probe_s"] / results["probe"]["generation_s"], 4),
        "trunk_cache_tokens_per_s": round(
            results["trunk"]["cached"]["tokens_per_s"] / results["trunk"]["recomputed"]["tokens_per_s"], 3
        ),
        **(
            {"row_attention_tokens_per_s": round(rows["tokens_per_s"] / packing["packed"]["tokens_per_s"], 3)}
            if (rows := packing.get("packed_rows"))
            else {}
        ),
        **(
            {
                "bf16_tokens_per_s": round(
                    packing["packed_bf16"]["tokens_per_s"] / packing[packing["bf16_versus"]]["tokens_per_s"], 3
                )
            }
            if "packed_bf16" in packing
            else {}
        ),
        **(
            {
                "trunk_bf16_tokens_per_s": round(
                    trunk["cached_bf16"]["tokens_per_s"] / trunk["cached"]["tokens_per_s"], 3
                )
            }
            if "cached_bf16" in trunk
            else {}
        ),
        **(
            {
                "bf16_generation": round(
                    generation["batched_bf16"]["prompts_per_s"] / generation["batched"]["prompts_per_s"], 3
                )
            }
            if "batched_bf16" in generation
            else {}
        ),
    }


def run_bench(cfg: BenchConfig, out: str | Path, progress: bool = True) -> dict:
    import torch

    _check(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=6, desc="bench", unit="part", disable=not show_progress(progress))
    results: dict = {
        "config": asdict(cfg),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "loss": {},
    }
    for impl in ("full", "chunked"):
        bar.set_postfix_str(f"loss {impl}")
        results["loss"][impl] = _loss_step_subprocess(cfg, impl)
        bar.update()
    bar.set_postfix_str("packing")
    model, _ = _load(cfg)
    results["packing"] = packing_throughput(cfg, model)
    bar.set_postfix_str("trunk cache")
    results["trunk"] = trunk_throughput(cfg, model)
    bar.set_postfix_str("machine peak")
    skewed = [
        (len(r["input_ids"]), sum(x != -100 for x in r["labels"][1:]))
        for r in skewed_rows(cfg, model.config.vocab_size)
    ]
    results["limit"] = limit(results, model, cfg.repeats, cfg.batch, cfg.seq, skewed)
    del model
    bar.update()
    bar.set_postfix_str("model with tokenizer")
    model, tokenizer = _text_model(cfg, results)
    bar.update()
    bar.set_postfix_str("probe")
    results["probe"] = probe_vs_generation(cfg, model, tokenizer)
    bar.update()
    bar.set_postfix_str("generation")
    results["generation"] = generation_throughput(cfg, model, tokenizer)
    bar.update()
    bar.close()
    results["max_abs_loss_diff"] = abs(results["loss"]["chunked"]["loss"] - results["loss"]["full"]["loss"])
    results["ratios"] = _ratios(results)
    write_json(out / "bench.json", results)
    write_text(out / "bench.md", markdown_table(results))
    return results


def _training_rows(pk: dict, tr: dict, ra: dict) -> list[str]:
    """bench.md's training-throughput rows: packing, row attention, bf16, the kept trunk."""
    return [
        f"| training tokens/s, padded → padding-free (skewed mix, {pk['real_tokens']} tokens) | "
        f"{pk['padded']['tokens_per_s']} | {pk['packed']['tokens_per_s']} | {ra['packing_tokens_per_s']} |",
        *(
            [
                f"| training tokens/s, packed: one block mask → row attention | {pk['packed']['tokens_per_s']} | "
                f"{pk['packed_rows']['tokens_per_s']} | {ra['row_attention_tokens_per_s']} |"
            ]
            if "packed_rows" in pk
            else []
        ),
        *(
            [
                f"| training tokens/s, packed float32 → bf16 autocast | "
                f"{pk[pk['bf16_versus']]['tokens_per_s']} | "
                f"{pk['packed_bf16']['tokens_per_s']} | {ra['bf16_tokens_per_s']} |"
            ]
            if "packed_bf16" in pk
            else []
        ),
        f"| training tokens/s, LoRA top {tr['lora_layers']} of {tr['layers']} layers, a later epoch: frozen trunk "
        f"recomputed → kept from the first | {tr['recomputed']['tokens_per_s']} | {tr['cached']['tokens_per_s']} | "
        f"{ra['trunk_cache_tokens_per_s']} |",
        *(
            [
                f"| training tokens/s, the same kept-trunk epoch, float32 → bf16 autocast | "
                f"{tr['cached']['tokens_per_s']} | {tr['cached_bf16']['tokens_per_s']} | {ra['trunk_bf16_tokens_per_s']} |"
            ]
            if "cached_bf16" in tr
            else []
        ),
    ]


def markdown_table(r: dict) -> str:
    c, lo, pk, pr, ge, ra = r["config"], r["loss"], r["packing"], r["probe"], r["generation"], r["ratios"]
    tr = r["trunk"]
    model = c["model"] or f"build_tiny architecture, vocab {c['vocab']} (random weights)"
    lines = [
        f"# derta bench ({r['device']}, {r['torch_threads']} torch threads)",
        "",
        f"Model: {model}. Loss step: batch {c['batch']} x {c['seq']} tokens, first half of each row unlabelled.",
        "",
        "| measure | old | new | new ÷ old |",
        "|---|---|---|---|",
        f"| training-step peak memory (MB), full logits → labelled positions | {lo['full']['peak_memory_mb']} | "
        f"{lo['chunked']['peak_memory_mb']} | {ra['loss_peak_memory']} |",
        f"| training-step time (s, median of {c['steps']}) | {lo['full']['step_s']} | {lo['chunked']['step_s']} | {ra['loss_step_time']} |",
        *_training_rows(pk, tr, ra),
        f"| generation prompts/s, one at a time → batched ({ge['prompts']} prompts, {c['max_new_tokens']} new tokens) | "
        f"{ge['one_at_a_time']['prompts_per_s']} | {ge['batched']['prompts_per_s']} | {ra['batched_generation']} |",
        *(
            [
                f"| generation prompts/s, batched float32 → bf16 autocast | {ge['batched']['prompts_per_s']} | "
                f"{ge['batched_bf16']['prompts_per_s']} | {ra['bf16_generation']} |"
            ]
            if "batched_bf16" in ge
            else []
        ),
        f"| refusal probe time (s), generation per position → one forward ({pr['pairs']} pairs, {pr['positions']} positions) | "
        f"{pr['generation_s']} | {pr['probe_s']} | {ra['probe_time']} |",
        "",
        f"Max abs loss difference, labelled positions vs full logits (same batch): {r['max_abs_loss_diff']:.2e}. "
        f"Packed vs padded first-batch loss: {pk['abs_loss_diff']:.2e}. "
        + (f"Row attention vs block mask: {pk['rows_abs_loss_diff']:.2e}. " if "packed_rows" in pk else "")
        + f"Probe vs generation probabilities: {pr['max_abs_probability_diff']:.2e}. "
        f"Batched vs one-at-a-time identical texts: {ge['same_text_share']:.0%}. "
        f"Trunk kept vs recomputed first-batch loss: {tr['abs_loss_diff']:.2e}."
        + (f" bf16 vs float32 packed first-batch loss: {pk['bf16_abs_loss_diff']:.2e}." if "packed_bf16" in pk else "")
        + (
            f" bf16 vs float32 batched identical texts: {ge['bf16_same_text_share']:.0%}."
            if "batched_bf16" in ge
            else ""
        ),
        "",
        "## Against the machine's limit",
        "",
        *limit_markdown(r["limit"]),
        "",
    ]
    return "\n".join(lines)


def length_range(text: str, flag: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split("-"))
    except ValueError:
        raise InputError(f"{flag} must be MIN-MAX token counts, e.g. 32-96") from None
    if not 4 <= lo <= hi:
        raise InputError(f"{flag} must be MIN-MAX with 4 <= MIN <= MAX")
    return lo, hi
