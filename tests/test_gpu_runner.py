"""The GPU path's engine (engine/gpu_runner.py) on CPU: the Triton-on-CPU test mode
(MIAOTUI_TRITON_CPU=1, TRITON_INTERPRET=1) runs the runner on CPU tensors through
miaotui.kernels.gpu (Triton's interpreter, or the PyTorch references when triton is
missing). Tiny random models in float32 against transformers; the tests marked gpu need
CUDA (graphs on vs off, bfloat16 parity) and are skipped here."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # read when triton compiles: before any kernel

import pytest
import torch

from miaotui import LLM, SamplingParams
from miaotui.config import MiaotuiError
from miaotui.engine.gpu_runner import GPURunner, graph_sizes, kv_budget, pick_size
from miaotui.engine.llm_engine import EngineConfig, resolve_device
from miaotui.engine.model_runner import ModelRunner
from miaotui.engine.sequence import Sequence
from miaotui.layers.device import gpu_path
from util import hf_greedy, hf_logits, make_tiny_model

PROMPT = [5, 17, 99, 3, 250, 41, 7, 7, 7, 120, 64, 200, 33, 18, 90, 11, 2, 300, 301, 45]
PROMPTS = [PROMPT, PROMPT[:7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73],
           [100, 101]]
FAMILIES = ["llama", "qwen3", "gemma3", "gpt2"]
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture
def triton_cpu(monkeypatch):
    """The test mode for one test (other test files' CPU engines stay on the CPU path)."""
    monkeypatch.setenv("MIAOTUI_TRITON_CPU", "1")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    out = {}
    for fam in FAMILIES:
        path = tmp_path_factory.mktemp(fam)
        out[fam] = (str(path), make_tiny_model(fam, str(path)))
    return out


def gpu_llm(path, **kw):
    kw.setdefault("kv_cache_memory", 8 << 20)
    llm = LLM(path, **kw)
    assert isinstance(llm.engine.runner, GPURunner)
    return llm


def runner_prefill_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Logits of every prompt position through the runner's prefill metadata."""
    eng = llm.engine
    seq = Sequence("probe", 0, ids, SamplingParams(max_tokens=1), 1)
    eng.block_manager.allocate(seq, use_cache=False)
    try:
        input_ids, positions, meta = eng.runner.prepare([(seq, len(ids))])
        assert meta.gpu == "prefill"
        with torch.inference_mode(), gpu_path(torch.float32):
            return eng.model.compute_logits(eng.model(input_ids, positions, meta))
    finally:
        eng.block_manager.free_seq(seq)


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers(family, tiny_dirs, triton_cpu):
    """Prompt logits, greedy tokens and every decode step's log-prob against transformers."""
    path, ref = tiny_dirs[family]
    llm = gpu_llm(path)
    assert (runner_prefill_logits(llm, PROMPT) - hf_logits(ref, PROMPT)).abs().max() < 1e-4, family
    n = 12
    out = llm.generate([PROMPT], SamplingParams(max_tokens=n, logprobs=0, **GREEDY))[0].outputs[0]
    assert out.token_ids == hf_greedy(ref, PROMPT, n), family
    # the decode path's numbers: each generated token's log-prob from transformers' logits
    full = PROMPT + out.token_ids
    theirs = torch.log_softmax(hf_logits(ref, full), -1)
    for i, (t, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert abs(lp.logprob - theirs[len(PROMPT) - 1 + i, t].item()) < 1e-4, (family, i)
    assert llm.engine.pool_is_full()


def test_batched_equals_alone(tiny_dirs, triton_cpu):
    path, _ = tiny_dirs["llama"]
    llm = gpu_llm(path)
    params = SamplingParams(max_tokens=6, logprobs=0, **GREEDY)
    together = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, together):
        alone = llm.generate([prompt], params)[0].outputs[0]
        assert out.outputs[0].token_ids == alone.token_ids
        for a, b in zip(out.outputs[0].logprobs, alone.logprobs):
            assert abs(a.logprob - b.logprob) < 1e-5


def test_prefix_cache_and_chunked_prefill_give_the_same_tokens(tiny_dirs, triton_cpu):
    """gemma3: sliding-window layers over chunks and cached blocks (prompts past the window)."""
    path, ref = tiny_dirs["gemma3"]
    long = (PROMPT * 2)[:40]
    prompts = [long, long[:32] + [1, 2, 3]]   # the second shares two full blocks with the first
    params = SamplingParams(max_tokens=5, **GREEDY)
    want = [hf_greedy(ref, p, 5) for p in prompts]
    plain = gpu_llm(path, enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in plain.generate(prompts, params)] == want
    cached = gpu_llm(path, max_num_batched_tokens=16)   # chunks of 16, the second from the cache
    cached.generate([prompts[0]], params)
    outs = cached.generate([prompts[1]], params) + cached.generate([prompts[0]], params)
    assert outs[0].num_cached_tokens == 32
    assert [o.outputs[0].token_ids for o in outs] == [want[1], want[0]]


def test_padding_rows_leave_real_rows_alone(tiny_dirs, triton_cpu):
    """A graph pads a step to its size with slot -1, seq_len 0 rows: the real rows' logits
    and the KV cache's other slots are the same as without them."""
    path, _ = tiny_dirs["qwen3"]
    llm = gpu_llm(path)
    eng = llm.engine
    seqs = [Sequence(f"r{i}", 0, p, SamplingParams(max_tokens=4), 4) for i, p in enumerate(PROMPTS[:3])]
    for s in seqs:   # the prompt computed, one generated token to decode
        eng.block_manager.allocate(s, use_cache=False)
        eng.runner.run([(s, len(s))])
        s.num_computed_tokens = len(s)
        s.token_ids.append(42)
        eng.block_manager.append_slots(s)
    decode = [(s, 1) for s in seqs]
    want = [0, 1, 2]
    snapshot = [c.k.clone() for c in eng.runner.caches]
    with torch.inference_mode():
        plain = eng.runner._decode_logits(decode, want, 3)
        after = [c.k.clone() for c in eng.runner.caches]
        padded = eng.runner._decode_logits(decode, want, 3, pad_to=8)
    assert padded.shape == plain.shape
    assert torch.allclose(padded, plain, atol=1e-5, rtol=0)
    bs = eng.block_manager.block_size
    real = [s.block_table[(len(s) - 1) // bs] * bs + (len(s) - 1) % bs for s in seqs]
    for c, a, b in zip(eng.runner.caches, after, snapshot):
        changed = (c.k != b).flatten(1).any(1).nonzero().flatten().tolist()
        assert sorted(changed) == sorted(real)   # the real rows stored, the padding rows nothing
        assert torch.allclose(c.k, a, atol=1e-5, rtol=0)


class ReplayAgain:
    """Stands in for a captured torch.cuda.CUDAGraph on CPU: replay() runs the captured
    call again over the same static buffers, into the same output tensor."""

    def __init__(self, runner, bs):
        self.runner, self.bs = runner, bs
        self.out = runner.decode_forward(*self.args())

    def args(self):
        r = self.runner
        return (*r.static[:, :self.bs], r.static_tables[:self.bs])

    def replay(self):
        with torch.inference_mode():
            self.out.copy_(self.runner.decode_forward(*self.args()))


def test_graph_replay_path_pads_and_picks(tiny_dirs, triton_cpu):
    """The graph branch of a decode step (static buffers, padding to the next size, the
    real rows' logits picked) gives transformers' tokens, batched as alone."""
    path, ref = tiny_dirs["llama"]
    llm = gpu_llm(path, max_num_seqs=4, max_model_len=64)
    runner = llm.engine.runner
    runner.static_buffers(4)
    with torch.inference_mode():
        for bs in (1, 2, 4):
            g = ReplayAgain(runner, bs)
            runner.graphs[bs] = (g, g.out)
    runner.graph_sizes = [1, 2, 4]
    params = SamplingParams(max_tokens=4, **GREEDY)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]
    outs = llm.generate(prompts, params)   # 3 rows a step: padded to 4
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(ref, p, 4) for p in prompts]
    lens = runner.static[3].tolist()
    assert lens[3] == 0 and lens[:3] == [len(p) + 3 for p in prompts]   # the last step's rows, one padding
    alone = llm.generate([PROMPTS[1]], params)[0].outputs[0].token_ids   # the size-1 graph
    assert alone == outs[1].outputs[0].token_ids and runner.static[3, 0].item() == len(PROMPTS[1]) + 3


def test_graph_ladder():
    assert graph_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert graph_sizes(50) == [1, 2, 4, 8, 16, 24, 32, 48, 50]
    assert graph_sizes(1) == [1]
    assert graph_sizes(1000)[-1] == 256
    sizes = graph_sizes(64)
    assert [pick_size(sizes, n) for n in (1, 3, 8, 9, 33, 64)] == [1, 4, 8, 16, 48, 64]
    assert pick_size(sizes, 65) is None   # more rows than the largest graph: eager


def test_ngram_speculation_same_tokens(tiny_dirs, triton_cpu):
    """Guesses are extra decode rows of the same sequence: greedy output unchanged."""
    path, ref = tiny_dirs["llama"]
    prompt = PROMPT + PROMPT[:10]
    llm = gpu_llm(path, speculative={"method": "ngram", "num_tokens": 3})
    out = llm.generate([prompt], SamplingParams(max_tokens=12, **GREEDY))[0].outputs[0]
    assert out.token_ids == hf_greedy(ref, prompt, 12)


def test_int4_weights_stay_quantized(tiny_dirs, triton_cpu):
    """quant_matmul on the GPU path: int4 weights give the logits of their dequantized values."""
    path, _ = tiny_dirs["llama"]
    llm = gpu_llm(path, quantization="int4")
    lin = llm.engine.model.layers[0].mlp.down_proj
    assert lin.qweight is not None
    got = runner_prefill_logits(llm, PROMPT)
    for m in llm.engine.model.modules():   # the same values as dense float32 weights
        if getattr(m, "qweight", None) is not None and hasattr(m, "in_features"):
            m.weight = torch.nn.Parameter(m.qweight.dequantize(), requires_grad=False)
            m.qweight = None
    dense = runner_prefill_logits(llm, PROMPT)
    assert (got - dense).abs().max() < 1e-3


def test_random_weights_on_the_device(tiny_dirs, triton_cpu):
    """load_format="dummy": config.json and a tokenizer, weights made on the device."""
    path, _ = tiny_dirs["llama"]
    import shutil
    import tempfile
    d = tempfile.mkdtemp()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(path, f), d)
    llm = gpu_llm(d, load_format="dummy")
    assert llm.engine.model.layers[0].self_attn.qkv_proj.weight.abs().max() > 0
    out = llm.generate([PROMPT], SamplingParams(max_tokens=4, **GREEDY))[0].outputs[0]
    assert len(out.token_ids) == 4
    with pytest.raises(MiaotuiError, match="dummy"):
        LLM(d, load_format="random")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_random_weights_on_the_cpu_path(tiny_dirs, dtype):
    """load_format="dummy" on the CPU path: 16-bit weights, float32 rotary tables (the fused
    decode step reads them), and the fused step agrees with the PyTorch path."""
    path, _ = tiny_dirs["llama"]
    llm = LLM(path, load_format="dummy", dtype=dtype, device="cpu", max_model_len=128)
    model = llm.engine.model
    assert model.rotary.cos.dtype == torch.float32
    assert model.layers[0].self_attn.qkv_proj.weight.dtype == getattr(torch, dtype)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=4, **GREEDY))[0].outputs[0]
    assert len(out.token_ids) == 4
    decoder, llm.engine.runner.decoder = llm.engine.runner.decoder, None   # the PyTorch path
    again = llm.generate([PROMPT], SamplingParams(max_tokens=4, **GREEDY))[0].outputs[0]
    assert decoder is not None and again.token_ids == out.token_ids


