"""Loading a model source (compress.runtime.checkpoint reads it) and architecture adapters.

An `Arch` says where a family keeps its decoder layers, attention and MLP projections and norms,
so passes are written once against it. Adding a family is adding a table entry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from compress.errors import CompressError, UsageError
from compress.runtime.checkpoint import Checkpoint


@dataclass(frozen=True)
class Arch:
    """Where things live in one model family. Paths inside a layer are relative to the layer."""

    name: str
    layers: str                      # the ModuleList of blocks, from the model root
    embed: str | None = None         # token embedding
    final_norm: str | None = None    # norm before the LM head
    lm_head: str | None = None       # None for encoders
    q: str | None = None             # query projection, or the fused qkv projection
    k: str | None = None             # None when q is a fused qkv projection
    v: str | None = None
    o: str | None = None             # attention output projection
    mlp_in: tuple[str, ...] = ()     # projections reading the MLP input (gate, up / fc1)
    mlp_out: str | None = None       # down_proj / fc2
    attn_norm: str | None = None     # norm before attention (after, for post-LN)
    mlp_norm: str | None = None      # norm before the MLP; None when the block shares attn_norm
    norm: Literal["rms", "layer"] = "rms"
    placement: Literal["pre", "post"] = "pre"
    parallel: bool = False           # attention and MLP read the same input (GPT-J, Phi, NeoX)
    conv1d: bool = False             # GPT-2 style Conv1D: weight is [in, out]
    encoder: bool = False            # BERT family: AutoModel, bidirectional
    extra_embeds: tuple[str, ...] = field(default_factory=tuple)  # positions, embed norms
    qkv_per_head: bool = False       # fused qkv rows are [head][q, k, v] (NeoX), not [q][k][v]
    alibi: bool = False              # per-head position slopes depend on the head's index
    # False: a family without a table row. Its layers were found in the model itself; passes
    # that need the attention / MLP layout (require()) refuse it, the others infer what they
    # need (input groups, AWQ norm mappings) from the layer (compress.calib.LayerStep).
    known: bool = True

    def require(self, what: str) -> None:
        """One-line refusal for a pass that needs this family's layout in the table."""
        if not self.known:
            raise UsageError(f"{what} needs the attention/MLP layout of the model family, and "
                             f"compress has no table entry for {self.name!r} (it has: "
                             f"{', '.join(sorted(ARCHES))}); quantize and sparsify work on "
                             "any model")

    @property
    def fused_qkv(self) -> bool:
        return self.k is None

    @property
    def mlp(self) -> str:
        """The MLP block holding mlp_in and mlp_out ("mlp")."""
        return self.mlp_out.rpartition(".")[0]

    def linear_groups(self) -> list[tuple[str, ...]]:
        """Projections of one layer grouped by the input they read (they share a Hessian).
        Empty for an unknown family: the calibrator infers them (LayerStep.input_groups)."""
        if not self.known:
            return []
        qkv = (self.q,) if self.fused_qkv else (self.q, self.k, self.v)
        if self.parallel and self.mlp_norm is None:
            return [qkv + self.mlp_in, (self.o,), (self.mlp_out,)]
        return [qkv, (self.o,), self.mlp_in, (self.mlp_out,)]

    def fused_groups(self) -> list[tuple[str, ...]]:
        """Projections serving runtimes fuse into one matrix (qkv_proj, gate_up_proj): they
        must share a format. Unknown family: by the usual names (q/k/v_proj, gate/up_proj)."""
        if not self.known:
            return [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                    ("mlp.gate_proj", "mlp.up_proj")]
        groups = [] if self.fused_qkv else [(self.q, self.k, self.v)]
        return groups + ([self.mlp_in] if len(self.mlp_in) > 1 else [])

    def linears(self) -> list[str]:
        return [name for group in self.linear_groups() for name in group]

    def norm_readers(self) -> list[tuple[str, tuple[str, ...]]]:
        """Each norm of a layer with the projections that read its output (pre-LN blocks)."""
        qkv = (self.q,) if self.fused_qkv else (self.q, self.k, self.v)
        if self.mlp_norm is None:  # parallel block: one norm feeds attention and MLP
            return [(self.attn_norm, qkv + self.mlp_in)]
        return [(self.attn_norm, qkv), (self.mlp_norm, self.mlp_in)]

    def stream_writers(self) -> tuple[str, ...]:
        """Projections of a layer whose outputs are added into the residual stream."""
        return (self.o, self.mlp_out)


