"""A token embedding kept in the format it was stored in.

A GGUF file stores the embedding quantized (SmolLM2's Q4_1 file: 17.7 MB, against 113 MB
as float32); the table is kept so and a lookup dequantizes only the rows it returns
(``QuantWeight.rows``, bit-identical to dequantizing the whole table first). A dense table
keeps its float dtype with dtype "auto" (bfloat16/float16 rows are widened to float32 on
lookup, exactly). With tied embeddings the output head and the embedding share one table
(``tie``): the quantized blocks when quantized, else the one float tensor.

An untied GGUF embedding is not held at all: only a lookup's rows are ever needed, so they
are read from the file (``os.pread``) when looked up, as llama.cpp reads them through its
memory map. The table then lives in the OS page cache (shared, evictable), not in this
process: TinyLlama-1.1B's F32 table is 262 MB. Rows read so are converted by the same code
as a held table (``from_gguf``), so the values are the same bits.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from miaotui.layers.device import act_dtype, on_gpu

_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.num_embeddings, self.dim = num_embeddings, dim
        # torch.empty: no memory touched until loaded
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim), requires_grad=False)
        self.qweight = None   # a miaotui.layers.quant.QuantWeight when kept quantized
        self.file = None      # (fd, offset, qtype, row bytes): rows read from the file on lookup

    @property
    def device(self) -> torch.device:
        if self.file is not None:
            return torch.device("cpu")
        return (self.weight if self.weight is not None else self.qweight.q).device

    def load(self, w, from_file: bool = True, keep_16bit: bool = True) -> None:
        """A dense tensor, or a raw GGUF tensor (data, qtype, shape; the data may be a view
        of the file's map: what is kept is copied). A raw tensor that names its place in
        the file (``source``) is read from there on lookup (from_file; ``tie`` loads it)."""
        self._close()
        if from_file and getattr(w, "source", None) is not None and w.qtype.name != "BF16":
            path, offset = w.source
            if tuple(w.shape) != (self.num_embeddings, self.dim):
                raise ValueError(f"embedding shape {tuple(w.shape)} != {(self.num_embeddings, self.dim)}")
            self.file = (os.open(path, os.O_RDONLY), offset, w.qtype, w.data.nbytes // self.num_embeddings)
            self.weight = self.qweight = None
            return
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
        if not keep_16bit:   # dtype float32 asked for: widened once here
            dense = dense.float()
        self.weight, self.qweight = nn.Parameter(dense, requires_grad=False), None

    def tie(self, head) -> None:
        """Make the Linear `head` read this table (tied embeddings): one copy in memory."""
        self.hold()   # the head reads all of it: hold it after all
        if self.qweight is not None:
            head.qweight, head.weight = self.qweight, None
            return
        head.weight.data = self.weight.data   # 16-bit rows are widened in the head's kernels too

    def hold(self) -> None:
        """Read a table kept in the file (rows read on lookup) into memory, as stored (a
        tied head, or a device that cannot read the file)."""
        if self.file is None:
            return
        from miaotui.loader.gguf_loader import GGUFRaw
        fd, offset, qtype, row = self.file
        data = np.frombuffer(os.pread(fd, row * self.num_embeddings, offset), np.uint8)
        data = data.reshape(self.num_embeddings, row)
        if qtype.name in _FLOAT_TYPES:
            data = data.view(np.float32 if qtype.name == "F32" else np.float16)
        self.load(GGUFRaw(data, qtype, (self.num_embeddings, self.dim)), from_file=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """float32 [*input_ids.shape, dim] (on the GPU path: the compute dtype)."""
        if on_gpu(input_ids):
            rows = self.qweight.rows(input_ids) if self.qweight is not None else F.embedding(input_ids, self.weight)
            return rows.to(act_dtype(input_ids))
        if self.file is not None:
            return self._file_rows(input_ids.reshape(-1)).reshape(*input_ids.shape, self.dim)
        if self.qweight is not None:
            return self.qweight.rows(input_ids)
        return F.embedding(input_ids, self.weight).float()

    def _file_rows(self, ids: torch.Tensor) -> torch.Tensor:
        fd, offset, qtype, row = self.file
        ids = ids.tolist()
        if any(not 0 <= i < self.num_embeddings for i in ids):
            raise IndexError("token id outside the embedding")
        data = np.frombuffer(b"".join(os.pread(fd, row, offset + i * row) for i in ids), np.uint8)
        data = data.reshape(len(ids), row)
        if qtype.name in _FLOAT_TYPES:   # F32 / F16 rows: the stored values, widened
            dt = np.float32 if qtype.name == "F32" else np.float16
            return torch.from_numpy(data.view(dt).astype(np.float32))
        from miaotui.layers.quant import from_gguf
        return from_gguf(data, qtype, (len(ids), self.dim)).dequantize()

    def dense(self) -> torch.Tensor:
        """The whole table as float32 (for tests and tools; not used when serving)."""
        if self.file is not None:
            return self._file_rows(torch.arange(self.num_embeddings))
        return self.qweight.dequantize() if self.qweight is not None else self.weight.data.float()

    def nbytes(self) -> int:
        """Bytes held in this process (none when rows are read from the file)."""
        if self.file is not None:
            return 0
        if self.qweight is not None:
            return self.qweight.nbytes()
        return self.weight.numel() * self.weight.element_size()

    def _close(self) -> None:
        if getattr(self, "file", None) is not None:
            os.close(self.file[0])
            self.file = None

    def __del__(self):
        try:
            self._close()
        except (OSError, AttributeError):
            pass
