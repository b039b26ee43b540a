"""The `directions` command: harmfulness and refusal directions in a model's hidden states, and the latent guard."""

from __future__ import annotations

from derta.cli.common import add_command, add_template, from_args, group
from derta.eval.directions import HELDOUT_SHARE
from derta.eval.latent import GUARD_MAX_NEW_TOKENS
from derta.io import pct


def cmd_directions(args) -> None:
    from derta.eval.latent import run_directions

    info = from_args(run_directions, args)
    for kind, layer in info["chosen_layer"].items():
        h = info["heldout"][kind]
        print(
            f"{kind} direction: layer {layer}, held-out accuracy {pct(h['accuracy'])}% "
            f"(probe {pct(h['probe_accuracy'])}%), AUROC {h['auroc']:.3f} on {info['n_heldout']} prompts"
        )
    guard = info.get("guard")
    if guard:
        line = f"latent guard on {guard['n_harmful']} harmful / {guard['n_safe']} safe prompts: "
        line += (
            f"AUROC {guard['harmfulness']['auroc']:.3f}, flags {pct(guard['harmfulness']['flags_harmful']['rate'])}%"
        )
        line += f" of harmful and {pct(guard['harmfulness']['flags_safe']['rate'])}% of safe"
        if "model" in guard:
            m = guard["model"]
            line += f"; the model refuses {pct(m['refuses_harmful']['rate'])}% and {pct(m['refuses_safe']['rate'])}%"
        print(line)
    print(f"wrote {args.out}/directions.safetensors and directions.json")


def add_commands(sub) -> None:
    p = add_command(
        sub,
        "directions",
        "harmfulness and refusal directions per layer (difference of means and a logistic probe), the layer chosen on "
        "held-out prompts; with guard prompts, the harmfulness direction as a prompt classifier beside the model's "
        "own refusals",
        cmd_directions,
    )
    m, i, e, o = group(p, "model"), group(p, "data"), group(p, "evaluation"), group(p, "output")
    m.add_argument("--model", required=True, help="directory or hub ID of the model whose hidden states are read")
    add_template(m)
    i.add_argument(
        "--harmful", required=True, help="prompts to refuse: JSONL/CSV/.txt (XSTest's CSV: its unsafe prompts)"
    )
    i.add_argument(
        "--harmless", required=True, help="prompts to answer: JSONL/CSV/.txt (XSTest's CSV: its safe prompts)"
    )
    o.add_argument("--out", required=True, help="directory for directions.safetensors, directions.json, guard.jsonl")
    e.add_argument("--batch-size", type=int, default=16, help="prompts read at once")
    e.add_argument("--heldout-share", type=float, default=HELDOUT_SHARE, help="of each class, held out to pick layers")
    e.add_argument("--seed", type=int, default=0, help="the held-out split's and the probe's seed")
    i.add_argument("--limit", type=int, help="only the first N harmful and N harmless prompts")
    i.add_argument(
        "--guard-harmful", help="held-out harmful prompts for the latent guard (XSTest's CSV: its unsafe prompts)"
    )
    i.add_argument("--guard-safe", help="held-out safe prompts for the latent guard (XSTest's CSV: its safe prompts)")
    e.add_argument(
        "--guard-max-new-tokens",
        type=int,
        default=GUARD_MAX_NEW_TOKENS,
        help="the model answers the guard prompts with this many tokens, for its own refusal rate and the "
        "prompt-only predictor (0: no generation)",
    )