def test_kv_budget_arithmetic():
    GiB = 1 << 30
    # 100 GiB device, 0.9 of it; weights 10 GiB, a step peaking 2 GiB above them; the CUDA
    # context 1 GiB outside the allocator (reserved 12 GiB, 13 GiB used)
    args = dict(total=100 * GiB, free=87 * GiB, reserved=12 * GiB, base=10 * GiB, peak=12 * GiB,
                utilization=0.9, step_tokens=2048)
    assert kv_budget(**args, graph_rows=0) == 90 * GiB - 12 * GiB - 1 * GiB
    assert kv_budget(**args, graph_rows=256) == 77 * GiB - 2 * GiB // 8   # graphs: 256/2048 of the step
    assert kv_budget(**{**args, "utilization": 0.1}, graph_rows=0) < 0   # the engine refuses it


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error(tiny_dirs):
    path, _ = tiny_dirs["llama"]
    assert type(LLM(path, kv_cache_memory=8 << 20).engine.runner) is ModelRunner   # no test mode: CPU
    with pytest.raises(MiaotuiError, match="no CUDA device is available"):
        LLM(path, device="cuda")
    assert resolve_device(EngineConfig()).type == "cpu"   # auto


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.01, 2, "0.9", True])
def test_gpu_memory_utilization_is_checked(bad):
    with pytest.raises(MiaotuiError, match="gpu_memory_utilization"):
        resolve_device(EngineConfig(gpu_memory_utilization=bad))


