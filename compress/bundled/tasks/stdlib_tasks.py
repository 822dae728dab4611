# lm-eval loads `!function stdlib_tasks.X` from this folder; the code lives in compress.
from compress.evaluation.local_tasks import load_docs, process_rolling  # noqa: F401
