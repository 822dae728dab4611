"""Text sources, token windows, and the one layer-wise Calibrator every data-driven pass uses."""

from __future__ import annotations

import importlib
import inspect
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from compress import distributed
from compress.errors import BadInputData, CompressError, UsageError
from compress.models import Arch, decoder_layers, layers_path

# Inside the package, so a wheel carries it (the top-level calibration/ is a link to it).
STDLIB_SETS = Path(__file__).resolve().parent / "bundled" / "calibration" / "stdlib.yaml"


class CalibrationConfig(BaseModel):
    """Which text to calibrate on. source: "stdlib", a .txt/.jsonl path, or "hf:NAME[:CONFIG]".
    batch_size: windows a calibration forward runs at once; None chooses (forward_batch)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = "stdlib"
    samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=8)
    seed: int = 0
    batch_size: int | None = Field(None, ge=1)

    def forward_batch(self, device: torch.device) -> int:
        """batch_size, or when unset: on CUDA about 4096 tokens a forward (at least one window),
        elsewhere 8 windows. On a GPU the forward's transients grow with the tokens of a batch
        (an 8B-shaped layer: ~0.19 GiB a 2048-token window, on top of the activations and the
        Gram matrices; evaluate/RESULTS.md, sixth session), while 4096 tokens already keep it
        busy (4 layers at 8 x 2048: 26.7 s; at 2 x 2048: 23.2 s)."""
        if self.batch_size is not None:
            return self.batch_size
        if torch.device(device).type == "cuda":
            return max(1, 4096 // self.seq_len)
        return 8


# ---------------------------------------------------------------------------------------------
# Text sources

def _docstrings(module_name: str) -> list[str]:
    import warnings

    with warnings.catch_warnings():  # some modules warn on import (deprecated aliases)
        warnings.simplefilter("ignore")
        module = importlib.import_module(module_name)
        return _module_docstrings(module, module_name)


def _own_doc(obj) -> str | None:
    """The object's own docstring, cleaned. Not inspect.getdoc: it falls back to the docstring
    of a base class, which put io's and email's docstrings into both the calibration and the
    evaluation split (a method of an evaluation module overriding a calibration one)."""
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
    return inspect.cleandoc(doc) if doc else None


def _module_docstrings(module, module_name: str) -> list[str]:
    found = [_own_doc(module)]
    for _, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != module_name:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            found.append(_own_doc(obj))
        if inspect.isclass(obj):
            # methods written in this module (enum copies enum's own functions into every
            # Enum subclass: those belong to enum's text, not this module's)
            found += [_own_doc(m) for _, m in sorted(vars(obj).items())
                      if inspect.isfunction(m) and m.__module__ == module_name]
    return [doc for doc in found if doc]


def stdlib_texts(split: Literal["calibration", "evaluation"]) -> list[str]:
    """Docstrings of the standard-library modules listed for `split` in calibration/stdlib.yaml."""
    import yaml

    modules = yaml.safe_load(STDLIB_SETS.read_text())[split]
    return [doc for name in modules for doc in _docstrings(name)]


def check_text_source(source: str, allowed: tuple[Path, ...] | list[Path] = (),
                      origin: str = "--text") -> None:
    """A text file must lie below the current directory or an allowed path (the recipe's
    directory, --allow-path), after symlinks are followed: a recipe from elsewhere must not
    make compress read /etc/shadow or /proc/self/environ. stdlib and hf: sources pass."""
    if source == "stdlib" or source.startswith("hf:"):
        return
    real = Path(source).expanduser().resolve()
    roots = [Path.cwd().resolve(), *(Path(a).expanduser().resolve() for a in allowed)]
    if not any(real == root or root in real.parents for root in roots):
        raise UsageError(f"{origin}: {source} is outside the current directory"
                         f"{' and the allowed paths' if allowed else ''}; pass --allow-path "
                         f"{Path(source).expanduser().parent} if you mean to read it")
    if not real.is_file():
        raise UsageError(f"{origin}: text file {source} not found (or not a regular file)")


def file_texts(path: Path) -> list[str]:
    """A .txt file (one text) or a .jsonl file (one {"text": ...} object a line)."""
    if not path.is_file():
        raise UsageError(f"text file {path} not found (or not a regular file)")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UsageError(f"{path}:{number}: expected a JSON object with a \"text\" "
                                 "field") from None
    else:
        texts = [raw]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UsageError(f"{path} holds no text (empty or whitespace only)")
    return texts


def dataset_texts(spec: str, split: str) -> list[str]:
    """hf:NAME[:CONFIG] through `datasets` (needs the hub or a local cache)."""
    name, _, config = spec.removeprefix("hf:").partition(":")
    try:
        import datasets

        data = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # datasets raises many types for "not reachable"
        raise CompressError(f"dataset {name!r} could not be loaded ({type(exc).__name__}): "
                            "it needs the hub or a local cache; use a .txt/.jsonl file "
                            "or source: stdlib") from None
    return [t for t in data["text"] if t.strip()]


def load_texts(source: str, split: Literal["calibration", "evaluation"]) -> list[str]:
    if source == "stdlib":
        return stdlib_texts(split)
    if source.startswith("hf:"):
        return dataset_texts(source, "train" if split == "calibration" else "test")
    return file_texts(Path(source).expanduser())


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts as one token sequence, documents separated by a blank line."""
    ids = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False).input_ids
    return ids[0]


