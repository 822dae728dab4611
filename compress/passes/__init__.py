# ruff: noqa: I001  (the import order below is meaningful)
"""The passes. Each module defines a pydantic config and registers its function in PASSES.

To add a pass: write compress/passes/<name>.py with `class XConfig(PassConfig)` and
`@register(XConfig) def x(ctx, cfg) -> PassReport`, and import it below. The recipe schema is
the union of every registered config (PASS_CONFIGS, in import order); a name registered twice
is refused. Loading an artifact needs none of this (compress/runtime/).
"""

from compress.passes.base import PASSES, Context, PassConfig, PassReport, register, run_pass
# Import order is registration order: the order the recipe schema and its errors list passes in.
from compress.passes.quantize import QuantizeConfig
from compress.passes.sparsify import SparsifyConfig
from compress.passes.rmsnorm import RMSNormConfig
from compress.passes.precompute import PrecomputeConfig
from compress.passes.prune_heads import PruneHeadsConfig

PASS_CONFIGS = tuple(PASSES)

__all__ = [
           "PASSES",
           "PASS_CONFIGS",
           "Context",
           "PassConfig",
           "PassReport",
           "PrecomputeConfig",
           "PruneHeadsConfig",
           "QuantizeConfig",
           "RMSNormConfig",
           "SparsifyConfig",
           "register",
           "run_pass",
]
