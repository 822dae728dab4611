"""The residual-stream rotation of the issue-17 ablation (evaluate/acc/rotate.py) must leave the
float model's function unchanged: otherwise its quantized figures measure a different model."""

import importlib.util
import sys
from pathlib import Path

import torch
from support import tiny_llama

SCRIPT = Path(__file__).resolve().parents[1] / "evaluate" / "acc" / "rotate.py"
sys.path.insert(0, str(SCRIPT.parents[1]))
spec = importlib.util.spec_from_file_location("rotate", SCRIPT)
rotate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rotate)


def test_random_orthogonal_is_orthogonal():
    q = rotate.random_orthogonal(24, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(24, dtype=torch.float64))
    assert not torch.allclose(q, rotate.random_orthogonal(24, seed=4))


def test_rotated_model_computes_the_same_logits():
    model = tiny_llama(tie_word_embeddings=True).double()
    with torch.no_grad():          # norms with non-unit weights, so that folding matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    ids = torch.randint(0, 256, (2, 16))
    before = model(ids).logits
    q = rotate.random_orthogonal(model.config.hidden_size)
    rotate.rotate_llama(model, q)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight,
                              tiny_llama().double().model.layers[0].self_attn.q_proj.weight)
    torch.testing.assert_close(model(ids).logits, before)