def calibration_windows(tokenizer, cfg: CalibrationConfig) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens at seeded random offsets. Returns [N, L] int64."""
    stream = token_stream(tokenizer, load_texts(cfg.source, "calibration"))
    if stream.numel() < cfg.seq_len:
        raise UsageError(f"calibration text {cfg.source!r} has {stream.numel()} tokens, fewer "
                         f"than one sample of seq_len={cfg.seq_len}: give more text or a "
                         "smaller seq_len")
    rng = random.Random(cfg.seed)
    starts = [rng.randrange(stream.numel() - cfg.seq_len + 1) for _ in range(cfg.samples)]
    return torch.stack([stream[s:s + cfg.seq_len] for s in starts])


def evaluation_windows(tokenizer, source: str = "stdlib", seq_len: int = 512,
                       max_tokens: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of the evaluation text. Returns [N, L] int64."""
    stream = token_stream(tokenizer, load_texts(source, "evaluation"))
    if max_tokens is not None:
        stream = stream[:max_tokens]
    count = stream.numel() // seq_len
    if count == 0:
        raise UsageError(f"evaluation text {source!r} has {stream.numel()} tokens, fewer than "
                         f"one window of {seq_len}: give more text or a smaller --seq-len")
    return stream[:count * seq_len].reshape(count, seq_len)


# ---------------------------------------------------------------------------------------------
# The layer-wise calibrator

class _Captured(Exception):
    """Raised by the hook on layer 0 once its inputs are captured: the rest need not run."""


