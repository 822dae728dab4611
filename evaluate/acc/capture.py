"""Cache what the layer-wise ablations need: for every decoder layer of SmolLM2 and every group
of projections that read one input (q/k/v, o, gate/up, down), the weights and two Gram matrices
of that input, H = 2/n sum x x^T, gathered on the FLOAT model:
  - H_cal from the calibration windows (what GPTQ sees),
  - H_eval from the held-out evaluation windows (what the ablation is judged on).
Judging on H_eval keeps a method that over-fits the calibration tokens from looking good.

    PYTHONPATH=. python evaluate/acc/capture.py --out /tmp/acc/grams.pt --samples 32 --seq-len 512
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def gram_hooks(model, arch, store, layers):
    """Forward hooks accumulating x^T x and counts for the first linear of every input group."""
    from compress.models import decoder_layers

    handles = []
    for index, layer in enumerate(decoder_layers(model, arch)):
        if index not in layers:
            continue
        for group in arch.linear_groups():
            module = layer.get_submodule(group[0])

            def hook(m, args, out, key=(index, group)):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                acc, n = store.get(key, (0, 0))
                store[key] = (acc + x.T @ x, n + x.shape[0])
            handles.append(module.register_forward_hook(hook))
    return handles


def grams(model, arch, windows: torch.Tensor, layers, batch_size: int = 4) -> dict:
    store: dict = {}
    handles = gram_hooks(model, arch, store, layers)
    try:
        with torch.no_grad():
            for ids in windows.split(batch_size):
                model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {key: (2 * acc / n).float() for key, (acc, n) in store.items()}


def main() -> None:
    from compress.calib import CalibrationConfig, calibration_windows, evaluation_windows
    from compress.models import decoder_layers, load_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("/tmp/acc/grams.pt"))
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 5, 10, 15, 20, 25, 29])
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m")
    model, arch = loaded.model, loaded.arch
    cal = calibration_windows(loaded.tokenizer, CalibrationConfig(samples=args.samples,
                                                                   seq_len=args.seq_len))
    ev = evaluation_windows(loaded.tokenizer, "stdlib", 512, args.eval_tokens)
    start = time.perf_counter()
    h_cal, h_eval = grams(model, arch, cal, args.layers), grams(model, arch, ev, args.layers)
    weights = {}
    for index, layer in enumerate(decoder_layers(model, arch)):
        if index not in args.layers:
            continue
        for group in arch.linear_groups():
            weights[(index, group)] = {n: layer.get_submodule(n).weight.data.clone()
                                       for n in group}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"h_cal": h_cal, "h_eval": h_eval, "weights": weights,
                "calib": cal, "eval": ev}, args.out)
    print(f"saved {len(h_cal)} groups in {time.perf_counter() - start:.0f} s to {args.out}")


if __name__ == "__main__":
    main()
