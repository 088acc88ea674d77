"""A megarank checkpoint's model tensors read one at a time, without building the model.

megatron's distributed checkpoints store each parameter as one global tensor, with the layers of
a TransformerBlock stacked along dim 0 (``backbone.decoder.layers.mlp.linear_fc1.weight`` is
[num_layers, ...]), whatever TP/PP layout wrote it. :class:`CheckpointTensors` maps the
single-process parameter names (``backbone.decoder.layers.3.mlp.linear_fc1.weight``) to reads of
exactly that layer's slice, so an export holds one tensor at a time, never the model.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import MetadataIndex

_STACKED = re.compile(r"^(backbone\.(?:decoder|encoder)\.layers)\.(.+)$")
# What a training checkpoint holds besides the model's weights.
_NOT_MODEL = ("optimizer.", "rng_state")


class CheckpointTensors(Mapping[str, torch.Tensor]):
    """name -> tensor of a checkpoint's model weights, each read from disk when asked for
    (only that tensor's bytes; no process group needed)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        metadata = FileSystemReader(str(self.path)).read_metadata()
        self._storage = metadata.storage_data
        self._entries: dict[str, tuple[str, int | None, Any]] = {}
        for key, meta in metadata.state_dict_metadata.items():
            if getattr(meta, "size", None) is None or "_extra_state" in key \
                    or key.startswith(_NOT_MODEL):
                continue  # objects (RNG, TE extra state) and optimizer moments
            stacked = _STACKED.match(key)
            if stacked:
                for layer in range(meta.size[0]):
                    name = f"{stacked.group(1)}.{layer}.{stacked.group(2)}"
                    self._entries[name] = (key, layer, meta)
            else:
                self._entries[key] = (key, None, meta)

    def __getitem__(self, name: str) -> torch.Tensor:
        key, layer, meta = self._entries[name]
        shape = meta.size if layer is None else meta.size[1:]
        chunks = [c for c in meta.chunks if layer is None or c.offsets[0] == layer]
        if len(chunks) == 1 and tuple(chunks[0].sizes)[-len(shape):] == tuple(shape):
            return self._read(key, chunks[0].offsets).reshape(shape)  # stored whole: no copy
        out = torch.empty(shape, dtype=meta.properties.dtype)
        for chunk in chunks:
            offsets, sizes = list(chunk.offsets), list(chunk.sizes)
            if layer is not None:
                if sizes[0] != 1:
                    raise ValueError(f"{self.path}: {key} stores several layers in one chunk")
                offsets, sizes = offsets[1:], sizes[1:]
            part = self._read(key, chunk.offsets).reshape(sizes)
            out[tuple(slice(o, o + n) for o, n in zip(offsets, sizes, strict=True))] = part
        return out

    def _read(self, key: str, offsets: torch.Size) -> torch.Tensor:
        """One stored chunk: torch's filesystem writer saves each as a torch.save record."""
        info = self._storage[MetadataIndex(key, offsets)]
        if getattr(info, "transform_descriptors", None):
            raise ValueError(f"{self.path}: {key} is stored with transforms "
                             f"{info.transform_descriptors}, which the export cannot read")
        with open(self.path / info.relative_path, "rb") as f:
            f.seek(info.offset)
            data = io.BytesIO(f.read(info.length))
        tensor = torch.load(data, map_location="cpu", weights_only=True)
        del data  # the record's bytes go before the caller copies anything
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

