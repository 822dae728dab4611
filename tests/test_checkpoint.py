"""One reader for every checkpoint (compress.runtime.checkpoint): a sharded safetensors
directory, a GGUF and a compress artifact give their tensors under the names the model uses."""

from __future__ import annotations

import json

import pytest
import torch
from support import tiny_llama


def _sharded_dir(path):
    """tiny_llama saved in several shards with an index (the largest models' layout)."""
    model = tiny_llama()
    model.save_pretrained(path, max_shard_size="40KB")
    return model, path


def test_a_sharded_directory_reads_tensors_and_layers_lazily(tmp_path):
    from compress.runtime.checkpoint import Checkpoint

    model, path = _sharded_dir(tmp_path / "m")
    assert len(list(path.glob("*.safetensors"))) > 2 and (path / "model.safetensors.index.json"
                                                         ).is_file()
    checkpoint = Checkpoint.open(path)
    state = model.state_dict()
    assert checkpoint.kind == "dir" and checkpoint.config().num_hidden_layers == 2
    assert set(checkpoint.tensor_names()) == set(state)
    layer = checkpoint.read_prefix("model.layers.1.")
    expected = {k.removeprefix("model.layers.1."): v for k, v in state.items()
                if k.startswith("model.layers.1.")}
    assert layer.keys() == expected.keys()
    assert all(torch.equal(layer[k], expected[k]) for k in expected)
    norm = checkpoint.read("model.norm.weight", torch.bfloat16)
    assert norm.dtype == torch.bfloat16 and torch.equal(norm, state["model.norm.weight"].bfloat16())
    info = checkpoint.tensor_info()
    assert info["model.embed_tokens.weight"] == ("F32", [256, 64])


def test_an_unknown_tensor_name_is_one_line(tmp_path):
    from compress.errors import CompressError
    from compress.runtime.checkpoint import Checkpoint

    _, path = _sharded_dir(tmp_path / "m")
    with pytest.raises(CompressError, match="no tensor 'model.layers.9.mlp.up_proj.weight'"):
        Checkpoint.open(path).read("model.layers.9.mlp.up_proj.weight")


def test_a_shard_truncated_after_opening_is_one_line(tmp_path):
    """The header checks run at open; a shard damaged later still fails as one CompressError."""
    from compress.errors import CompressError
    from compress.runtime.checkpoint import Checkpoint

    _, path = _sharded_dir(tmp_path / "m")
    checkpoint = Checkpoint.open(path)
    shard = checkpoint.index["model.layers.1.mlp.up_proj.weight"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CompressError, match=f"{shard.name} is corrupt or truncated"):
        checkpoint.read_prefix("model.layers.1.")


def test_the_stored_dtype_comes_from_config_json(tmp_path):
    from compress.runtime.checkpoint import Checkpoint

    _, path = _sharded_dir(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(config))
    assert Checkpoint.open(path).stored_dtype() == torch.bfloat16


def test_a_gguf_reads_under_the_model_names(smollm2):
    """The GGUF's blocks, dequantized under Hugging Face names, are the loaded model's weights
    (Q/K rows permuted back as transformers does)."""
    from compress.runtime.checkpoint import Checkpoint

    checkpoint = Checkpoint.open("smollm2-135m")
    state = smollm2.model.state_dict()
    assert checkpoint.kind == "gguf" and checkpoint.stored_dtype() is None
    assert set(checkpoint.tensor_names()) == set(state) - {"lm_head.weight"}  # tied
    layer = checkpoint.read_prefix("model.layers.4.self_attn.")
    assert sorted(layer) == ["k_proj.weight", "o_proj.weight", "q_proj.weight", "v_proj.weight"]
    for name, tensor in layer.items():
        assert torch.equal(tensor, state[f"model.layers.4.self_attn.{name}"]), name


def test_an_artifact_reads_its_packed_tensors(tmp_path):
    """An artifact's tensors are read as stored: packed codes and scales, not weights."""
    import compress
    from compress.passes import QuantizeConfig
    from compress.runtime.checkpoint import Checkpoint

    config = QuantizeConfig.model_validate({"pass": "quantize", "format": "int4",
                                            "group_size": 32, "ignore": ["lm_head"]})
    compress.apply(tiny_llama(), [config], tmp_path / "art", device="cpu")
    checkpoint = Checkpoint.open(tmp_path / "art")
    assert checkpoint.kind == "artifact"
    q_proj = checkpoint.read_prefix("model.layers.0.self_attn.q_proj.")
    assert {"weight_packed", "weight_scale"} <= set(q_proj)
    assert q_proj["weight_packed"].dtype == torch.int32
    before = checkpoint.fingerprint()
    (tmp_path / "art" / "recipe.yaml").write_text("passes: []  # edited\n")
    assert Checkpoint.open(tmp_path / "art").fingerprint() != before


def test_an_index_that_disagrees_with_its_shards_is_one_line(tmp_path):
    """A name dropped from the weight_map, or mapped to a shard without it, would make a reader
    of the index miss or misread a tensor."""
    from compress.errors import CompressError
    from compress.runtime.checkpoint import Checkpoint

    _, path = _sharded_dir(tmp_path / "m")
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    files = list(index["weight_map"].values())
    name = next(n for n, f in index["weight_map"].items() if files.count(f) > 1)  # shares a shard
    dropped = {**index, "weight_map": {k: v for k, v in index["weight_map"].items() if k != name}}
    index_file.write_text(json.dumps(dropped))
    with pytest.raises(CompressError, match=f"holds {name}, which the weight_map does not list"):
        Checkpoint.open(path)
    other = next(f for f in set(index["weight_map"].values()) if f != index["weight_map"][name])
    moved = {**index, "weight_map": {**index["weight_map"], name: other}}
    index_file.write_text(json.dumps(moved))
    with pytest.raises(CompressError, match=f"{name} is not in {other}"):
        Checkpoint.open(path)
