"""A token embedding kept in the format it was stored in.

A GGUF file stores the embedding quantized (SmolLM2's Q4_1 file: 17.7 MB, against 113 MB
as float32); the table is kept so and a lookup dequantizes only the rows it returns
(``QuantWeight.rows``, bit-identical to dequantizing the whole table first). A dense table
keeps its float dtype (bfloat16/float16 rows are widened to float32 on lookup, exactly).
With tied embeddings the output head and the embedding share one table (``tie``): the
quantized blocks when quantized, else one float32 tensor.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.num_embeddings, self.dim = num_embeddings, dim
        # torch.empty: no memory touched until loaded
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim), requires_grad=False)
        self.qweight = None   # a miaotui.layers.quant.QuantWeight when kept quantized

    @property
    def device(self) -> torch.device:
        return (self.weight if self.weight is not None else self.qweight.q).device

    def load(self, w) -> None:
        """A dense tensor, or a raw GGUF tensor (data, qtype, shape; the data may be a view
        of the file's map: what is kept is copied)."""
        if isinstance(w, torch.Tensor):
            dense = w if w.dtype in _FLOAT_TYPES.values() else w.float()
        elif w.qtype.name in _FLOAT_TYPES:
            a = np.asarray(w.data).reshape(-1)
            dt = _FLOAT_TYPES[w.qtype.name]
            if w.qtype.name == "BF16":   # numpy has no bfloat16: stored as 2-byte words
                dense = torch.from_numpy(a.view(np.int16).copy()).view(dt)
            else:
                dense = torch.from_numpy(a.copy())
            dense = dense.view(w.shape)
        else:
            from miaotui.layers.quant import from_gguf
            self.qweight, self.weight = from_gguf(w.data, w.qtype, w.shape), None
            return
        if tuple(dense.shape) != (self.num_embeddings, self.dim):
            raise ValueError(f"embedding shape {tuple(dense.shape)} != {(self.num_embeddings, self.dim)}")
        self.weight, self.qweight = nn.Parameter(dense, requires_grad=False), None

    def tie(self, head) -> None:
        """Make the Linear `head` read this table (tied embeddings): one copy in memory."""
        if self.qweight is not None:
            head.qweight, head.weight = self.qweight, None
            return
        if self.weight.dtype != torch.float32:   # the head computes in float32
            self.weight = nn.Parameter(self.weight.data.float(), requires_grad=False)
        head.weight.data = self.weight.data

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """float32 [*input_ids.shape, dim]."""
        if self.qweight is not None:
            return self.qweight.rows(input_ids)
        return F.embedding(input_ids, self.weight).float()

    def dense(self) -> torch.Tensor:
        """The whole table as float32 (for tests and tools; not used when serving)."""
        return self.qweight.dequantize() if self.qweight is not None else self.weight.data.float()

    def nbytes(self) -> int:
        if self.qweight is not None:
            return self.qweight.nbytes()
        return self.weight.numel() * self.weight.element_size()
