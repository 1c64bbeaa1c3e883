"""Hugging Face model directories: config.json + safetensors (memory-mapped, never pickle)."""
from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Iterator

import numpy as np
import torch

from miaotui.config import MiaotuiError, ModelConfig, config_from_hf


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise MiaotuiError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


class HFCheckpoint:
    """A model directory in Hugging Face layout."""

    def __init__(self, path: str, weights: bool = True):
        """weights=False: the config only (load_format "dummy": random weights)."""
        self.path = path
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise MiaotuiError(f"{path} has no config.json: not a Hugging Face model directory")
        self.hf_config = _read_json(cfg_path)
        gen_path = os.path.join(path, "generation_config.json")
        self.generation_config = _read_json(gen_path) if os.path.isfile(gen_path) else {}
        self.config: ModelConfig = config_from_hf(self.hf_config)
        if self.generation_config.get("eos_token_id") is not None:
            eos = self.generation_config["eos_token_id"]
            eos = eos if isinstance(eos, list) else [eos]
            self.config.eos_token_ids = sorted(set(self.config.eos_token_ids) | set(eos))
        self.files = self._find_files() if weights else []

    def _find_files(self) -> list[str]:
        index = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.isfile(index):
            names = sorted(set(_read_json(index).get("weight_map", {}).values()))
            files = [os.path.join(self.path, n) for n in names]
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise MiaotuiError(f"shard listed in the index is missing: {missing[0]}")
            return files
        files = sorted(os.path.join(self.path, f) for f in os.listdir(self.path)
                       if f.endswith(".safetensors"))
        if files:
            return files
        if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(self.path)):
            raise MiaotuiError(
                f"{self.path} holds only pickle checkpoints (.bin/.pt), which miaotui refuses to "
                "load (they can run code). Convert once with transformers: "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, "
                "safe_serialization=True)")
        raise MiaotuiError(f"{self.path} has no *.safetensors weights")

    def tensor_info(self) -> dict[str, tuple[str, tuple, int, tuple]]:
        """name -> (safetensors dtype, shape, bytes, (file index, offset)) of every tensor,
        from the files' headers."""
        out = {}
        for i, file in enumerate(self.files):
            with open(file, "rb") as f:
                header, _ = _read_header(f, file)
            for k, v in header.items():
                b, e = v["data_offsets"]
                out[k] = (v["dtype"], tuple(v["shape"]), e - b, (i, b))
        return out

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (name, tensor) in Hugging Face naming, read from a memory map of each file.

        Each tensor is a copy of its own; once the consumer has taken it (the generator
        resumes), its pages of the map are dropped from this process, so the file is never
        resident beside the loaded model (safetensors' ``safe_open`` keeps every page it
        touched until the file is closed). The format (an 8-byte header length, a JSON
        header of dtype, shape and offsets, then the data) is read here for that reason.
        """
        from miaotui.loader.gguf_loader import release_pages
        for file in self.files:
            with open(file, "rb") as f:
                header, start = _read_header(f, file)
                size = os.fstat(f.fileno()).st_size
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
            try:
                for k, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                    b, e = v["data_offsets"]
                    dt = _DTYPES.get(v["dtype"])
                    if dt is None:
                        raise MiaotuiError(f"cannot read tensor {k} from {file}: unsupported dtype {v['dtype']}")
                    if start + e > size or b > e:
                        raise MiaotuiError(f"cannot read {file}: corrupt or truncated safetensors "
                                           f"(tensor {k} ends past the end of the file)")
                    # a copy of its own (no view of the map outlives this line: it is released)
                    t = torch.from_numpy(np.frombuffer(buf, np.uint8, e - b, start + b).copy()
                                         if e > b else np.empty(0, np.uint8))
                    try:
                        t = t.view(dt).reshape(v["shape"])
                    except RuntimeError as err:
                        raise MiaotuiError(f"cannot read tensor {k} from {file}: {err}") from None
                    yield k, t
                    release_pages(buf, start + b, e - b)
            finally:
                if buf is not None:
                    buf.close()


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}


def _read_header(f, file: str) -> tuple[dict, int]:
    """A safetensors file's tensor table {name: {dtype, shape, data_offsets}} (the
    ``__metadata__`` entry dropped) and where its data starts."""
    head = f.read(8)
    size = os.fstat(f.fileno()).st_size
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    if n < 2 or 8 + n > size:
        raise MiaotuiError(f"cannot read {file}: corrupt or truncated safetensors (bad header length)")
    try:
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for k, v in header.items():
            v["dtype"], v["shape"], v["data_offsets"]   # noqa: B018 (presence check)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise MiaotuiError(f"cannot read {file}: corrupt or truncated safetensors (header: {e})") from None
    return header, 8 + n
