"""The passes. Each module defines a pydantic config and registers its function in PASSES.

To add a pass: write compress/passes/<name>.py with `class XConfig(PassConfig)` and
`@register(XConfig) def x(ctx, cfg) -> PassReport`, then add XConfig to PASS_CONFIGS below.
"""

from compress.passes.base import PASSES, Context, PassConfig, PassReport, register, run_pass
from compress.passes.quantize import QuantizeConfig
from compress.passes.sparsify import SparsifyConfig

PASS_CONFIGS = (QuantizeConfig, SparsifyConfig)

__all__ = ["PASSES", "PASS_CONFIGS", "Context", "PassConfig", "PassReport", "register",
           "run_pass", "QuantizeConfig", "SparsifyConfig"]
