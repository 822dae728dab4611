"""`compress inspect`: what an artifact holds, without loading the model."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from rich.table import Table

from compress.errors import CompressError, UsageError
from compress.progress import console, key_values


def weight_bytes(path: Path) -> dict[str, int]:
    """Bytes per tensor name from the safetensors headers (no tensor is read)."""
    from compress.integrity import DTYPE_BYTES
    from compress.runtime.checkpoint import Checkpoint

    return {name: math.prod(shape) * DTYPE_BYTES[dtype]
            for name, (dtype, shape) in Checkpoint.artifact(path).tensor_info().items()}


def describe_artifact(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UsageError(f"{path} is not an artifact (no config.json)")
    from compress.runtime.artifact import read_artifact_config

    config = read_artifact_config(path, verify=False)
    section = config.get("compress", {})
    modules = section.get("modules", {})
    sizes = weight_bytes(path)
    formats = Counter(_format_name(fmt) for fmt in modules.values())
    table = Table(title=f"{path}", show_header=True)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    table.add_row("architecture", str(config.get("model_type")))
    table.add_row("layers", str(config.get("num_hidden_layers")))
    table.add_row("quantized modules", ", ".join(f"{n} x {f}" for f, n in formats.items()) or "none")
    table.add_row("weight bytes", f"{sum(sizes.values()):,}")
    table.add_row("structure", ", ".join(section.get("structure", {})) or "unchanged")
    table.add_row("checksums", _checksum_status(path, "checksums" in section))
    report_path = path / "report.json"
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text())
        except ValueError:
            report = {}
        for item in report.get("passes", []):
            if isinstance(item, dict):
                table.add_row(f"pass {item.get('pass')}",
                              f"{item.get('seconds')}s {key_values(item.get('summary') or {})}")
    console.print(table)
    return {"modules": modules, "weight_bytes": sum(sizes.values())}


def _checksum_status(path: Path, required: bool) -> str:
    from compress.integrity import verify_checksums

    try:
        verify_checksums(path, required)
    except CompressError as exc:
        return f"FAILED: {exc}"
    return "verified" if (path / "checksums.sha256").is_file() else "none recorded"


def _format_name(fmt: dict) -> str:
    from compress.formats import WeightFormat

    return WeightFormat(**fmt).name
