"""What every pass shares: its config base class, its report, the context it runs in, the registry."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch

    from compress.calib import CalibrationConfig, Calibrator
    from compress.models import Arch
    from compress.offload import LayerStore
    from compress.resume import Run


class PassConfig(BaseModel):
    """Base of every pass config. Subclasses add `kind: Literal["name"] = Field(alias="pass")`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    # An exact pass must leave the model's outputs unchanged; the pipeline checks it.
    exact: ClassVar[bool] = False
    # True when the pass changes the weights of decoder layer 0 (precompute must come after).
    changes_layer0: ClassVar[bool] = True
    # True when the pass touches decoder layers one at a time only through ctx.layers() or
    # ctx.calibrator(): a recipe of such passes runs with bounded memory and can resume.
    layerwise: ClassVar[bool] = False
    # True when the pass needs the family's attention/MLP layout from the Arch table: it is
    # refused (one line, before any pass runs) for a model family without a table row.
    needs_family: ClassVar[bool] = False
    # True when the pass gets the same result on several ranks that each see a share of the
    # calibration data (it uses only LayerStep.gather's statistics, which are summed over them).
    data_parallel: ClassVar[bool] = True

    # The ordering rule, declared once per pass and checked here for every pass: the kinds of
    # pass that must come later in a recipe than this one, and the sentence that says why
    # ({later} is the first offending pass).
    comes_before: ClassVar[tuple[str, ...]] = ()
    order_rule: ClassVar[str] = "must come before {later}: move it earlier in the recipe"

    def order_error(self, index: int, passes: list["PassConfig"]) -> str | None:
        """Why this pass cannot stand at `index` of `passes`, or None when it can."""
        earlier = [p.kind for p in passes[:index] if p.kind in self.comes_before]
        if earlier:
            return f"{self.kind} {self.order_rule.format(later=earlier[0])}"
        return None

    def describe(self, model: "torch.nn.Module", arch: "Arch") -> list[str]:
        """What the pass will do to which modules, for `compress apply --dry-run` (the model
        may be on the meta device: use names and shapes only)."""
        return [f"{self.kind}: whole model" + ("" if self.layerwise else " (held in memory)")]

    @classmethod
    def family_problem(cls, arch: "Arch") -> str | None:
        """Why this pass refuses a model family with a table row, or None (the support table
        in the README is generated from this; see compress/support.py)."""
        return None

    def needs_calibration(self) -> bool:
        """Whether the pass reads calibration data (for time estimates)."""
        return True

    def output_bits(self, model: "torch.nn.Module", arch: "Arch") -> dict[str, float]:
        """Bits per weight of the modules this pass will store compressed (for size estimates)."""
        return {}


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
    store: "LayerStore | None" = None        # set when layers stream from/to disk
    run: "Run | None" = None                 # set when the run can resume
    pass_index: int = 0
    save_dtype: "torch.dtype | None" = None  # what the artifact stores unquantized tensors in
    current_layer: str = ""                  # the decoder layer a pass is working on (errors)
    _finished: int = -1                      # the last layer finish_layer prepared
    _calib_ids: "torch.Tensor | None" = None

    def calibration_ids(self) -> "torch.Tensor":
        """Calibration token windows [N, L], tokenized once and shared by every pass."""
        if self._calib_ids is None:
            from compress.calib import calibration_windows

            self._calib_ids = calibration_windows(self.tokenizer, self.calibration)
        return self._calib_ids

    def calibrator(self) -> "Calibrator":
        """A fresh layer-wise pass over the calibration data (see compress.calib.Calibrator)."""
        from compress import distributed
        from compress.calib import Calibrator

        return Calibrator(self.model, self.arch, distributed.share_of(self.calibration_ids()),
                          batch_size=self.calibration.forward_batch(self.device),
                          device=self.device,
                          context=self)

    def layers(self) -> Iterator[tuple[int, str, "torch.nn.Module"]]:
        """(index, full name, layer) for each decoder layer, for passes that need no data.
        With a LayerStore the layer is read before and written and freed after its turn."""
        from compress.models import decoder_layers, layers_path

        prefix = layers_path(self.model, self.arch)
        for index, layer in enumerate(decoder_layers(self.model, self.arch)):
            if index < self.first_layer():
                continue
            self.open_layer(index, layer)
            yield index, f"{prefix}.{index}", layer
            self.close_layer(index, layer)

    def first_layer(self) -> int:
        """Where this pass starts: 0, or after the last layer an interrupted run finished."""
        return self.run.first_layer(self.pass_index) if self.run else 0

    def open_layer(self, index: int, layer: "torch.nn.Module") -> None:
        from compress.models import layers_path

        self.current_layer = f"{layers_path(self.model, self.arch)}.{index}"
        if self.store is not None:
            self.store.load(index, layer)

    def settle_layer(self, layer: "torch.nn.Module") -> None:
        """The pass changed this layer and the calibrator is about to re-run it for the next
        layer's inputs: round it to what will be saved first, so those inputs are the ones a
        resumed run rebuilds from the written file (and the ones the artifact computes)."""
        if self.store is not None:
            self.store.round_to_saved(layer)

    def finish_layer(self, index: int) -> None:
        """When the last pass is done with a streamed layer, turn it into what the artifact
        stores (the BEFORE_SAVE hooks: 2:4 storage). The calibrator calls this while the
        layer is still on the calibration device: compressing one [14336, 4096] weight to 2:4
        takes 3.9 s on a 2-core CPU, and the likely cause of SparseGPT's pass time on 4 layers
        of an 8B-shaped model rising from 26 s to 50 s on the H200 was running it after the
        move (evaluate/RESULTS.md, fifth session)."""
        if self.store is None or not self.store.final or self._finished == index:
            return
        from compress.formats.artifact import BEFORE_SAVE
        from compress.models import layers_path

        inside = f"{layers_path(self.model, self.arch)}.{index}."
        for hook in BEFORE_SAVE:
            hook(self.model, lambda name: name.startswith(inside))
        self._finished = index

    def close_layer(self, index: int, layer: "torch.nn.Module") -> None:
        """The pass is done with this layer: write it (and the progress) and free it. With
        several ranks only rank 0 writes; the others wait until it has (they read the file in
        the next pass)."""
        if self.store is None:
            return
        from compress import distributed

        self.finish_layer(index)
        self.store.save(index, layer)
        if self.run is not None:
            from compress.runtime.artifact import quantized_modules, structure

            modules = {n: m.fmt.model_dump() for n, m in quantized_modules(self.model).items()}
            self.run.layer_done(self.pass_index, index, modules, dict(structure(self.model)),
                                self.store.file(index))
        distributed.barrier()
        inject_fault(self.pass_index, index)


