"""Decoder layers kept on disk between uses, so memory holds about one layer at a time.

A LayerStore reads layer i from the source checkpoint (compress.runtime.checkpoint, under the
model's names: compress.models.SourceTensors, which splits fused MoE experts), or from the file
a pass wrote for it, and after the pass writes it to `layer-0000i.safetensors` in the
run's partial output directory and frees it (its tensors go back to the meta device). Those
files are the artifact's weight shards at the end, and what an interrupted run resumes from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from compress.errors import CompressError
from compress.runtime.checkpoint import Checkpoint

if TYPE_CHECKING:
    from compress.models import SourceTensors


def assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` at `name` (a parameter or buffer, new buffers registered) inside module."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner.register_buffer(leaf, tensor)


def is_materialized(module: nn.Module) -> bool:
    return all(t.device.type != "meta" for t in module.state_dict().values())


def free(module: nn.Module) -> None:
    """Send the module's saved tensors to the meta device (shapes kept, memory released)."""
    for name, tensor in module.state_dict().items():
        assign(module, name, tensor.to("meta"))


class LayerStore:
    """Where decoder layer i lives between passes: source shards, or the file a pass wrote."""

    def __init__(self, layers_prefix: str, work_dir: Path,
                 source: Checkpoint | SourceTensors | None, dtype: torch.dtype | None,
                 writes: bool = True):
        self.layers_prefix = layers_prefix      # e.g. "model.layers"
        self.writes = writes                    # False on ranks > 0: they read rank 0's files
        self.work_dir = work_dir
        self.source = source                    # None: every layer is in memory already
        self.dtype = dtype
        # Set for the recipe's last pass only: its layer files become the artifact's shards, so
        # they are written in the saved dtype; earlier passes' files keep full precision.
        self.final_dtype: torch.dtype | None = None
        self.final = False    # the recipe's last pass is writing (its files are the artifact's)

    def file(self, index: int) -> Path:
        return self.work_dir / f"layer-{index:05d}.safetensors"

    def load(self, index: int, layer: nn.Module) -> None:
        from safetensors.torch import load_file

        written = self.file(index)
        prefix = f"{self.layers_prefix}.{index}."
        if written.is_file():  # saved under full names: they are the artifact's shards
            tensors = {k.removeprefix(prefix): v for k, v in load_file(str(written)).items()}
            tensors = self._compute_dtype(tensors)
        elif not is_materialized(layer):
            tensors = self.source.read_prefix(prefix, self.dtype) if self.source else {}
        else:
            return
        for name, tensor in tensors.items():
            assign(layer, name, tensor)
        if not is_materialized(layer):
            missing = [n for n, t in layer.state_dict().items() if t.device.type == "meta"]
            raise CompressError(f"weights of {self.layers_prefix}.{index} are missing "
                                f"{missing[:3]}: the checkpoint does not match its config")

    def save(self, index: int, layer: nn.Module) -> None:
        """Write the layer (atomically: temp file + rename) and free its memory."""
        from safetensors.torch import save_file

        if not self.writes:
            free(layer)
            return
        prefix = f"{self.layers_prefix}.{index}."
        from compress.formats.artifact import cast_for_save

        tensors = cast_for_save({prefix + k: v.detach().to("cpu").contiguous()
                                 for k, v in layer.state_dict().items()}, self.final_dtype)
        # Modules may share one tensor (NVFP4's global scale of fused q/k/v): each keeps its own
        # copy in the file, as compressed-tensors expects, and safetensors refuses shared memory.
        seen: set[int] = set()
        for name, tensor in tensors.items():
            if tensor.numel() and tensor.data_ptr() in seen:
                tensors[name] = tensor.clone()
            seen.add(tensors[name].data_ptr())
        target = self.file(index)
        tmp = target.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, target)
        free(layer)

    def round_to_saved(self, layer: nn.Module) -> None:
        """Round the layer's floating tensors, in place and in their compute dtype, to the
        values save() will write (a no-op unless this is the last pass and it saves narrower)."""
        from compress.formats.artifact import cast_for_save

        state = layer.state_dict()
        with torch.no_grad():
            for name, saved in cast_for_save(state, self.final_dtype).items():
                if saved is not state[name]:
                    state[name].copy_(saved)

    def _compute_dtype(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A layer file written in the saved dtype (a resumed last pass re-reads it) goes back
        to the dtype the passes compute in; files in full precision are unchanged."""
        if self.final_dtype is None or self.dtype is None:
            return tensors
        return {k: v.to(self.dtype) if v.dtype == self.final_dtype else v
                for k, v in tensors.items()}

    def written(self) -> list[Path]:
        return sorted(self.work_dir.glob("layer-*.safetensors"))

    def save_rest(self, model: nn.Module) -> None:
        """Write everything outside the decoder layers (after a pass, for resume)."""
        from safetensors.torch import save_file

        if not self.writes:
            return
        from compress.formats.artifact import state_tensors

        tmp = self.work_dir / "rest.safetensors.tmp"
        save_file(state_tensors(model, skip_prefix=self.layers_prefix + "."), str(tmp))
        os.replace(tmp, self.work_dir / "rest.safetensors")

    def load_rest(self, model: nn.Module) -> None:
        from safetensors.torch import load_file

        path = self.work_dir / "rest.safetensors"
        if path.is_file():
            for name, tensor in load_file(str(path)).items():
                assign(model, name, tensor)
            if getattr(model.config, "tie_word_embeddings", False):
                model.tie_weights()
