"""Peer comparison: llm-compressor's SparseGPT and Wanda 2:4 modifiers on SmolLM2-135M, fed the
exact calibration windows our recipes use, evaluated with `compress evaluate` like ours.

Three steps, two environments (llm-compressor pins its own transformers, so it lives in
/work/venv-llmc; see evaluate/RESULTS.md "2:4 sparsity" for the commands):

  1. /work/venv:      python evaluate/peer_llmcompressor_sparsity.py prepare --out out/peer
     writes out/peer/base (SmolLM2-135M as a float32 HF directory) and out/peer/calib.pt
     (the token windows of recipes/sparse24-sparsegpt.yaml's calibration section).
  2. /work/venv-llmc: python evaluate/peer_llmcompressor_sparsity.py run --method sparsegpt
     (and --method wanda) writes out/peer/llmc-<method> (dense weights with 2:4 zeros).
  3. /work/venv:      python -m compress evaluate out/peer/llmc-<method> --baseline smollm2-135m
"""

from __future__ import annotations

import argparse
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "sparse24-sparsegpt.yaml"


def prepare(out: Path) -> None:
    """Export the model and our calibration windows (runs in the compress environment)."""
    import torch

    from compress.calib import calibration_windows
    from compress.formats.artifact import save_artifact
    from compress.models import load_model
    from compress.recipe import load_recipe

    loaded = load_model("smollm2-135m")
    # An artifact with no passes is a plain HF directory (the GGUF-dequantized model cannot
    # go through save_pretrained: transformers refuses to re-serialize a gguf-loaded model).
    save_artifact(loaded.model, loaded.tokenizer, out / "base", "", {}, overwrite=True)
    for extra in ("recipe.yaml", "report.json"):  # llm-compressor would try to merge recipe.yaml
        (out / "base" / extra).unlink()
    ids = calibration_windows(loaded.tokenizer, load_recipe(RECIPE).calibration)
    torch.save(ids, out / "calib.pt")
    print(f"wrote {out / 'base'} and {out / 'calib.pt'} {tuple(ids.shape)}")


def run(out: Path, method: str) -> None:
    """llm-compressor oneshot with its 2:4 modifier (runs in /work/venv-llmc)."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.load(out / "calib.pt")
    data = Dataset.from_dict({"input_ids": ids.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    # The same settings as our recipe: 2:4, block 128, damping 0.01, every decoder Linear.
    common = dict(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["lm_head"])
    modifier = (SparseGPTModifier(block_size=128, dampening_frac=0.01, **common)
                if method == "sparsegpt" else WandaPruningModifier(**common))
    oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=[modifier],
            num_calibration_samples=len(ids), max_seq_length=ids.shape[1])
    target = out / f"llmc-{method}"
    model.save_pretrained(target, save_compressed=False)
    tokenizer.save_pretrained(target)
    print(f"wrote {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["prepare", "run"])
    parser.add_argument("--method", choices=["sparsegpt", "wanda"], default="sparsegpt")
    parser.add_argument("--out", type=Path, default=Path("out/peer"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    prepare(args.out) if args.step == "prepare" else run(args.out, args.method)


if __name__ == "__main__":
    main()
