"""Helpers of the local lm-eval tasks in compress/bundled/tasks/ (evaluate/tasks links there;
their YAMLs reach them through the one-line shim stdlib_tasks.py beside them): read a committed JSONL, score rolling perplexity."""

from __future__ import annotations

import json
import re
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parents[1] / "bundled" / "tasks"


def read_jsonl(file: str) -> list[dict]:
    path = Path(file) if Path(file).is_absolute() else TASKS_DIR / file
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def load_docs(file: str, **_metadata):
    """lm-eval `custom_dataset`: the JSONL as a one-split ("test") DatasetDict, no hub."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_jsonl(file))})


def word_count(text: str) -> int:
    return len(re.split(r"\s+", text.strip()))


def process_rolling(doc: dict, results: list[float]) -> dict:
    """Per-document (loglikelihood, units) pairs; lm-eval's weighted_perplexity aggregates."""
    (loglikelihood,) = results
    size = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, word_count(doc["text"])),
            "byte_perplexity": (loglikelihood, size), "bits_per_byte": (loglikelihood, size)}


def local_task_names() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