_LLAMA = dict(layers="model.layers", embed="model.embed_tokens", final_norm="model.norm",
              lm_head="lm_head", q="self_attn.q_proj", k="self_attn.k_proj",
              v="self_attn.v_proj", o="self_attn.o_proj",
              mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj",
              attn_norm="input_layernorm", mlp_norm="post_attention_layernorm")

ARCHES: dict[str, Arch] = {
    **{t: Arch(name=t, **_LLAMA) for t in ("llama", "mistral", "qwen2", "qwen3")},
    "gpt2": Arch(name="gpt2", layers="transformer.h", embed="transformer.wte",
                 final_norm="transformer.ln_f", lm_head="lm_head", q="attn.c_attn", k=None,
                 v=None, o="attn.c_proj", mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj",
                 attn_norm="ln_1", mlp_norm="ln_2", norm="layer", conv1d=True,
                 extra_embeds=("transformer.wpe",)),
    "opt": Arch(name="opt", layers="model.decoder.layers", embed="model.decoder.embed_tokens",
                final_norm="model.decoder.final_layer_norm", lm_head="lm_head",
                q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                o="self_attn.out_proj", mlp_in=("fc1",), mlp_out="fc2",
                attn_norm="self_attn_layer_norm", mlp_norm="final_layer_norm", norm="layer",
                extra_embeds=("model.decoder.embed_positions",)),
    "gpt_neox": Arch(name="gpt_neox", layers="gpt_neox.layers", embed="gpt_neox.embed_in",
                     final_norm="gpt_neox.final_layer_norm", lm_head="lm_head",
                     q="attention.query_key_value", k=None, v=None, o="attention.dense",
                     mlp_in=("mlp.dense_h_to_4h",), mlp_out="mlp.dense_4h_to_h",
                     attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
                     norm="layer", qkv_per_head=True),
    "gptj": Arch(name="gptj", layers="transformer.h", embed="transformer.wte",
                 final_norm="transformer.ln_f", lm_head="lm_head", q="attn.q_proj",
                 k="attn.k_proj", v="attn.v_proj", o="attn.out_proj", mlp_in=("mlp.fc_in",),
                 mlp_out="mlp.fc_out", attn_norm="ln_1", mlp_norm=None, norm="layer",
                 parallel=True),
    "phi": Arch(name="phi", layers="model.layers", embed="model.embed_tokens",
                final_norm="model.final_layernorm", lm_head="lm_head", q="self_attn.q_proj",
                k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.dense",
                mlp_in=("mlp.fc1",), mlp_out="mlp.fc2", attn_norm="input_layernorm",
                mlp_norm=None, norm="layer", parallel=True),
    "bloom": Arch(name="bloom", layers="transformer.h", embed="transformer.word_embeddings",
                  final_norm="transformer.ln_f", lm_head="lm_head",
                  q="self_attention.query_key_value", k=None, v=None, o="self_attention.dense",
                  mlp_in=("mlp.dense_h_to_4h",), mlp_out="mlp.dense_4h_to_h",
                  attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
                  norm="layer", qkv_per_head=True, alibi=True,
                  extra_embeds=("transformer.word_embeddings_layernorm",)),
    "bert": Arch(name="bert", layers="encoder.layer", embed="embeddings.word_embeddings",
                 final_norm=None, lm_head=None, q="attention.self.query",
                 k="attention.self.key", v="attention.self.value", o="attention.output.dense",
                 mlp_in=("intermediate.dense",), mlp_out="output.dense",
                 attn_norm="attention.output.LayerNorm", mlp_norm="output.LayerNorm",
                 norm="layer", placement="post", encoder=True,
                 extra_embeds=("embeddings.position_embeddings",
                               "embeddings.token_type_embeddings", "embeddings.LayerNorm")),
}


