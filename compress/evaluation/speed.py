"""A speed measurement for `compress compare`, in a fresh process per model
(`python -m compress.evaluation.speed MODEL`), so the peak memory belongs to that model alone.
The timing harness is compress.evaluation.bench's (static cache + CUDA graph on a GPU, eager on
the CPU, labelled with the device it ran on)."""

from __future__ import annotations

import json
import sys

import torch


def bench_model(spec: str, prompt_tokens: int = 128, decode_tokens: int = 16) -> dict:
    """Load `spec` and measure it on CUDA when present, else on the CPU."""
    from compress.evaluation.bench import measure_speed
    from compress.models import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(spec).model.to(device)
    if device.type == "cuda":  # activations in bf16 on a GPU, as `compress bench` runs them
        model = model.to(torch.bfloat16)
    result = measure_speed(model, spec, 1, prompt_tokens, decode_tokens).to_dict()
    result.update(device=device.type if device.type == "cpu" else torch.cuda.get_device_name(),
                  threads=torch.get_num_threads(), method=f"{result['method']} (fresh process)")
    return result


if __name__ == "__main__":
    from compress.models import set_offline_unless_asked

    set_offline_unless_asked()
    print(json.dumps(bench_model(sys.argv[1])))
