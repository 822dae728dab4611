"""Build the local lm-eval tasks in evaluate/tasks/ from the standard library's docstrings.

    python evaluate/make_tasks.py          # rewrites evaluate/tasks/*.jsonl

The text is the EVALUATION module set of calibration/stdlib.yaml (disjoint from the calibration
set), read with the same extractor as `compress evaluate` (compress.calib._docstrings), so the
tasks see text no recipe calibrated on. Output is committed: the tasks do not change when the
Python version (and so the docstrings) does. Every item is derived mechanically, no text is
written by hand:

  stdlib_docs.jsonl      one document per docstring of >= 40 words (rolling loglikelihood:
                         word/byte perplexity, bits per byte)
  stdlib_lastword.jsonl  LAMBADA-style: each docstring paragraph of >= 15 words whose last word is
                         alphabetic (>= 3 letters, optional final period, not a code line);
                         context = the paragraph before that word, target = the word
                         (accuracy = the target is the greedy continuation; perplexity)
"""

from __future__ import annotations

import json
import platform
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.calib import STDLIB_SETS, _docstrings  # noqa: E402

from compress.evaluation.local_tasks import TASKS_DIR as OUT  # noqa: E402
LAST_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z]{3,})\.?$", re.DOTALL)


def docstrings() -> list[tuple[str, str]]:
    """(module, docstring) for the evaluation module set, in the order of stdlib.yaml."""
    modules = yaml.safe_load(STDLIB_SETS.read_text())["evaluation"]
    return [(name, doc) for name in modules for doc in _docstrings(name)]


def documents(docs: list[tuple[str, str]], min_words: int = 40) -> list[dict]:
    return [{"module": module, "text": doc} for module, doc in docs
            if len(doc.split()) >= min_words]


def last_word_items(docs: list[tuple[str, str]], min_words: int = 15) -> list[dict]:
    items, seen = [], set()
    for module, doc in docs:
        for paragraph in doc.split("\n\n"):
            paragraph = paragraph.strip()
            if len(paragraph.split()) < min_words or ">>>" in paragraph or paragraph in seen:
                continue
            match = LAST_WORD.match(paragraph)
            if match and not match["context"].rstrip().endswith((":", "-")):
                seen.add(paragraph)
                items.append({"module": module, "context": match["context"],
                              "target": match["word"]})
    return items


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"wrote {path.relative_to(ROOT)}: {len(rows)} items")


def main() -> None:
    docs = docstrings()
    print(f"Python {platform.python_version()}: {len(docs)} docstrings")
    write_jsonl(OUT / "stdlib_docs.jsonl", documents(docs))
    write_jsonl(OUT / "stdlib_lastword.jsonl", last_word_items(docs))


if __name__ == "__main__":
    main()