def arch_for(config) -> Arch:
    """The adapter for a transformers config: its table row, or for a family without one the
    decoder layers found in the model itself (generic_arch)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHES:
        return generic_arch(config)
    arch = ARCHES[model_type]
    if model_type == "gpt_neox" and getattr(config, "use_parallel_residual", True):
        arch = Arch(**{**arch.__dict__, "parallel": True})
    if model_type == "opt" and not getattr(config, "do_layer_norm_before", True):
        arch = Arch(**{**arch.__dict__, "placement": "post"})
    return arch


def is_causal_lm(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def generic_arch(config) -> Arch:
    """An Arch for a family without a table row, from the module tree of the model the config
    builds (on the meta device: no memory): the decoder layers, embedding and LM head."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    if getattr(config, "is_encoder_decoder", False):
        raise UsageError(f"unsupported architecture {config.model_type!r}: encoder-decoder "
                         "models are not supported; compress takes causal LMs (llama, qwen3, "
                         "gemma3, mixtral, ... any AutoModelForCausalLM) and encoders (bert)")
    encoder = not is_causal_lm(config)
    auto = AutoModel if encoder else AutoModelForCausalLM
    try:
        with init_empty_weights(include_buffers=False):
            model = auto.from_config(config, dtype=torch.float32)
    except (ValueError, KeyError) as exc:
        raise UsageError(f"unsupported architecture {config.model_type!r}: transformers cannot "
                         f"build it ({str(exc).splitlines()[0]})") from None
    names = {id(m): n for n, m in model.named_modules()}
    head = model.get_output_embeddings() if not encoder else None
    return Arch(name=config.model_type, layers=find_layers(model),
                embed=names.get(id(model.get_input_embeddings())),
                lm_head=names.get(id(head)) if head is not None else None,
                encoder=encoder, known=False)


def find_layers(model) -> str:
    """The full name of the decoder layers' ModuleList: the longest ModuleList whose children
    are all of a class the model names in _no_split_modules (its repeated block), else the
    longest ModuleList of one class holding Linear layers."""
    from torch import nn

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    lists = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0]
    named = [(n, m) for n, m in lists if all(type(c).__name__ in blocks for c in m)]
    uniform = [(n, m) for n, m in lists if len({type(c) for c in m}) == 1
               and any(isinstance(x, nn.Linear) for x in m[0].modules())]
    for found in (named, uniform):
        if found:
            return max(found, key=lambda item: len(item[1]))[0]
    raise UsageError(f"cannot find the decoder layers of {type(model).__name__}: no ModuleList "
                     f"of its blocks ({', '.join(sorted(blocks)) or 'none named'})")


def resolve_path(model, path: str):
    """A module path of `arch`, from the root of a loaded model (base-model prefix optional)."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        prefix = getattr(model, "base_model_prefix", "")
        return model.get_submodule(f"{prefix}.{path}") if prefix else model.get_submodule(path)


def decoder_layers(model, arch: Arch):
    return resolve_path(model, arch.layers)


def layers_path(model, arch: Arch) -> str:
    """The decoder layers' full module name in this model (arch.layers, maybe prefixed)."""
    target = decoder_layers(model, arch)
    return next(name for name, module in model.named_modules() if module is target)


@dataclass
class Loaded:
    model: object
    tokenizer: object
    arch: Arch
    source: Checkpoint | None    # None for a model passed in memory
    # The source's tensors under the model's names, for the decoder layers load_lazily left on
    # the meta device (compress.offload.LayerStore reads them); None when loaded whole.
    tensors: SourceTensors | None = None


