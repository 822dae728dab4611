"""The passes. Each module defines a pydantic config and registers its function in PASSES.

To add a pass: write compress/passes/<name>.py with `class XConfig(PassConfig)` and
`@register(XConfig) def x(ctx, cfg) -> PassReport`, then add XConfig to PASS_CONFIGS below.
Importing this package registers every pass and its structure loader (for compress.load).
"""

from compress.passes.base import PASSES, Context, PassConfig, PassReport, register, run_pass
from compress.passes.precompute import PrecomputeConfig
from compress.passes.prune_heads import PruneHeadsConfig
from compress.passes.quantize import QuantizeConfig
from compress.passes.rmsnorm import RMSNormConfig
from compress.passes.sparsify import SparsifyConfig

PASS_CONFIGS = (
    QuantizeConfig,
    SparsifyConfig,
    RMSNormConfig,
    PrecomputeConfig,
    PruneHeadsConfig,
)

__all__ = ["PASSES", "PASS_CONFIGS", "Context", "PassConfig", "PassReport", "register",
           "run_pass", *[c.__name__ for c in PASS_CONFIGS]]
