"""GPTQ speed on a GPU: ours (`compress apply`, W4A16 g128) against llm-compressor 0.14 `oneshot`
(GPTQModifier scheme W4A16, lm_head ignored) on Llama-3-8B-shaped models with random weights,
calibrated on the same token windows. Prints a table last; full logs and JSON under --out.

    python evaluate/gptq_gpu_speed.py --out $OUT                  # H200: 4 and 32 layers, peer
    python evaluate/gptq_gpu_speed.py --out $OUT --layers 32 --peer-layers 32 --kinds "" \
        --budget 540                                 # the 32-layer model side by side
    python evaluate/gptq_gpu_speed.py --device cpu --layers 2 --peer-layers 2 --hidden 256 \\
        --intermediate 512 --heads 4 --kv-heads 2 --vocab 512 --samples 4 --seq 64   # CPU check

SPEED ONLY: the weights are random and the calibration text is random printable characters read
by a byte-level tokenizer (token ids < 257); nothing here measures accuracy.
Each measured run is a child process (its own peak host RSS and peak GPU memory): the wall time
is from the start of `compress apply` (resp. model load + `oneshot` + save) to the written
artifact, imports excluded. Models are written layer by layer into safetensors shards (--work,
local disk: about 16 GB for 32 layers) so building never holds the whole model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import string
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RECIPES = {   # ours; the calibration section is filled in from the arguments
    "gptq": [{"pass": "quantize", "format": "int4", "group_size": 128, "symmetric": True,
              "method": "gptq", "ignore": ["lm_head"]}],
    # like for like with the peer's defaults (min-max group scales; ours searches them by
    # H-weighted MSE by default, which costs solve time)
    "gptq-minmax": [{"pass": "quantize", "format": "int4", "group_size": 128, "symmetric": True,
                     "method": "gptq", "scale_search": "minmax", "ignore": ["lm_head"]}],
    "sparsegpt-2:4": [{"pass": "sparsify", "method": "sparsegpt", "pattern": "2:4",
                       "block_size": 128, "damp": 0.01, "ignore": ["lm_head"]}],
    "awq+gptq": [{"pass": "quantize", "format": "int4", "group_size": 128, "symmetric": True,
                  "method": "gptq", "awq": True, "ignore": ["lm_head"]}],
}


# ---------------------------------------------------------------------------------------------
# building the model and the calibration text

def byte_tokenizer():
    """Byte-level BPE without merges: 256 byte tokens + <eos> (id 256), built in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<eos>")