def load_model(spec: str, dtype: str = "float32", trust_remote_code: bool = False,
               allow_pickle: bool = False, lazy: bool = False) -> Loaded:
    """Load any supported source as a plain (uncompressed) transformers model and tokenizer,
    computing in dtype (an artifact too: its packed weights stay packed, its 16-bit tensors
    are widened, so it is compared with a baseline in the same dtype).
    lazy: for a safetensors directory, leave the decoder layers on the meta device, to be read
    one at a time (compress.offload.LayerStore); everything else is loaded."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    source = Checkpoint.open(spec, allow_pickle)
    if lazy and source.kind == "dir" and source.shards():
        config = source.config(trust_remote_code)
        model, tensors = load_lazily(source, config, getattr(torch, dtype), trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        return Loaded(model, tokenizer, arch_for(config), source, tensors)
    if source.kind == "artifact":
        from compress.runtime.artifact import load_artifact

        model = load_artifact(source.path, dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        return Loaded(model, tokenizer, arch_for(model.config), source)
    config = source.config(trust_remote_code)
    arch = arch_for(config)
    auto = AutoModel if arch.encoder else AutoModelForCausalLM
    kwargs = dict(dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
                  **source.pretrained_kwargs())
    if allow_pickle:
        kwargs["use_safetensors"] = None
    try:
        model = auto.from_pretrained(source.path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source.path, **source.pretrained_kwargs())
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompressError(f"cannot load the weights of {source.label}: {first}") from None
    if getattr(model.config, "quantization_config", None) is not None and source.gguf_file:
        # The GGUF was dequantized on load; the in-memory model is a plain float model that
        # save_pretrained must not refuse as "quantized with gguf".
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    split_experts(model)
    model.eval()
    return Loaded(model, tokenizer, arch, source)


def split_experts(model) -> None:
    """Fused 3D MoE experts become one Linear per expert projection (compress.runtime.moe), so
    every pass sees plain Linears; recorded so the artifact loader does the same."""
    from compress.runtime.artifact import structure
    from compress.runtime.moe import unfuse_experts

    found = unfuse_experts(model)
    if found:
        structure(model)["experts"] = found


@dataclass(frozen=True)
class SourceTensors:
    """A checkpoint's tensors under the names of the model from_pretrained + split_experts
    build from it: keys renamed as transformers renames them on load (Mixtral's
    block_sparse_moe -> mlp, legacy names), fused 3D experts split per expert as in memory
    (compress.runtime.moe.split_state). A per-expert checkpoint needs no split: split_experts
    names the experts' Linears as the family's checkpoints do."""

    source: Checkpoint
    names: dict[str, str]        # model name -> checkpoint name (experts maybe still fused)
    experts: dict[str, dict]     # structure["experts"]: the blocks split per expert

    def read_prefix(self, prefix: str, dtype=None) -> dict:
        """The model's tensors under prefix (a layer: "model.layers.3."), prefix stripped."""
        return {n[len(prefix):]: t for n, t in self.read(
            [n for n in self.names if n.startswith(prefix)], dtype).items()}

    def read(self, names: list[str], dtype=None) -> dict:
        """These tensors (model names, before the split) as the model holds them."""
        read = self.source.read_names([self.names[n] for n in names], dtype)
        return self.split({n: read[self.names[n]] for n in names})

    def split(self, tensors: dict) -> dict:
        from compress.runtime.moe import split_state

        for block, record in self.experts.items():
            tensors = split_state(tensors, block, record)
        return tensors

    def shapes(self) -> dict[str, list[int]]:
        """Every tensor's shape under the model's names, from the shard headers alone (the
        split runs on meta tensors)."""
        import torch

        info = self.source.tensor_info()
        meta = {n: torch.empty(info[c][1], device="meta") for n, c in self.names.items()}
        return {n: list(t.shape) for n, t in self.split(meta).items()}


def renamed_keys(model, names: list[str]) -> dict[str, str]:
    """Model name -> checkpoint name for every checkpoint key, renamed as from_pretrained
    renames it (transformers' WeightRenaming entries for this model; its WeightConverters,
    which fuse per-expert tensors, are left out: split_experts undoes them)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:   # a transformers without conversion tables: names as stored
        return {n: n for n in names}
    renamings = [t for t in get_model_conversion_mapping(model)
                 if isinstance(t, WeightRenaming)]
    return {rename_source_key(n, renamings, [])[0]: n for n in names}


def load_lazily(source: Checkpoint, config, dtype, trust_remote_code: bool = False
                ) -> tuple[object, SourceTensors]:
    """Build the model on the meta device (accelerate), split its fused MoE experts
    (split_experts), check every tensor's name and shape against it from the shard headers,
    and load all but the decoder layers. Returns the model and its layers' tensors."""
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    from compress.offload import assign
    from compress.runtime.artifact import structure

    arch = arch_for(config)
    auto = AutoModel if arch.encoder else AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    split_experts(model)
    tensors = SourceTensors(source, renamed_keys(model, source.tensor_names()),
                            dict(structure(model).get("experts", {})))
    shapes = tensors.shapes()
    expected = model.state_dict()
    tied = {"lm_head.weight", "embed_out.weight"} if getattr(config, "tie_word_embeddings",
                                                             False) else set()
    missing = [n for n in expected if n not in shapes and n not in tied]
    unexpected = [n for n in shapes if n not in expected]
    if missing or unexpected:
        raise CompressError(f"{source.label}: the weights do not match the config (missing "
                            f"{missing[:3]}, unexpected {unexpected[:3]})")
    for name, shape in shapes.items():
        if shape != list(expected[name].shape):
            stored = tensors.names.get(name)
            where = f" in {source.index[stored].name}" if stored in source.index else ""
            raise CompressError(f"{source.label}: {name} has shape {shape}{where} but the "
                                f"config implies {list(expected[name].shape)}")
    prefix = layers_path(model, arch) + "."
    rest = [n for n in tensors.names if not n.startswith(prefix)]
    for name, tensor in tensors.read(rest, dtype).items():
        assign(model, name, tensor)
    if tied:
        model.tie_weights()
    return model.eval(), tensors


def set_offline_unless_asked() -> None:
    """Hub libraries read these at import: set them before importing transformers."""
    if os.environ.get("COMPRESS_ONLINE") != "1":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
