"""Hugging Face model directories: config.json + safetensors (memory-mapped, never pickle)."""
from __future__ import annotations

import json
import os
from typing import Iterator

import torch
from safetensors import safe_open

from miaotui.config import MiaotuiError, ModelConfig, config_from_hf


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise MiaotuiError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


class HFCheckpoint:
    """A model directory in Hugging Face layout."""

    def __init__(self, path: str):
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
        self.files = self._find_files()

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

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (name, tensor) in Hugging Face naming, memory-mapped from disk."""
        for file in self.files:
            try:
                f = safe_open(file, framework="pt")
                keys = list(f.keys())
            except Exception as e:
                raise MiaotuiError(f"cannot read {file}: corrupt or truncated safetensors ({e})") from None
            for k in keys:
                try:
                    t = f.get_tensor(k)
                except Exception as e:
                    raise MiaotuiError(f"cannot read tensor {k} from {file}: {e}") from None
                yield k, t
