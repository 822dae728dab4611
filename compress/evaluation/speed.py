"""A speed measurement any machine can make: prefill and decode tokens/s and peak memory.

Where the kernels' `compress bench` exists (GPU), compare uses it; this is the fallback, labelled
with the device it ran on. It runs in a fresh process per model (`python -m
compress.evaluation.speed MODEL`) so the peak resident memory belongs to that model alone.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
from pathlib import Path

import torch


def _timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_speed(model, prompt: torch.Tensor, decode_tokens: int = 32,
                  repeats: int = 3) -> dict[str, float]:
    """prompt: [1, P] token ids. Prefill = one forward over P tokens; decode = greedy steps with
    the KV cache, one token at a time (batch 1, the latency-bound case)."""
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def prefill():
        with torch.no_grad():
            model(prompt, use_cache=False)
        sync()

    def decode():
        with torch.no_grad():
            out = model(prompt, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(decode_tokens):
                out = model(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync()

    prefill_s = _timed(prefill, repeats)
    decode_s = _timed(decode, repeats) - prefill_s  # the decode loop starts with one prefill
    return {"prefill_tokens_per_s": prompt.shape[1] / prefill_s,
            "decode_tokens_per_s": decode_tokens / max(decode_s, 1e-9)}


def reset_peak_memory(device: torch.device) -> None:
    """Forget the peak so far (loading a GGUF dequantizes through temporary copies)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    gc.collect()
    try:  # Linux: "5" resets the process's peak resident set (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the peak includes loading; peak_memory_mb says which


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory since reset_peak_memory, and what it measures."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    try:
        status = Path("/proc/self/status").read_text()
        kib = next(int(line.split()[1]) for line in status.splitlines()
                   if line.startswith("VmHWM:"))
        return kib / 1024, "peak resident set while running (VmHWM)"
    except (OSError, StopIteration):
        # ru_maxrss is KiB on Linux: the process's peak resident set, loading included.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS incl. load"


def bench_model(spec: str, prompt_tokens: int = 128, decode_tokens: int = 16) -> dict:
    """Load `spec`, measure it on CUDA when present (else CPU), report with the device label."""
    from compress.calib import evaluation_windows
    from compress.models import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(spec)
    model = loaded.model.to(device)
    prompt = evaluation_windows(loaded.tokenizer, "stdlib", prompt_tokens, prompt_tokens)
    reset_peak_memory(device)
    result = measure_speed(model, prompt, decode_tokens)
    peak, what = peak_memory_mb(device)
    result.update(device=device.type if device.type == "cpu" else torch.cuda.get_device_name(),
                  threads=torch.get_num_threads(), prompt_tokens=prompt_tokens,
                  decode_tokens=decode_tokens, peak_memory_mb=peak, peak_memory=what,
                  method="compress.evaluation.speed")
    return result


if __name__ == "__main__":
    from compress.models import set_offline_unless_asked

    set_offline_unless_asked()
    print(json.dumps(bench_model(sys.argv[1])))
