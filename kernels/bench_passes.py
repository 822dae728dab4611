"""Decode-step effect of the structural passes (issue 14): first-layer precompute (Graef 2024)
and Pre-LN -> Pre-RMSNorm / Pre-CRMSNorm (Jiang et al. 2023), each alone and stacked on INT4.

    python kernels/bench_passes.py                 # on the GPU: two 1B-class subjects
    python kernels/bench_passes.py --tiny          # CPU dry run on small configs

Each subject is built from a config with random bf16 weights and saved with save_pretrained;
every row is made by `compress.apply` (the same code as `compress apply`) and timed by the
harness of `compress bench` (compress.evaluation.bench.measure_speed: static cache + CUDA
graph, batch 1), the original first. Loading goes through the same function as `compress
bench` (an artifact through compress.load, the original through transformers), so a row here is
what `compress bench ARTIFACT --baseline ORIGINAL` prints for it.

Subjects: a Llama-3.2-1B shape (serial blocks, RMSNorm: precompute removes layer 0's norm and
q/k/v; the rmsnorm pass can only fold norm weights there, no decode effect, not timed) and a Pythia-1.4B shape (GPT-NeoX:
LayerNorm and parallel attention/FFN, where precompute also removes layer 0's FFN and the
rmsnorm pass turns every LayerNorm into RMSNorm or CRMSNorm). Random weights: speed only.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluate"))

from gptq_gpu_speed import byte_tokenizer

INT4 = {"pass": "quantize", "format": "int4", "group_size": 128, "symmetric": True,
        "method": "rtn", "ignore": ["lm_head"]}
PRECOMPUTE = {"pass": "precompute", "table_dtype": "bfloat16"}   # the model's own dtype

LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "max_position_embeddings": 4096, "rope_theta": 500000.0, "tie_word_embeddings": True}
PYTHIA_1B4 = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
              "num_attention_heads": 16, "vocab_size": 50304, "max_position_embeddings": 2048,
              "rotary_pct": 0.25, "use_parallel_residual": True, "tie_word_embeddings": False}
RMSNORM, CRMSNORM = {"pass": "rmsnorm", "mode": "rmsnorm"}, {"pass": "rmsnorm", "mode": "crmsnorm"}
SUBJECTS = {   # name: (model_type, config, {row: passes})
    "llama-1b": ("llama", LLAMA_1B, {"precompute": [PRECOMPUTE], "int4": [INT4],
                                     "int4 + precompute": [INT4, PRECOMPUTE]}),
    "pythia-1.4b": ("gpt_neox", PYTHIA_1B4, {
        "precompute": [PRECOMPUTE], "rmsnorm": [RMSNORM], "crmsnorm": [CRMSNORM],
        "int4": [INT4], "int4 + precompute": [INT4, PRECOMPUTE], "rmsnorm + int4": [RMSNORM, INT4],
        # CRMSNorm keeps d - 1 of the residual's d values: no group of 128 divides the inputs
        # that read it, so those layers are quantized per channel
        "crmsnorm + int4": [CRMSNORM, {**INT4, "indivisible": "per_channel"}]}),
}
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 1000, "max_position_embeddings": 512}


def build(path: Path, model_type: str, config_kwargs: dict, device) -> Path:
    """Random weights (std 0.02, norms at their defaults) saved in bf16 with a tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (path / "config.json").exists():
        return path
    config = AutoConfig.for_model(model_type, **config_kwargs, bos_token_id=256,
                                  eos_token_id=256)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    del model
    return path