def test_unknown_device_is_refused():
    for bad in ("tpu", "cuda:x", "", None):
        with pytest.raises(MiaotuiError, match="unknown device"):
            resolve_device(EngineConfig(device=bad))
    assert resolve_device(EngineConfig(device="cpu", gpu_memory_utilization=1)).type == "cpu"


# ---- real CUDA only ---------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graphs_on_and_off_give_the_same_tokens(family, tiny_dirs):
    path, ref = tiny_dirs[family]
    params = SamplingParams(max_tokens=16, **GREEDY)
    kw = dict(device="cuda", dtype="float32", kv_cache_memory=64 << 20, max_num_seqs=8)
    graphs = LLM(path, **kw)
    assert graphs.engine.runner.graph_sizes == [1, 2, 4, 8]
    eager = LLM(path, enforce_eager=True, **kw)
    assert not eager.engine.runner.graphs
    a = [o.outputs[0].token_ids for o in graphs.generate(PROMPTS, params)]
    b = [o.outputs[0].token_ids for o in eager.generate(PROMPTS, params)]
    assert a == b
    assert a[0] == hf_greedy(ref, PROMPT, 16)   # float32 on the GPU: transformers' tokens


@pytest.mark.gpu
@cuda
def test_cuda_bf16_default_and_memory_sizing(tiny_dirs):
    path, ref = tiny_dirs["llama"]
    llm = LLM(path, device="cuda", gpu_memory_utilization=0.5, max_model_len=512)
    assert llm.engine.model.lm_head.weight.dtype == torch.bfloat16
    assert llm.engine.block_manager.num_blocks * 16 >= 512
    eng = llm.engine
    seq = Sequence("probe", 0, PROMPT, SamplingParams(max_tokens=1), 1)
    eng.block_manager.allocate(seq, use_cache=False)
    input_ids, positions, meta = eng.runner.prepare([(seq, len(PROMPT))])
    with torch.inference_mode(), gpu_path(torch.bfloat16):
        ours = eng.model.compute_logits(eng.model(input_ids, positions, meta)).float().cpu()
    theirs = hf_logits(ref, PROMPT)
    assert (ours - theirs).abs().max() < 0.1 * theirs.abs().max()   # bf16 against float32