@dataclass
class LayerStep:
    """Decoder layer `index` with its calibration inputs. A pass gathers statistics with
    `run(hooks)`, changes the layer, and the Calibrator then computes the next layer's inputs."""

    index: int
    name: str                                  # e.g. "model.layers.3"
    layer: nn.Module
    inputs: list[torch.Tensor]                 # hidden states per batch, [B, L, D]
    kwargs: list[dict[str, Any]]               # the other arguments of the layer, per batch
    device: torch.device
    store: torch.device = field(default_factory=lambda: torch.device("cpu"))  # inputs, outputs

    def run(self, hooks: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], None]]
            | None = None, keep_outputs: bool = False,
            replace_inputs: bool = False) -> list[torch.Tensor]:
        """Forward every batch through the layer; hooks[name](module, x, y) sees each submodule
        input x and output y. Returns the layer outputs (on `store`) when keep_outputs.
        replace_inputs: each batch's output takes its input's place in `inputs` (returned), so
        the calibration activations are held once, not twice, while the next layer's inputs
        are made (2 GiB on an 8B-shaped model at 128 x 2048); the inputs are gone after."""
        from compress.runtime.modules import decoded_once

        handles = [self.layer.get_submodule(name).register_forward_hook(
            lambda m, args, out, fn=fn: fn(m, args[0], out)) for name, fn in (hooks or {}).items()]
        outputs = []
        try:
            with torch.no_grad(), decoded_once(self.layer):   # compressed weights: once a run
                for i, kwargs in enumerate(self.kwargs):
                    out = self.layer(self.inputs[i].to(self.device), **kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    if replace_inputs:
                        self.inputs[i] = out.to(self.store, copy=True)
                    elif keep_outputs:
                        outputs.append(out.to(self.store, copy=True))
                    del out
        finally:
            for handle in handles:
                handle.remove()
        return self.inputs if replace_inputs else outputs

    def gather(self, names: list[str], *, gram: bool = False, mean_abs: bool = False,
               mean_square: bool = False, dtype: torch.dtype = torch.float32,
               keep_outputs: bool = False) -> tuple[dict[str, "InputStats"], list[torch.Tensor]]:
        """The statistics passes ask for, of each named submodule's input over every
        calibration token, in ONE run of the layer (the only place they are computed): the Gram
        matrix sum x x^T [I, I], sum |x| and sum x^2 [I], accumulated in `dtype` batch by batch
        (and over the ranks, when several share the samples: compress.distributed).
        Returns them (see InputStats) and the layer's outputs when keep_outputs."""
        stats = {name: InputStats() for name in names}

        def hook(entry: InputStats):
            def fn(module, x, y):
                x = x.reshape(-1, x.shape[-1])               # all tokens of the batch: [B*L, I]
                if gram:
                    entry.gram = gram_update(entry.gram, x, dtype)
                entry.count += x.shape[0]
                if not (mean_abs or mean_square):
                    return   # no float32 copy of x (940 MB for an 8B down_proj batch of 8 x 2048)
                x = x.to(dtype)
                if mean_abs:
                    entry.abs_sum = x.abs().sum(0) + (0 if entry.abs_sum is None else
                                                      entry.abs_sum)
                if mean_square:
                    entry.square_sum = x.pow(2).sum(0) + (0 if entry.square_sum is None else
                                                          entry.square_sum)
            return fn

        outputs = self.run({name: hook(entry) for name, entry in stats.items()}, keep_outputs)
        # Several ranks: each saw its share of the samples; sum the sums (count included).
        distributed.sum_stats(stats, [name for name, on in (("gram", gram), ("abs_sum", mean_abs),
                                                           ("square_sum", mean_square)) if on])
        return stats, outputs

    def input_groups(self, names: list[str]) -> tuple[list[tuple[str, ...]], dict]:
        """The named submodules grouped by the input tensor they read (q/k/v, gate/up, one
        expert's gate/up), found by running the first batch: two modules read one input when
        their inputs are the same memory (data pointer, shape and strides; every tensor is kept
        alive during the run, so an address is never reused). Also returns, per group, the
        name of the parameterized module whose output that tensor is (a norm before q/k/v),
        when one is. A module the batch does not reach is a group of its own."""
        seen: dict[tuple, list[str]] = {}
        produced: dict[tuple, str] = {}
        alive: list[torch.Tensor] = []

        def key(t: torch.Tensor) -> tuple:
            alive.append(t)
            return (t.data_ptr(), tuple(t.shape), t.stride())

        def reader(name):
            def fn(module, args):
                if not any(name in members for members in seen.values()):  # first call counts
                    seen.setdefault(key(args[0]), []).append(name)
            return fn

        def producer(name):
            def fn(module, args, out):
                if isinstance(out, torch.Tensor):
                    produced.setdefault(key(out), name)
            return fn

        handles = [self.layer.get_submodule(n).register_forward_pre_hook(reader(n))
                   for n in names]
        handles += [m.register_forward_hook(producer(n)) for n, m in self.layer.named_modules()
                    if n and n not in names and list(m.parameters(recurse=False))]
        try:
            with torch.no_grad():
                self.layer(self.inputs[0].to(self.device), **self.kwargs[0])
        finally:
            for handle in handles:
                handle.remove()
        groups = [tuple(members) for members in seen.values()]
        reached = {n for g in groups for n in g}
        groups += [(n,) for n in names if n not in reached]
        producers = {tuple(members): produced[k] for k, members in seen.items() if k in produced}
        return groups, producers

    def hessians(self, names: list[str]) -> dict[str, torch.Tensor]:
        """H = 2/n * sum x x^T over all calibration tokens of each named submodule's input
        (float32, [I, I]). Call with one name per group of projections that share an input."""
        return {name: s.take_hessian() for name, s in self.gather(names, gram=True)[0].items()}



def gram_update(gram: torch.Tensor | None, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """gram + x^T x in `dtype` (gram None: start one), x [T, I].

    On CUDA a 16-bit x goes to cuBLAS as it is, with float32 accumulation and output
    (torch.mm's out_dtype): the product of two 16-bit values is exact in float32, so this is
    the float32 Gram matrix of the same values, on tensor cores. The float32 matmul it replaces
    made the statistics ~3 s of an 8B-shaped layer's 8 s on an H200 (evaluate/RESULTS.md)."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and dtype == torch.float32:
        try:
            if gram is None:
                return torch.mm(x.T, x, out_dtype=torch.float32)
            # accumulated in place (cuBLAS with beta = 1): no [I, I] float32 temporary, 822 MB
            # for an 8B model's down_proj
            return torch.addmm(gram, x.T, x, out_dtype=torch.float32, out=gram)
        except (TypeError, RuntimeError):   # a torch without out_dtype=: the float32 path
            pass
    x = x.to(dtype)
    return x.T @ x if gram is None else gram.addmm_(x.T, x)

@dataclass
class InputStats:
    """Sums over the calibration tokens of one submodule's input x [I] (LayerStep.gather)."""

    count: int = 0
    gram: torch.Tensor | None = None          # sum x x^T, [I, I]
    abs_sum: torch.Tensor | None = None       # sum |x|, [I]
    square_sum: torch.Tensor | None = None    # sum x^2, [I]

    @property
    def hessian(self) -> torch.Tensor:
        """GPTQ's and SparseGPT's H = 2/n sum x x^T (a new tensor; see take_hessian)."""
        return 2 * self.gram / self.count

    def take_hessian(self) -> torch.Tensor:
        """H, made from the Gram matrix in place (which is then gone from these statistics):
        no second [I, I] float32 copy (822 MB for an 8B model's down_proj)."""
        gram, self.gram = self.gram, None
        return gram.mul_(2 / self.count)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / self.count

    @property
    def mean_square(self) -> torch.Tensor:
        return self.square_sum / self.count


@dataclass
class Calibrator:
    """Iterate decoder layers with their calibration inputs, one layer on `device` at a time.

        for step in ctx.calibrator():
            stats, _ = step.gather([...], gram=True)   # or step.run(hooks)
            ...change step.layer...
        # after each step the layer is re-run: layer i+1 sees the outputs of the changed layer i
    """

    model: nn.Module
    arch: Arch
    input_ids: torch.Tensor                    # [N, L]
    batch_size: int = 8
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    context: Any = None                        # the pass Context: layer store and resume point

    def _store_device(self) -> torch.device:
        """Where layer inputs live between layers: the calibration device when they take under
        a third of its free memory (the next layer's inputs replace them batch by batch,
        LayerStep.run(replace_inputs)), so nothing crosses the bus between layers
        (128 x 2048 x 4096 bf16 is 2 GiB); else CPU."""
        if self.device.type != "cuda":
            return torch.device("cpu")
        hidden = getattr(self.model.config, "hidden_size", None)
        param = next(self.model.parameters())
        if hidden is None:
            return torch.device("cpu")
        need = self.input_ids.numel() * hidden * param.element_size()
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if need < free / 3 else torch.device("cpu")

    def _capture(self, layers: nn.ModuleList, store: torch.device) -> tuple[list, list]:
        """Layer 0's hidden-state inputs per batch, and the other arguments EACH layer receives
        per batch: families give layers of different types different arguments (Gemma 3:
        sliding-window vs global masks and rotary tables), so each layer is replayed with its
        own. The layers do not run: each one's forward is replaced, for this one model call, by
        one that records its arguments and passes the hidden states through; the last raises
        _Captured. Arguments shared by layers are the same tensor objects (no copies)."""
        from transformers.cache_utils import Cache

        inputs: list[torch.Tensor] = []
        per_layer: list[list[dict]] = [[] for _ in layers]

        def recorder(index: int, names: list[str]):
            def forward(*args, **kwargs):
                hidden = args[0] if args else kwargs.pop("hidden_states")
                kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                # Other positional arguments (BERT passes attention_mask positionally) by name.
                kwargs.update(zip(names[1:], args[1:]))
                # no KV cache in a replay (whatever the family calls the argument)
                kwargs = {k: None if isinstance(v, Cache) else v for k, v in kwargs.items()}
                if "use_cache" in kwargs:
                    kwargs["use_cache"] = False
                per_layer[index].append(kwargs)
                if index == 0:
                    inputs.append(hidden.to(store))
                if index == len(layers) - 1:
                    raise _Captured
                return hidden
            return forward

        for index, layer in enumerate(layers):
            layer.forward = recorder(index, _positional_names(layer))
        moved = _move_non_layers(self.model, layers, self.device)
        try:
            with torch.no_grad():
                for batch in self.input_ids.split(self.batch_size):
                    try:
                        self.model(batch.to(self.device), use_cache=False)
                    except _Captured:
                        pass
        finally:
            for layer in layers:
                del layer.forward   # the class's forward again
            _move_non_layers(self.model, layers, torch.device("cpu"), only=moved)
        if any(len(k) != len(inputs) for k in per_layer):
            raise CompressError(f"{type(self.model).__name__}: the calibration forward did not "
                                "reach every decoder layer once per batch; this model's layer "
                                "loop is not supported by the calibrator")
        return inputs, per_layer

    def __iter__(self) -> Iterator[LayerStep]:
        from compress.offload import free
        from compress.progress import bar

        layers = decoder_layers(self.model, self.arch)
        prefix = layers_path(self.model, self.arch)
        ctx = self.context
        start = ctx.first_layer() if ctx else 0
        store = self._store_device()
        inputs, per_layer = self._capture(layers, store)
        with bar("calibrating layers", len(layers)) as advance:
            for index, layer in enumerate(layers):
                if ctx:
                    ctx.open_layer(index, layer)
                layer.to(self.device)
                step = LayerStep(index, f"{prefix}.{index}", layer, inputs, per_layer[index],
                                 self.device, store)
                if index >= start:
                    yield step
                    if ctx:
                        ctx.settle_layer(layer)
                # A layer finished before a resume is only re-run, to rebuild the next inputs.
                inputs = step.run(replace_inputs=True)
                if ctx and index >= start:
                    ctx.finish_layer(index)   # on the calibration device (see finish_layer)
                layer.to("cpu")
                if ctx and index >= start:
                    ctx.close_layer(index, layer)
                elif ctx and ctx.store is not None:
                    free(layer)
                advance()


def _positional_names(module: nn.Module) -> list[str]:
    """Names of a layer's positional parameters, in order (hidden_states first)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(module.forward).parameters.values()
            if p.kind in kinds]


def _move_non_layers(model: nn.Module, layers: nn.ModuleList, device: torch.device,
                     only: list[nn.Module] | None = None) -> list[nn.Module]:
    """Move everything but the decoder layers (embeddings, rotary, norms) to `device`. Not the
    output head: the capture stops at the last layer, so it never runs (an 8B model's lm_head
    is 1 GiB of GPU memory and bus time; a tied head's weight moves with the embedding)."""
    if device.type == "cpu" and only is None:
        return []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layer_ids = {id(m) for m in layers.modules()} | ({id(head)} if head is not None else set())
    moved = only if only is not None else [
        m for m in model.modules() if id(m) not in layer_ids and not list(m.children())]
    for module in moved:
        module.to(device)
    return moved


def check_finite(name: str, tensor: torch.Tensor, what: str = "weight") -> None:
    """Stop the run with the module's name when a tensor holds NaN or Inf. NaN and Inf survive
    max and min (torch's propagate NaN), so no mask the tensor's size is made (an 8B
    down_proj's Hessian: 0.19 GiB of GPU memory)."""
    if tensor.numel() and not torch.isfinite(torch.stack([tensor.amax(), tensor.amin()])).all():
        raise BadInputData(f"{what} of {name} contains NaN or Inf: the checkpoint or the "
                            "calibration produced non-finite values; nothing was written")
