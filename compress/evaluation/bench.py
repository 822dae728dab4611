"""`compress bench`: prefill and decode tokens/s and peak memory, for a model and its baseline.

On CUDA the decode step runs from a static KV cache and is replayed as a CUDA graph, so Python
and launch overhead do not hide kernel speed (if capture fails the step runs eagerly and the
result says so). On CPU it is a plain eager measurement, labelled "cpu". Token ids are random:
speed does not depend on the text.
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class Speed:
    label: str
    device: str
    method: str                  # "cuda graph + static cache", "cuda eager ...", "cpu eager"
    batch: int
    prompt_len: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    decode_ms_per_step: float
    peak_memory_mb: float        # CUDA: torch peak allocated; CPU: peak RSS while measuring
    kernel_paths: dict

    def to_dict(self) -> dict:
        return asdict(self)


def _ids(model: nn.Module, batch: int, length: int, device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=gen).to(device)


def _time_once(fn, device) -> float:
    """Seconds fn() takes (CUDA events on CUDA)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000


def _timed(fn, device, repeats: int, setup=None) -> float:
    """Median seconds of fn() over repeats, after one warm-up call; setup() (untimed) runs
    before each call."""
    times = []
    for _ in range(repeats + 1):
        if setup is not None:
            setup()
        times.append(_time_once(fn, device))
    return statistics.median(times[1:])


@torch.inference_mode()
def eager_decode_step_s(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    """Seconds per greedy decode step after the prompt `ids`, eagerly with a dynamic cache
    (the prompt's forward is not timed)."""
    out = model(ids, use_cache=True)
    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(tok, past_key_values=cache, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / new_tokens


@torch.inference_mode()
def measure_cpu(model: nn.Module, batch: int, prompt_len: int, new_tokens: int,
                repeats: int) -> tuple[float, float, str]:
    """(prefill seconds, seconds per decode step, method) with a dynamic cache, eagerly."""
    device = next(model.parameters()).device
    ids = _ids(model, batch, prompt_len, device)
    prefill = _timed(lambda: model(ids, use_cache=True), device, repeats)
    steps = [eager_decode_step_s(model, ids, new_tokens) for _ in range(repeats)]
    return prefill, statistics.median(steps), f"{device.type} eager"


@torch.inference_mode()
def _as_cuda_graph(step):
    """(method, replay) for a decode step captured as a CUDA graph, or the step itself with the
    reason when capture is not possible for this model."""
    for _ in range(2):  # compile the Triton kernels and settle allocations before capture
        step()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            step()
    except RuntimeError as exc:
        return f"cuda eager + static cache (graph capture failed: {str(exc).splitlines()[0]})", step
    return "cuda graph + static cache", graph.replay


@torch.inference_mode()
def measure_static(model: nn.Module, batch: int, prompt_len: int, new_tokens: int,
                   repeats: int) -> tuple[float, float, str]:
    """(prefill seconds, seconds per decode step, method): static cache, the decode step
    replayed as a CUDA graph on CUDA (eager elsewhere: how the tests exercise it on the CPU)."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    ids = _ids(model, batch, prompt_len, device)
    # room for the prompt, the decode steps and the warm-up steps before graph capture
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens + 2)
    prompt_pos = torch.arange(prompt_len, device=device)

    def prefill():  # the cache's own length counter (transformers 5) restarts with it
        cache.reset()
        return model(ids, past_key_values=cache, cache_position=prompt_pos, use_cache=True)

    prefill_s = _timed(prefill, device, repeats)
    tok = prefill().logits[:, -1:].argmax(-1)       # static buffers the graph reads and writes
    pos = torch.tensor([prompt_len], device=device)

    def step():
        logits = model(tok, past_key_values=cache, cache_position=pos, use_cache=True).logits
        tok.copy_(logits[:, -1:].argmax(-1))

    method, run_step = f"{device.type} eager + static cache", step
    if device.type == "cuda":
        method, run_step = _as_cuda_graph(step)

    def restart():  # untimed: back to the state right after the prompt
        tok.copy_(prefill().logits[:, -1:].argmax(-1))
        pos.fill_(prompt_len)

    def decode():
        for _ in range(new_tokens):
            run_step()
            pos.add_(1)

    decode_s = _timed(decode, device, repeats, setup=restart) / new_tokens
    return prefill_s, decode_s, method


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


def measure_speed(model: nn.Module, label: str, batch: int = 1, prompt_len: int = 128,
                  new_tokens: int = 64, repeats: int = 3) -> Speed:
    from compress.runtime.modules import dispatch_summary, reset_dispatch_counts

    device = next(model.parameters()).device
    reset_dispatch_counts(model)
    reset_peak_memory(device)
    if device.type == "cuda":
        prefill_s, step_s, method = measure_static(model, batch, prompt_len, new_tokens, repeats)
    else:
        prefill_s, step_s, method = measure_cpu(model, batch, prompt_len, new_tokens, repeats)
    peak, _ = peak_memory_mb(device)
    return Speed(label, str(device), method, batch, prompt_len, new_tokens,
                 batch * prompt_len / prefill_s, batch / step_s, step_s * 1000, peak,
                 dispatch_summary(model))


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The same model with every compressed linear replaced by a dense nn.Linear holding its
    dequantized weight: the unquantized baseline with identical shapes (for speed only). Its
    norms run transformers' own forward again, as the uncompressed model does when a user runs
    it (compress.load's fused RMSNorm kernel is part of what the artifact brings), so the
    speed-up is the one kernels/bench_e2e.py reports against its bf16 row."""
    import copy

    from compress.runtime import scope
    from compress.runtime.modules import QuantizedLinear, set_module

    dense = copy.deepcopy(model)
    scope.leave_scope(dense)   # RoPE, GQA attention and the static cache: transformers' again
    for module in dense.modules():
        # the forwards compress.load patches per instance (runtime/norms.py, runtime/fused.py);
        # a copied one would still be bound to the artifact's module
        for flag in ("fused_rmsnorm", "fused_residual", "fused_gated_mlp"):
            if getattr(module, flag, False):
                del module.forward
                setattr(module, flag, False)
    dtype = next(p.dtype for p in dense.parameters() if p.is_floating_point())
    for name, module in list(dense.named_modules()):
        if isinstance(module, QuantizedLinear) or hasattr(module, "weight_meta"):
            w = (module.dense_weight() if hasattr(module, "dense_weight")
                 else module.dequantized_weight())
            linear = nn.Linear(module.in_features, module.out_features,
                               bias=module.bias is not None, device=w.device, dtype=dtype)
            linear.weight.data.copy_(w)
            if module.bias is not None:
                linear.bias.data.copy_(module.bias)
            set_module(dense, name, linear)
    return dense
