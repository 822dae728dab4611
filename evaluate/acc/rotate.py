"""Ablation (issue 17): an orthogonal rotation of the residual stream before quantizing
(QuaRot-style, residual stream only), measured with the peer script's files and formula.

    PYTHONPATH=. OMP_NUM_THREADS=1 python evaluate/acc/rotate.py --work /work/peer \\
        --out /tmp/rot --methods rtn gptq

What it does to a Llama-style model (SmolLM2), all in float64 and then stored in float32:
 1. folds every RMSNorm's weight into the linears that read its output (q/k/v after
    input_layernorm, gate/up after post_attention_layernorm, lm_head after the final norm) and
    sets the norm weights to 1: RMSNorm without a weight commutes with an orthogonal Q
    (||x Q|| = ||x||), so the residual stream can be rotated;
 2. x -> x Q everywhere in the residual stream: embedding E Q, the readers' weights W Q, the
    writers' (o_proj, down_proj) Qᵀ W, lm_head W Q (untied from the embedding).
The rotated model equals the original in exact arithmetic; its float perplexity is checked
against the original's before any quantized figure is printed. Not rotated: the inputs of o_proj
and down_proj (QuaRot rotates them online, with a Hadamard inside the attention and MLP, which
needs runtime support we do not have), and the KV cache.

Q: a random orthogonal matrix (QR of a Gaussian, seed 0, signs fixed so it is Haar-distributed):
SmolLM2's hidden size 576 = 64 * 9 has no Sylvester Hadamard matrix.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peer_llmcompressor as peer


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """A Haar-random orthogonal [n, n] float64 matrix."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def fold_norm(norm: torch.nn.Module, readers: list[torch.nn.Linear]) -> None:
    """y = W (g * x̂) = (W diag(g)) x̂: the norm's weight moves into its readers' columns."""
    g = norm.weight.data.double()
    for linear in readers:
        linear.weight.data = (linear.weight.data.double() * g).to(linear.weight.dtype)
    norm.weight.data.fill_(1.0)


def rotate_in(linear: torch.nn.Linear, q: torch.Tensor) -> None:
    """A reader of the rotated stream: y = W x = (W Q)(Qᵀ x), x' = Qᵀ x (row vectors: x Q)."""
    linear.weight.data = (linear.weight.data.double() @ q).to(linear.weight.dtype)


def rotate_out(linear: torch.nn.Linear, q: torch.Tensor) -> None:
    """A writer into the rotated stream: its output y becomes Qᵀ y, i.e. weight Qᵀ W."""
    linear.weight.data = (q.T @ linear.weight.data.double()).to(linear.weight.dtype)
    assert linear.bias is None, "a writer's bias would rotate too"


def rotate_llama(model, q: torch.Tensor) -> None:
    """Fold the norms and rotate the residual stream of a LlamaForCausalLM in place."""
    inner = model.model
    head = model.lm_head
    if head.weight is inner.embed_tokens.weight:       # untie: the two now differ
        head.weight = torch.nn.Parameter(head.weight.data.clone())
        model.config.tie_word_embeddings = False
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        fold_norm(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        fold_norm(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            rotate_in(linear, q)
        rotate_out(attn.o_proj, q)
        rotate_out(mlp.down_proj, q)
    fold_norm(inner.norm, [head])
    rotate_in(head, q)
    emb = inner.embed_tokens.weight
    emb.data = (emb.data.double() @ q).to(emb.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/work/peer"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/rot"))
    parser.add_argument("--setting", default="int4-sym-g192", choices=list(peer.SETTINGS))
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--identity", action="store_true",
                        help="fold the norms but rotate by the identity: separates the effect "
                             "of the folding from the rotation's")
    parser.add_argument("--ours", default='{"act_order": true, "scale_search": "mse"}')
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name in ("calib.pt", "eval.pt"):
        if not (out / name).exists():
            (out / name).symlink_to((args.work / name).resolve())
    if not (out / "hf" / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(args.work / "hf", dtype=torch.float32)
        n = model.config.hidden_size
        rotate_llama(model, torch.eye(n, dtype=torch.float64) if args.identity
                     else random_orthogonal(n, args.seed))
        model.save_pretrained(out / "hf")
        AutoTokenizer.from_pretrained(args.work / "hf").save_pretrained(out / "hf")
    windows = torch.load(out / "eval.pt")
    reference = json.loads((args.work / "ours-float.json").read_text())["perplexity"]
    rotated = peer.cached(out / "rotated-float.json", False, lambda: {"perplexity": peer.perplexity(
        AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval(), windows)})
    print(f"float perplexity: original {reference:.6f}, rotated {rotated['perplexity']:.6f}",
          flush=True)
    if abs(rotated["perplexity"] - reference) > 1e-4 * reference:
        sys.exit("the rotated model is not the original model: no quantized figure")
    options = json.loads(args.ours)
    for method in args.methods:
        row = peer.cached(out / f"rotated-{args.setting}-{method}.json", False,
                          lambda m=method: peer.run_ours(out, args.setting, m, options))
        unrotated = args.work / f"ours-{args.setting}-{method}.json"
        base = json.loads(unrotated.read_text())["perplexity"] if unrotated.exists() else None
        print(f"{args.setting} {method}: rotated {row['perplexity']:.3f} ({row['seconds']:.0f} s,"
              f" {row['date']}), not rotated {base}", flush=True)


if __name__ == "__main__":
    main()
