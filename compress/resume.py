"""Resumable runs: a manifest in the partial output directory records the last finished layer.

A run killed at any point (SIGKILL included) and started again with the same command continues
from there, provided the model, recipe and calibration data have the same fingerprint; the
layers already written are read back, never recomputed, and the finished artifact has the same
tensors as an uninterrupted run's (every step is deterministic).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.errors import CompressError

MANIFEST = "run.json"


@dataclass
class Run:
    dir: Path
    fingerprint: dict[str, str]
    passes: list[dict[str, Any]] = field(default_factory=list)   # reports of finished passes
    current: dict[str, int] | None = None                        # {"pass": p, "layer": l}
    modules: dict[str, dict] = field(default_factory=dict)       # quantized module formats
    structure: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, directory: Path, fingerprint: dict[str, str], restart: bool = False) -> "Run":
        """Resume the run in `directory` if it is the same run, else start a fresh one."""
        manifest = directory / MANIFEST
        if manifest.is_file() and not restart:
            state = json.loads(manifest.read_text())
            changed = [k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k]]
            if changed:
                raise CompressError(
                    f"{directory} holds an interrupted run with a different "
                    f"{' and '.join(changed)}; rerun with --restart to discard it")
            return cls(directory, fingerprint, state["passes"], state["current"],
                       state["modules"], state["structure"])
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        run = cls(directory, fingerprint)
        run.write()
        return run

    @property
    def resumed(self) -> bool:
        return bool(self.passes or self.current)

    def first_layer(self, pass_index: int) -> int:
        """The first layer pass `pass_index` still has to process."""
        if self.current and self.current["pass"] == pass_index:
            return self.current["layer"] + 1
        return 0

    def layer_done(self, pass_index: int, layer_index: int, modules: dict, structure: dict) -> None:
        self.current = {"pass": pass_index, "layer": layer_index}
        self.modules, self.structure = modules, structure
        self.write()

    def pass_done(self, report: dict[str, Any]) -> None:
        self.passes.append(report)
        self.current = None
        self.write()

    def write(self) -> None:
        state = {"fingerprint": self.fingerprint, "passes": self.passes, "current": self.current,
                 "modules": self.modules, "structure": self.structure}
        tmp = self.dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.dir / MANIFEST)  # atomic: a kill leaves the old or the new manifest