def inject_fault(pass_index: int, layer_index: int) -> None:
    """Fault injection for the resume tests: COMPRESS_FAULT_AFTER_LAYER="PASS:LAYER:SIGNAL"
    sends SIGNAL (KILL or INT) to this process once that layer of that pass is written;
    "PASS:LAYER:SIGNAL:RANK" to that rank's process only (with several ranks)."""
    import os
    import signal

    from compress import distributed

    fault = os.environ.get("COMPRESS_FAULT_AFTER_LAYER")
    if fault:
        at_pass, at_layer, name, *at_rank = fault.split(":")
        if (int(at_pass), int(at_layer)) == (pass_index, layer_index) and \
                (not at_rank or int(at_rank[0]) == distributed.rank()):
            os.kill(os.getpid(), getattr(signal, f"SIG{name}"))


PassFn = Callable[[Context, PassConfig], PassReport]
PASSES: dict[type[PassConfig], PassFn] = {}


def register(config_type: type[PassConfig]) -> Callable[[PassFn], PassFn]:
    """Decorator: `@register(QuantizeConfig) def quantize(ctx, cfg) -> PassReport`."""

    kind = config_type.model_fields["kind"].default
    taken = [c for c in PASSES if c.model_fields["kind"].default == kind]
    if taken:  # two passes answering to one name would silently shadow each other
        raise TypeError(f"pass name {kind!r} is registered twice ({taken[0].__name__} and "
                        f"{config_type.__name__})")

    def wrap(fn: PassFn) -> PassFn:
        PASSES[config_type] = fn
        return fn

    return wrap


# Known causes of torch RuntimeErrors inside a pass, and what the user can do about each.
_RUNTIME_FIXES = (
    ("out of memory", "use fewer or shorter calibration samples (calibration.samples, "
                      "calibration.batch_size) or --device cpu"),
    ("same device", "this is a bug in compress; --device cpu works around it"),
    ("CUDA error", "the GPU failed; run again, or use --device cpu"),
)


def runtime_error_line(exc: RuntimeError, cfg: PassConfig, ctx: Context) -> str:
    """One line for a torch RuntimeError raised inside a pass: the pass, the module, the device,
    torch's own first line and, where the cause is known, the fix."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    where = f" in {ctx.current_layer}" if ctx.current_layer else ""
    fix = next((f"; {fix}" for key, fix in _RUNTIME_FIXES if key.lower() in first.lower()), "")
    return f"pass {cfg.kind!r} failed{where} on {ctx.device}: {first}{fix}"


def run_pass(ctx: Context, cfg: PassConfig) -> PassReport:
    from compress.errors import CompressError

    start = time.perf_counter()
    ctx.current_layer = ""
    try:
        report = PASSES[type(cfg)](ctx, cfg)
    except RuntimeError as exc:  # torch's errors (device, memory, CUDA): one line, exit 1
        raise CompressError(runtime_error_line(exc, cfg, ctx)) from exc
    report.seconds = time.perf_counter() - start
    return report
