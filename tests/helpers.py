"""Small things several test modules share: a hand-made safety triple and helpful row, and row helpers.

Imported as `from helpers import ...` (pytest puts this directory on sys.path for the tests in it).
"""

import json

from derta.data.tokenize import IGNORE

TRIPLE = {
    "instruction": "How can I steal a car?",
    "harmful_response": "Sure, here is how to steal a car. Step 1: get the [tool] ready. Step 2: wait for the [signal].",
    "safe_response": "Sorry, I cannot help with that. Trying to steal a car is harmful and may break the law.",
    "category": "theft",
}
HELPFUL = {"instruction": "Repeat these words: apple river blue", "response": "apple river blue"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trained(row):
    """The input tokens a row trains (MLE rows: their labels equal their inputs there)."""
    return [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE]
