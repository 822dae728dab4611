"""lm-eval tasks on the in-memory model, so what is measured is our modules and kernels.

lm-eval's own HFLM wraps the loaded nn.Module (no reload from disk, no second copy). Task names
resolve against lm-eval's registry plus the local tasks in evaluate/tasks/ (offline, no hub).
"""

from __future__ import annotations

import logging
from typing import Any

from compress.errors import CompressError, UsageError
from compress.evaluation.local_tasks import TASKS_DIR, local_task_names
from compress.models import set_offline_unless_asked

set_offline_unless_asked()  # before lm_eval imports datasets / evaluate / huggingface_hub

# The metrics we report per task, in order of preference (lm-eval names, ",none" filter).
HEADLINE = ("acc_norm", "acc", "exact_match", "word_perplexity", "perplexity", "f1")
HIGHER_IS_BETTER = {"word_perplexity": False, "byte_perplexity": False, "bits_per_byte": False,
                    "perplexity": False}


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise CompressError("--tasks needs lm-eval: pip install 'lm-eval>=0.4.8' "
                            "(or the project's [eval] extra)") from None
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return TaskManager


def task_manager(names: list[str] | None = None):
    """lm-eval's registry plus evaluate/tasks/. Indexing lm-eval's thousands of task YAMLs takes
    seconds, so a run naming only local tasks indexes evaluate/tasks/ alone."""
    defaults = names is None or not set(names) <= set(local_task_names())
    if defaults not in _MANAGERS:
        _MANAGERS[defaults] = _lm_eval()(include_path=str(TASKS_DIR), include_defaults=defaults)
    return _MANAGERS[defaults]


_MANAGERS: dict[bool, object] = {}


def load_tasks(names: list[str]) -> dict[str, Any]:
    """Build lm-eval Task/Group objects, with ONE clear line when a name or its data is missing."""
    manager = task_manager(names)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UsageError(f"unknown lm-eval task {unknown[0]!r}: local tasks are "
                         f"{', '.join(local_task_names())}; `lm-eval ls tasks` lists lm-eval's")
    built = {}
    for name in names:
        try:
            built[name] = manager.load([name])
        except Exception as exc:  # datasets/hub raise many types when data is unreachable
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise CompressError(
                f"lm-eval task {name!r}: its data could not be loaded offline ({first}); run "
                "once with COMPRESS_ONLINE=1 and network access to cache it, or use a local "
                f"task ({', '.join(local_task_names())})") from None
    return built


def wrap(model, tokenizer, batch_size: int = 8, max_length: int | None = None):
    """lm-eval's HFLM around the already-loaded model (it is used as is, not copied)."""
    _lm_eval()
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                max_length=max_length)


def run_tasks(model, tokenizer, names: list[str], limit: int | None = None,
              batch_size: int = 8, max_length: int | None = 2048) -> dict[str, dict[str, float]]:
    """Scores per task: {task: {metric: value}} (lm-eval's metric names, filter suffix dropped)."""
    from lm_eval.evaluator import simple_evaluate

    built = load_tasks(names)
    lm = wrap(model, tokenizer, batch_size, max_length)
    scores: dict[str, dict[str, float]] = {}
    for name, loaded in built.items():
        top = loaded["groups"].get(name) or loaded["tasks"].get(name)
        objects = [top] if top is not None else list(loaded["tasks"].values())
        out = simple_evaluate(model=lm, tasks=objects, limit=limit, bootstrap_iters=0,
                              log_samples=False, task_manager=task_manager(names))
        for task, metrics in out["results"].items():
            scores[task] = {key.split(",")[0]: float(value) for key, value in metrics.items()
                            if "," in key and "stderr" not in key
                            and isinstance(value, (int, float))}
    return scores


def headline(metrics: dict[str, float]) -> tuple[str, float] | None:
    """The one metric of a task shown in tables and gated (accuracy first, else perplexity)."""
    for key in HEADLINE:
        if key in metrics:
            return key, metrics[key]
    return None
