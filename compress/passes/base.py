"""What every pass shares: its config base class, its report, the context it runs in, the registry."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch

    from compress.calib import CalibrationConfig, Calibrator
    from compress.models import Arch


class PassConfig(BaseModel):
    """Base of every pass config. Subclasses add `kind: Literal["name"] = Field(alias="pass")`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    # An exact pass must leave the model's outputs unchanged; the pipeline checks it.
    exact: ClassVar[bool] = False
    # True when the pass changes the weights of decoder layer 0 (precompute must come after).
    changes_layer0: ClassVar[bool] = True

    def order_error(self, index: int, passes: list["PassConfig"]) -> str | None:
        """Why this pass cannot stand at `index` of `passes`, or None when it can."""
        return None


@dataclass
class PassReport:
    """What a pass did, written into report.json."""

    name: str
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.name, "seconds": round(self.seconds, 3), "summary": self.summary,
                "modules": self.modules}


@dataclass
class Context:
    """Everything a pass may use: the model, its adapter, calibration data and the device."""

    model: "torch.nn.Module"
    tokenizer: Any
    arch: "Arch"
    calibration: "CalibrationConfig"
    device: "torch.device"
    strict: bool = False
    _calib_ids: "torch.Tensor | None" = None

    def calibration_ids(self) -> "torch.Tensor":
        """Calibration token windows [N, L], tokenized once and shared by every pass."""
        if self._calib_ids is None:
            from compress.calib import calibration_windows

            self._calib_ids = calibration_windows(self.tokenizer, self.calibration)
        return self._calib_ids

    def calibrator(self) -> "Calibrator":
        """A fresh layer-wise pass over the calibration data (see compress.calib.Calibrator)."""
        from compress.calib import Calibrator

        return Calibrator(self.model, self.arch, self.calibration_ids(),
                          batch_size=self.calibration.batch_size, device=self.device)


PassFn = Callable[[Context, PassConfig], PassReport]
PASSES: dict[type[PassConfig], PassFn] = {}


def register(config_type: type[PassConfig]) -> Callable[[PassFn], PassFn]:
    """Decorator: `@register(QuantizeConfig) def quantize(ctx, cfg) -> PassReport`."""

    def wrap(fn: PassFn) -> PassFn:
        PASSES[config_type] = fn
        return fn

    return wrap


def run_pass(ctx: Context, cfg: PassConfig) -> PassReport:
    start = time.perf_counter()
    report = PASSES[type(cfg)](ctx, cfg)
    report.seconds = time.perf_counter() - start
    return report
