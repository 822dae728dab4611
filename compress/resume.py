"""Resumable runs: a manifest in the partial output directory records the last finished layer.

A run killed at any point (SIGKILL included) and started again with the same command continues
from there, provided the model (the content of every file), recipe, calibration data and
output-changing options have the same fingerprint; the layers already written are read back
(each checked against the hash recorded when it was written), never recomputed, and the finished
artifact has the same tensors as an uninterrupted run's (every step is deterministic).

Nothing here deletes an interrupted run except --restart: a mismatch is refused and the run
stays on disk for the command that made it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.errors import CompressError
from compress.integrity import file_sha256

MANIFEST = "run.json"


@dataclass
class Run:
    dir: Path
    fingerprint: dict[str, str]
    passes: list[dict[str, Any]] = field(default_factory=list)   # reports of finished passes
    current: dict[str, int] | None = None                        # {"pass": p, "layer": l}
    modules: dict[str, dict] = field(default_factory=dict)       # quantized module formats
    structure: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)          # layer file -> sha256
    resumed_at_open: bool = False    # this process continues a run another one started
    writes: bool = True              # False on ranks > 0: rank 0 alone writes the manifest

    @classmethod
    def open(cls, directory: Path, fingerprint: dict[str, str], restart: bool = False) -> "Run":
        """Resume the run in `directory` if it is the same run, else start a fresh one."""
        manifest = directory / MANIFEST
        if manifest.is_file() and not restart:
            try:
                state = json.loads(manifest.read_text())
                run = cls(directory, fingerprint, state["passes"], state["current"],
                          state["modules"], state["structure"], state.get("files", {}))
                recorded = state["fingerprint"]
            except (ValueError, KeyError, TypeError):
                raise CompressError(f"{manifest} is unreadable: the interrupted run in "
                                    f"{directory} cannot resume; rerun with --restart to discard "
                                    "it") from None
            changed = [k for k in fingerprint if recorded.get(k) != fingerprint[k]]
            if changed:
                raise CompressError(
                    f"{directory} holds an interrupted run with a different "
                    f"{' and '.join(changed)}; it is kept: rerun the command that started it to "
                    "resume, or rerun with --restart to discard it")
            run.check_files()
            run.resumed_at_open = run.resumed
            return run
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        run = cls(directory, fingerprint)
        run.write()
        return run

    def check_files(self) -> None:
        """Written layers must be what was recorded; temp files and layers written after the
        last record (a kill in between) go, the latter to be computed again."""
        for leftover in self.dir.glob("*.tmp"):
            leftover.unlink()
        for file in sorted(self.dir.glob("layer-*.safetensors")):
            if file.name not in self.files:
                file.unlink()
            elif file_sha256(file) != self.files[file.name]:
                raise CompressError(f"{file} changed since the interrupted run wrote it; rerun "
                                    "with --restart to discard that run")
        missing = [name for name in self.files if not (self.dir / name).is_file()]
        if missing:
            raise CompressError(f"{self.dir} lacks {missing[0]} of the interrupted run; rerun "
                                "with --restart to discard that run")

    @property
    def resumed(self) -> bool:
        return bool(self.passes or self.current)

    def first_layer(self, pass_index: int) -> int:
        """The first layer pass `pass_index` still has to process."""
        if self.current and self.current["pass"] == pass_index:
            return self.current["layer"] + 1
        return 0

    def layer_done(self, pass_index: int, layer_index: int, modules: dict, structure: dict,
                   written: Path | None = None) -> None:
        self.current = {"pass": pass_index, "layer": layer_index}
        if written is not None and self.writes:
            self.files[written.name] = file_sha256(written)
        self.modules, self.structure = modules, structure
        self.write()

    def pass_done(self, report: dict[str, Any]) -> None:
        self.passes.append(report)
        self.current = None
        self.write()

    def write(self) -> None:
        if not self.writes:
            return
        state = {"fingerprint": self.fingerprint, "passes": self.passes, "current": self.current,
                 "modules": self.modules, "structure": self.structure, "files": self.files}
        tmp = self.dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.dir / MANIFEST)  # atomic: a kill leaves the old or the new manifest