def measure(spec: Path, label: str, device: str, args) -> dict:
    """`compress bench`'s load and harness for one model (artifact or original)."""
    from compress.cli import _load_for_run
    from compress.evaluation.bench import measure_speed

    dtype = "bfloat16" if device == "cuda" else "float32"
    model, _ = _load_for_run(str(spec), device, dtype)
    speed = measure_speed(model, label, 1, args.prompt_len, args.new_tokens, args.repeats)
    weight_bytes = sum(t.numel() * t.element_size()
                       for t in list(model.parameters()) + list(model.buffers()))
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {**speed.to_dict(), "model_bytes": weight_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_passes"))
    parser.add_argument("--subjects", default=",".join(SUBJECTS))
    parser.add_argument("--rows", default=None, help="comma list of row names (default: all)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="small configs (CPU dry run)")
    parser.add_argument("--log", type=Path, default=Path("kernels/bench_passes.log.jsonl"))
    args = parser.parse_args()

    import compress
    from compress.models import set_offline_unless_asked

    set_offline_unless_asked()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        raise SystemExit("1B models need the GPU; use --tiny for a CPU dry run")
    wanted = set(args.rows.split(",")) if args.rows else None
    header = {"device": device if device == "cpu" else torch.cuda.get_device_name(),
              "torch": torch.__version__, "cmd": " ".join(sys.argv)}

    def log(subject: str, name: str, row: dict) -> None:   # a row at a time: a cut run keeps them
        with open(args.log, "a") as f:
            f.write(json.dumps({**header, "date": time.strftime("%Y-%m-%d %H:%M"),
                                "subject": subject, "row": name, **row}) + "\n")
    table = []
    for subject in args.subjects.split(","):
        model_type, config, rows = SUBJECTS[subject]
        if args.tiny:
            config = {**config, **TINY, **({"num_key_value_heads": 2}
                                           if "num_key_value_heads" in config else {})}
        t = time.perf_counter()
        original = build(args.work / subject / "original", model_type, config, device)
        print(f"{subject}: built in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        t = time.perf_counter()
        results = {"original": measure(original, "original", device, args)}
        log(subject, "original", results["original"])
        print(f"{subject} original: measured in {time.perf_counter() - t:.1f} s",
              file=sys.stderr, flush=True)
        for name, passes in rows.items():
            if wanted and name not in wanted:
                continue
            out = args.work / subject / name.replace(" ", "").replace("+", "_")
            t = time.perf_counter()
            try:   # one row failing (a pass refusing this family, say) must not end the sweep
                compress.apply(str(original), [dict(p) for p in passes], out, overwrite=True,
                               device=device)
                made = time.perf_counter() - t
                print(f"{subject} {name}: applied in {made:.1f} s", file=sys.stderr, flush=True)
                results[name] = {**measure(out, name, device, args), "apply_s": made}
                print(f"{subject} {name}: measured in {time.perf_counter() - t - made:.1f} s, "
                      f"{results[name]['decode_tokens_per_s']:.1f} tok/s ({results[name]['method']})",
                      file=sys.stderr, flush=True)
            except Exception as exc:  # noqa: BLE001 (reported in the table)
                results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
                print(f"{subject} {name}: {results[name]['error']}", file=sys.stderr)
            log(subject, name, results[name])
        table.append((subject, results))

    print(f"\n{device}, batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens "
          "(compress bench's harness)")
    print("| subject | row | decode tok/s | vs original | vs int4 | prefill tok/s | "
          "model GB | method |")
    print("|---|---|---|---|---|---|---|---|")
    for subject, results in table:
        base = results["original"]["decode_tokens_per_s"]
        int4 = results.get("int4", {}).get("decode_tokens_per_s")
        for name, r in results.items():
            if "error" in r:
                print(f"| {subject} | {name} | error: {r['error'][:90]} | | | | | |")
                continue
            d = r["decode_tokens_per_s"]
            vs_int4 = f"{d / int4:.3f}x" if int4 and "int4" in name else "-"
            print(f"| {subject} | {name} | {d:.1f} | {d / base:.3f}x | {vs_int4} | "
                  f"{r['prefill_tokens_per_s']:.0f} | {r['model_bytes'] / 1e9:.2f} | "
                  f"{r['method']} |")


if __name__ == "__main__":
    main()
