"""Which model is running. The run-time patches to a model family's shared functions (RoPE in
rope.py, attention in attention.py) live in process-wide tables, shared by every model of the
family; they take their faster path only inside the forward of a model given to `enter_scope`,
so another model in the process (compress bench's baseline, loaded beside an artifact) keeps
transformers' own code."""

from __future__ import annotations

import contextvars

from torch import nn

# False outside; inside, a fresh object for each forward of a scoped model: true, and an
# identity that caches may key on to live for one forward (attention.additive_mask)
RUNNING = contextvars.ContextVar("compress_runtime_model", default=False)


def enter_scope(model: nn.Module) -> None:
    """Set RUNNING for the duration of every forward of model (hooks added once a model), to a
    new object each forward."""
    if getattr(model, "compress_scoped", False):
        return
    model.register_forward_pre_hook(_enter)
    model.register_forward_hook(_leave, always_call=True)
    model.compress_scoped = True


def leave_scope(model: nn.Module) -> None:
    """Undo enter_scope on model: compress bench's dequantized baseline, a deep copy of a loaded
    artifact (hooks and all), runs transformers' code as the uncompressed model does. Hooks are
    found by function (a copied handle would still point at the original's hook table)."""
    for table in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, hook in table.items() if hook in (_enter, _leave)]:
            del table[key]
            model._forward_hooks_always_called.pop(key, None)
    model.compress_scoped = False
    model.__dict__.pop("compress_fused_rope", None)


def _enter(module, args):
    module.compress_scope_token = RUNNING.set(object())


def _leave(module, args, output):
    RUNNING.reset(module.__dict__.pop("compress_scope_token"))
