"""The versions an artifact or a result was made with (recorded in report.json and results)."""

from __future__ import annotations

import platform

import torch

from compress import __version__


def versions() -> dict[str, str]:
    import transformers

    return {"compress": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": platform.machine(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
