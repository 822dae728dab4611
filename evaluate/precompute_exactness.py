"""Exactness of a precomputed artifact against its base model: max abs logit difference over
evaluation windows and greedy generation. Usage:

    python evaluate/precompute_exactness.py ARTIFACT BASELINE \
        [--windows 8] [--seq-len 256] [--prompts 4]
"""

from __future__ import annotations

import argparse
import json

import torch

from compress.calib import evaluation_windows
from compress.models import load_model, set_offline_unless_asked


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact")
    parser.add_argument("baseline")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=4, help="greedy runs (32-token prompts)")
    args = parser.parse_args()
    base, art = load_model(args.baseline), load_model(args.artifact)
    ids = evaluation_windows(base.tokenizer, "stdlib", args.seq_len, args.windows * args.seq_len)
    diff, same = 0.0, []
    with torch.no_grad():
        for window in ids.split(1):
            diff = max(diff, (art.model(window).logits - base.model(window).logits).abs().max()
                       .item())
        for window in ids[:args.prompts].split(1):
            prompt = window[:, :32]
            kwargs = {"max_new_tokens": args.new_tokens, "do_sample": False}
            same.append(torch.equal(art.model.generate(prompt, **kwargs),
                                    base.model.generate(prompt, **kwargs)))
    print(json.dumps({"windows": ids.shape[0], "seq_len": ids.shape[1],
                      "max_abs_logit_diff": diff, "greedy_same_tokens": all(same),
                      "greedy_prompts": len(same), "new_tokens": args.new_tokens}))


if __name__ == "__main__":
    set_offline_unless_asked()
    main()
