"""Write a multiple-choice task file from a JSONL corpus (the rule of examples/bench/docstring_mc.jsonl).

    python examples/bench/make_docstring_mc.py data/sample.jsonl examples/bench/docstring_mc.jsonl

Items: a line of a document with at least 12 words; context = its first 6 words, the right choice
the next 6 as written, three wrong choices the same 6 words in other orders; where the right one
sits is drawn too. Deterministic for a given corpus and seed.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path


def make_items(corpus: Path, n: int = 40, seed: int = 0, text_field: str = "text") -> list[dict]:
    lines = []
    for raw in corpus.read_text(encoding="utf-8").splitlines():
        text = json.loads(raw).get(text_field) or ""
        lines += [line.split() for line in text.splitlines() if len(line.split()) >= 12]
    rng = random.Random(seed)
    items, seen = [], set()
    while len(items) < n:
        words = rng.choice(lines)
        context, right = " ".join(words[:6]), words[6:12]
        if context in seen or len(set(right)) < 4:
            continue  # distinct items; enough distinct words for three distinct wrong orders
        seen.add(context)
        wrong = set()
        while len(wrong) < 3:
            order = rng.sample(right, len(right))
            if order != right:
                wrong.add(" ".join(order))
        choices = sorted(wrong)
        label = rng.randrange(4)
        choices.insert(label, " ".join(right))
        items.append({"context": context, "choices": choices, "label": label})
    return items


def write_items(items: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")


if __name__ == "__main__":
    write_items(make_items(Path(sys.argv[1])), Path(sys.argv[2]))
