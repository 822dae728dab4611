"""The calibration and evaluation text of the built-in stdlib source must not overlap: a method
that calibrates on the text it is judged on would look better than it is."""

from __future__ import annotations

import json

import yaml

from compress.calib import STDLIB_SETS, stdlib_texts


def _package_and_parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def test_module_lists_share_no_module():
    sets = yaml.safe_load(STDLIB_SETS.read_text())
    calibration, evaluation = sets["calibration"], sets["evaluation"]
    assert calibration and evaluation
    assert len(set(calibration)) == len(calibration) and len(set(evaluation)) == len(evaluation)
    assert not set(calibration) & set(evaluation)
    # no module of one list inside (or above) a module of the other: "json" would read the
    # docstrings json.decoder's objects re-export
    for name in calibration:
        for other in evaluation:
            assert name not in _package_and_parents(other), (name, other)
            assert other not in _package_and_parents(name), (name, other)


def test_texts_share_no_docstring():
    """The extracted texts themselves are disjoint (an object re-exported from another module
    would otherwise bring the same docstring into both)."""
    calibration = {t for t in stdlib_texts("calibration") if len(t) >= 80}
    evaluation = {t for t in stdlib_texts("evaluation") if len(t) >= 80}
    assert len(calibration) > 100 and len(evaluation) > 100
    assert not calibration & evaluation


def test_local_lm_eval_tasks_come_from_evaluation_text_only():
    """The bundled task documents are evaluation-split docstrings, none from calibration."""
    calibration = "\n\n".join(stdlib_texts("calibration"))
    from compress.evaluation.local_tasks import TASKS_DIR

    docs = [json.loads(line) for line in
            (TASKS_DIR / "stdlib_docs.jsonl").read_text().splitlines() if line]
    texts = [next(v for v in d.values() if isinstance(v, str) and len(v) > 80) for d in docs]
    assert texts
    assert not [t for t in texts if t in calibration]


def test_last_word_task_comes_from_evaluation_text_only():
    """stdlib_lastword (the LAMBADA-style task the peer comparison reports accuracy on): every
    item names an evaluation module, and neither its context nor its context + target word is
    calibration text, so a calibrated method was never fitted on the paragraph it completes."""
    sets = yaml.safe_load(STDLIB_SETS.read_text())
    calibration = "\n\n".join(stdlib_texts("calibration"))
    from compress.evaluation.local_tasks import read_jsonl

    items = read_jsonl("stdlib_lastword.jsonl")
    assert len(items) > 100
    assert {item["module"] for item in items} <= set(sets["evaluation"])
    assert not [i for i in items if i["context"] in calibration
                or f"{i['context']} {i['target']}" in calibration]
    docs = read_jsonl("stdlib_docs.jsonl")
    assert {doc["module"] for doc in docs} <= set(sets["evaluation"])


def test_forward_batch_is_about_4096_tokens_on_cuda_unless_given():
    """Unset, a calibration forward runs ~4096 tokens on a GPU (its transients grow with the
    tokens of a batch) and 8 windows elsewhere; a recipe's batch_size always wins."""
    import torch

    from compress.calib import CalibrationConfig

    assert CalibrationConfig(seq_len=2048).forward_batch(torch.device("cuda")) == 2
    assert CalibrationConfig(seq_len=512).forward_batch("cuda") == 8
    assert CalibrationConfig(seq_len=8192).forward_batch("cuda") == 1
    assert CalibrationConfig(seq_len=2048).forward_batch("cpu") == 8
    assert CalibrationConfig(seq_len=2048, batch_size=3).forward_batch("cuda") == 3