def build_model(path: Path, args, layers: int) -> Path:
    """A Llama config and random bf16 weights (std 0.02, norms 1), one shard per layer."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (path / "model.safetensors.index.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.intermediate, num_hidden_layers=layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=max(8192, args.seq), rope_theta=500000.0,
                         tie_word_embeddings=False, bos_token_id=256, eos_token_id=256,
                         torch_dtype="bfloat16")
    config.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    dev = "cuda" if args.device == "cuda" else "cpu"
    gen = torch.Generator(dev).manual_seed(0)
    h, i, hd = args.hidden, args.intermediate, args.hidden // args.heads
    kv = args.kv_heads * hd

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, device=dev, dtype=torch.bfloat16) * 0.02).cpu()

    weight_map, total = {}, 0

    def write(name: str, tensors: dict) -> None:
        nonlocal total
        save_file(tensors, path / name, metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()

    write("rest.safetensors", {"model.embed_tokens.weight": rand(args.vocab, h),
                               "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                               "lm_head.weight": rand(args.vocab, h)})
    for n in range(layers):
        p = f"model.layers.{n}."
        write(f"layer-{n:05d}.safetensors", {
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
            p + "mlp.down_proj.weight": rand(h, i),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return path


def calibration_text(path: Path, args) -> Path:
    """Random printable ASCII (one byte token each), enough for samples x seq tokens."""
    rng = random.Random(0)
    chars = string.ascii_letters + string.digits + " .,;:()\n"
    need = args.samples * args.seq * 2 + 10_000
    path.write_text("".join(rng.choices(chars, k=need)))
    return path


def calibration(args, text: Path) -> dict:
    return {"source": str(text), "samples": args.samples, "seq_len": args.seq, "seed": 0,
            "batch_size": args.batch_size}


# ---------------------------------------------------------------------------------------------
# measured runs (each in its own child process)

def peaks() -> dict:
    import torch

    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_gpu_gib": gpu / 2**30, "peak_rss_gib": rss_kib / 2**20}


def job_ours(spec: dict) -> dict:
    import torch
    import transformers.models.llama.modeling_llama
    import yaml

    import compress.pipeline
    from compress.cli import main

    recipe = Path(spec["out"]) / f"{spec['name']}.yaml"
    recipe.write_text(yaml.safe_dump({"calibration": spec["calibration"],
                                      "passes": RECIPES[spec["kind"]]}, sort_keys=False))
    artifact = Path(spec["work"]) / f"artifact-{spec['name']}"
    sys.argv = ["compress", "apply", str(recipe), spec["model"], "-o", str(artifact),
                "--allow-path", str(Path(spec["calibration"]["source"]).parent),
                "--overwrite", "--restart", "--device", spec["device"], "--dtype", "bfloat16"]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        main()
    except SystemExit as exc:
        if exc.code:
            raise
    seconds = time.perf_counter() - start
    report = json.loads((artifact / "report.json").read_text())
    return {"seconds": seconds, **peaks(),
            "pass_seconds": sum(p.get("seconds") or 0 for p in report.get("passes", []))}


def job_peer(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.load(spec["ids"])
    data = Dataset.from_dict({"input_ids": ids.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist()})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    loaded = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=data,
            recipe=GPTQModifier(scheme="W4A16", targets="Linear", ignore=["lm_head"]),
            num_calibration_samples=len(ids), max_seq_length=ids.shape[1])
    done = time.perf_counter()
    model.save_pretrained(Path(spec["work"]) / f"artifact-{spec['name']}", save_compressed=True)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "load_seconds": loaded - start, "oneshot_seconds": done - loaded,
            **peaks()}


def run_child(spec: dict, out: Path, timeout: float) -> dict:
    """Run one job in a child process; its stdout/stderr go to out/NAME.log."""
    log = out / f"{spec['name']}.log"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(log, "w") as fh:
        try:
            proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(spec)],
                                  stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s (see {log.name})"}
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = log.read_text().strip().splitlines()[-1:] or ["?"]
        return {"error": f"exit {proc.returncode}: {tail[0][:160]} (see {log.name})"}
    return json.loads(lines[-1][len("RESULT "):])


# ---------------------------------------------------------------------------------------------

def layer_bytes(args) -> int:
    """One decoder layer in bf16."""
    h, i, kv = args.hidden, args.intermediate, args.kv_heads * (args.hidden // args.heads)
    return 2 * (2 * h * h + 2 * kv * h + 3 * h * i + 2 * h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", help=argparse.SUPPRESS)   # internal: one measured run
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gptq_speed")))
    parser.add_argument("--work", type=Path, default=Path("/tmp/gptq_speed_work"),
                        help="models and artifacts (local disk, not --out)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=32, help="layers of our big run")
    parser.add_argument("--peer-layers", type=int, default=4, help="layers of the side by side")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="calibration windows a forward (default: compress's own choice)")
    parser.add_argument("--budget", type=float, default=400,
                        help="seconds for everything; later stages are skipped when short")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--kinds", default="sparsegpt-2:4,awq+gptq",
                        help="our other methods run on the side-by-side model ('' for none)")
    parser.add_argument("--only-big", action="store_true",
                        help="only ours on --layers layers (no small run, peer or other methods)")
    args = parser.parse_args()
    unknown = [k for k in filter(None, args.kinds.split(",")) if k not in RECIPES]
    if unknown:
        parser.error(f"--kinds: unknown {unknown}; choose from {sorted(RECIPES)}")
    if args.job:
        spec = json.loads(args.job)
        result = (job_peer if spec["kind"] == "peer" else job_ours)(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return
    begin = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    left = lambda: args.budget - (time.perf_counter() - begin)
    text = calibration_text(args.work / "calibration.txt", args)
    calib = calibration(args, text)
    rows: list[tuple[str, int, dict]] = []

    def record(name: str, layers: int, result: dict) -> None:
        rows.append((name, layers, result))
        print(json.dumps({"run": name, "layers": layers, **result}), flush=True)
        (args.out / "results.json").write_text(json.dumps(
            [{"run": n, "layers": k, **r} for n, k, r in rows], indent=1))

    common = {"out": str(args.out), "work": str(args.work), "device": args.device,
              "calibration": calib}
    if args.only_big:
        t = time.perf_counter()
        big = build_model(args.work / f"llama-{args.layers}l", args, args.layers)
        print(f"built {big} in {time.perf_counter() - t:.1f} s", flush=True)
        record("ours gptq", args.layers, run_child(
            {**common, "name": f"ours-gptq-{args.layers}l", "kind": "gptq", "model": str(big)},
            args.out, left()))
        print_table(rows, args)
        return
    t = time.perf_counter()
    small = build_model(args.work / f"llama-{args.peer_layers}l", args, args.peer_layers)
    print(f"built {small} in {time.perf_counter() - t:.1f} s", flush=True)
    record("ours gptq", args.peer_layers, run_child(
        {**common, "name": f"ours-gptq-{args.peer_layers}l", "kind": "gptq",
         "model": str(small)}, args.out, left()))
    peer_ok = not args.skip_peer
    if peer_ok:
        try:
            import llmcompressor
        except ImportError as exc:
            peer_ok = False
            print(f"peer skipped: llmcompressor not importable ({exc})", flush=True)
    if peer_ok:
        import torch

        from compress.calib import CalibrationConfig, calibration_windows

        ids = calibration_windows(byte_tokenizer(), CalibrationConfig(**calib))
        torch.save(ids, args.work / "calibration_ids.pt")   # the very windows ours used
        record("llm-compressor gptq", args.peer_layers, run_child(
            {**common, "name": f"peer-gptq-{args.peer_layers}l", "kind": "peer",
             "model": str(small), "ids": str(args.work / "calibration_ids.pt")},
            args.out, left()))
    # The big run gets as many layers as the time left allows (from ours' time a layer on the
    # small model; about 1 s a layer to build, 60 s kept for the rest): the table says how many.
    first = rows[0][2]
    per_layer = first.get("seconds", 1e9) / args.peer_layers
    fit = int((left() - 60) / (per_layer * 1.15 + 1.0))
    big_layers = min(args.layers, fit)
    if big_layers < args.layers:
        print(f"time left allows {big_layers} of {args.layers} layers for the big run", flush=True)
    if big_layers > args.peer_layers:
        t = time.perf_counter()
        big = build_model(args.work / f"llama-{big_layers}l", args, big_layers)
        print(f"built {big} in {time.perf_counter() - t:.1f} s", flush=True)
        record("ours gptq", big_layers, run_child(
            {**common, "name": f"ours-gptq-{big_layers}l", "kind": "gptq", "model": str(big)},
            args.out, left()))
    for kind in filter(None, args.kinds.split(",")):
        if left() > 30:
            record(f"ours {kind}", args.peer_layers, run_child(
                {**common, "name": f"ours-{kind.replace(':', '')}-{args.peer_layers}l",
                 "kind": kind, "model": str(small)}, args.out, left()))
    print_table(rows, args)


def print_table(rows, args) -> None:
    peer = next((r for n, k, r in rows if n.startswith("llm-compressor") and "seconds" in r), None)
    activations = 2 * args.samples * args.seq * args.hidden * 2     # inputs + outputs, bf16
    budget_gib = 1.1 * (layer_bytes(args) + activations) / 2**30
    print(f"\nGPU memory goal: <= 1.1 x (one layer {layer_bytes(args) / 2**30:.2f} GiB + "
          f"activations {activations / 2**30:.2f} GiB) = {budget_gib:.2f} GiB")
    print(f"{'run':24} {'layers':>6} {'wall s':>8} {'s/layer':>8} {'pass s':>8} {'GPU GiB':>8} "
          f"{'RSS GiB':>8} {'vs peer/layer':>13}")
    for name, layers, r in rows:
        if "seconds" not in r:
            print(f"{name:24} {layers:6}  {r.get('error', '?')}")
            continue
        per = r["seconds"] / layers
        ratio = f"{peer['seconds'] / args.peer_layers / per:12.2f}x" if peer else f"{'-':>13}"
        core = r.get("pass_seconds", r.get("oneshot_seconds", 0))
        print(f"{name:24} {layers:6} {r['seconds']:8.1f} {per:8.2f} {core:8.1f} "
              f"{r['peak_gpu_gib']:8.2f} {r['peak_rss_gib']:8.2f} {ratio}")
    print("wall s: apply (ours) or load + oneshot + save (peer); pass s: the pass alone (ours) "
          "or oneshot alone (peer). Random weights and random text: speed only.")


if __name__ == "__main__":
    main()
