"""A roofline cost model: FLOPs and bytes moved per prefill and per decode step, and the
time this machine needs for them (the larger of compute time and memory time).

Counted (all layers): matmul FLOPs 2 * weights per token; attention 4 * heads * head_dim
per key per token (QK^T and PV, causal, sliding windows capped); the logits matmul only
for rows that are sampled or scored. Bytes: every matmul weight once per forward pass
(in its stored format: float, int8 with a float32 scale per row, int4 with float16 scales
and optional zeros per group), the embedding rows looked up, K/V written for new tokens
and read for the context (int8 KV: one float32 scale per token and head), activations
(each layer intermediate written and read once, float32) and the logits.
Norm weights, biases and rotary tables are ignored (well under 1%).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from miaotui.config import ModelConfig

ACT_BYTES = 4   # compute dtype on the CPU: float32


@dataclass(frozen=True)
class WeightFormat:
    """How a matmul weight [out, in] is stored."""
    name: str
    bits: int
    group: int | None = None     # inputs per scale; None: one scale per output row
    scale_bytes: int = 0
    zero_bytes: int = 0

    def nbytes(self, out: int, inp: int) -> int:
        data = out * inp * self.bits // 8
        if not (self.scale_bytes or self.zero_bytes):
            return data
        groups = out * (1 if self.group is None else math.ceil(inp / self.group))
        return data + groups * (self.scale_bytes + self.zero_bytes)


def weight_format(quantization: str | None = None, dtype: str = "auto", group_size: int = 32,
                  zeros: bool = True) -> WeightFormat:
    """The format the engine keeps linear weights in for these settings (int4 at load is
    asymmetric: a float16 scale and min per group)."""
    if quantization == "int8":
        return WeightFormat("int8", 8, None, 4)
    if quantization == "int4":
        return WeightFormat(f"int4-g{group_size}", 4, group_size, 2, 2 if zeros else 0)
    if dtype in ("bfloat16", "bf16", "float16", "fp16"):
        return WeightFormat(dtype, 16)
    return WeightFormat("fp32", 32)


def kv_bytes_per_token(cfg: ModelConfig, kv_dtype: str = "auto", weight_dtype: str = "auto") -> int:
    """K and V of one token in all layers (int8: plus one float32 scale per head each)."""
    if kv_dtype == "int8":
        per = 2 * cfg.kv_size + 2 * cfg.num_kv_heads * 4
    else:
        elem = 2 if kv_dtype in ("bf16", "bfloat16", "fp16", "float16") or \
            (kv_dtype == "auto" and weight_dtype in ("float16", "fp16")) else 4
        per = 2 * cfg.kv_size * elem
    return per * cfg.num_layers


@dataclass
class Cost:
    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def scaled(self, k: float) -> "Cost":
        return Cost(self.flops * k, self.bytes * k)


@dataclass
class Machine:
    """Peak memory bandwidth (bytes/s) and matmul FLOP/s per dtype of this machine."""
    bandwidth: float
    flops: dict
    threads: int
    source: str = "default"

    def time(self, cost: Cost, dtype: str = "float32") -> float:
        return max(cost.flops / self.flops.get(dtype, self.flops["float32"]),
                   cost.bytes / self.bandwidth)

    def bound(self, cost: Cost, dtype: str = "float32") -> str:
        compute = cost.flops / self.flops.get(dtype, self.flops["float32"])
        return "compute" if compute >= cost.bytes / self.bandwidth else "memory"


@dataclass
class CostModel:
    """Per-step costs of one model in one storage format."""
    cfg: ModelConfig
    layer_weight_bytes: float    # all decoder-layer matmul weights
    lm_head_bytes: float
    embed_bytes: float           # the embedding table in memory
    shared_head: bool            # lm_head reads the embedding table itself (stored once)
    kv_per_token: float          # bytes, all layers
    weights_name: str = ""

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: ModelConfig, fmt: WeightFormat | None = None,
                    kv_dtype: str = "auto", weight_dtype: str = "auto") -> "CostModel":
        """Analytic sizes. The embedding table stays float32 in the engine; a tied head
        shares it only while weights stay float32; with int4 the head keeps int8."""
        fmt = fmt or WeightFormat("fp32", 32)
        head_fmt = weight_format("int8") if fmt.bits < 8 else fmt
        h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
        mlp = [(i, h), (h, i)] if cfg.family == "gpt2" else [(2 * i, h), (h, i)]
        per_layer = sum(fmt.nbytes(o, n) for o, n in [(q + 2 * kv, h), (h, q), *mlp])
        shared = cfg.tie_word_embeddings and fmt.bits == 32
        return cls(cfg, cfg.num_layers * per_layer, head_fmt.nbytes(cfg.vocab_size, h),
                   cfg.vocab_size * h * 4, shared, kv_bytes_per_token(cfg, kv_dtype, weight_dtype),
                   fmt.name)

    @classmethod
    def from_model(cls, model: torch.nn.Module, cfg: ModelConfig, kv_per_token: float) -> "CostModel":
        """Sizes measured on a loaded model (whatever formats its layers ended up in)."""
        from miaotui.layers.linear import Linear

        def size(m: Linear) -> int:
            if m.qweight is not None:
                return m.qweight.nbytes()
            return m.weight.numel() * m.weight.element_size()

        from miaotui.layers.embedding import Embedding
        head = model.lm_head
        layers = sum(size(m) for m in model.modules() if isinstance(m, Linear) and m is not head)
        emb = next((m for m in model.modules() if isinstance(m, Embedding)), None)
        if emb is not None:
            embed_bytes = emb.nbytes()
            shared = (head.qweight is not None and head.qweight is emb.qweight) or (
                head.qweight is None and emb.weight is not None and head.weight.data_ptr() == emb.weight.data_ptr())
        else:   # GPT-2: a plain parameter
            embed = [p for p in model.parameters(recurse=False)
                     if p.dim() == 2 and p.shape[0] == cfg.vocab_size]
            embed_bytes = sum(p.numel() * p.element_size() for p in embed)
            shared = head.qweight is None and any(head.weight.data_ptr() == p.data_ptr() for p in embed)
        kinds = sorted({type(m.qweight).__name__ if m.qweight is not None else str(m.weight.dtype)[6:]
                        for m in model.modules() if isinstance(m, Linear)})
        return cls(cfg, layers, size(head), embed_bytes, shared, kv_per_token, "+".join(kinds))

    @classmethod
    def from_gguf(cls, path: str, cfg: ModelConfig, kv_per_token: float) -> "CostModel":
        """Sizes as the engine holds a GGUF file (``memory.gguf_weight_sizes``): block-
        quantized tensors as repacked (as stored for Q8_0/Q4_0/Q4_1; K-quants grow a little),
        float matmul weights as float32; the embedding as stored, shared with a tied head."""
        from miaotui.bench.memory import gguf_weight_sizes
        w = gguf_weight_sizes(path)
        tied = w.head == 0
        return cls(cfg, w.layers, w.embed if tied else w.head, w.embed, tied, kv_per_token, "gguf")

    # ---- sizes ---------------------------------------------------------------------------
    def weight_memory(self) -> float:
        """Bytes of weights resident in memory (a shared head counted once)."""
        return self.layer_weight_bytes + self.embed_bytes + (0 if self.shared_head else self.lm_head_bytes)

    def matmul_flops_per_token(self) -> float:
        c = self.cfg
        h, i = c.hidden_size, c.intermediate_size
        mlp = (2 if c.family == "gpt2" else 3) * h * i
        return 2.0 * c.num_layers * (h * (c.q_size + 2 * c.kv_size) + c.q_size * h + mlp)

    def act_bytes_per_token(self) -> float:
        """Each layer's intermediates (norms, qkv, attention out, o, residuals, gate/up,
        activation, down) written once and read once, in float32."""
        c = self.cfg
        h, i = c.hidden_size, c.intermediate_size
        per_layer = 6 * h + 2 * c.q_size + 2 * c.kv_size + 3 * i
        return 2.0 * ACT_BYTES * c.num_layers * per_layer

    def _keys(self, first: int, last: int) -> float:
        """Sum over layers and over query positions first+1..last of the keys attended."""
        c = self.cfg
        total = 0.0
        for layer in range(c.num_layers):
            cap = c.sliding_window if c.is_sliding(layer) and c.sliding_window else None
            total += _sum_capped(first, last, cap)
        return total

    # ---- costs ---------------------------------------------------------------------------
    def prefill(self, n: int, cached: int = 0, logits_rows: int = 1) -> Cost:
        """One sequence's prompt of n new tokens after `cached` ones already in the cache."""
        c = self.cfg
        attn = 4.0 * c.num_heads * c.head_dim * self._keys(cached, cached + n)
        head_f = 2.0 * c.hidden_size * c.vocab_size * logits_rows
        flops = n * self.matmul_flops_per_token() + attn + head_f
        weights = self.layer_weight_bytes + (self.lm_head_bytes if logits_rows else 0)
        moved = (weights + n * c.hidden_size * 4 + n * self.kv_per_token
                 + cached * self.kv_per_token + n * self.act_bytes_per_token()
                 + 2 * logits_rows * c.vocab_size * ACT_BYTES)
        return Cost(flops, moved)

    def decode(self, batch: int, ctx: float) -> Cost:
        """One decode step of `batch` sequences, each attending to `ctx` keys (the new
        token included)."""
        c = self.cfg
        ctx_eff = self._keys(ctx - 1, ctx) / c.num_layers   # keys per layer after windows
        flops = batch * (self.matmul_flops_per_token()
                         + 4.0 * c.num_heads * c.head_dim * ctx_eff * c.num_layers
                         + 2.0 * c.hidden_size * c.vocab_size)
        moved = (self.layer_weight_bytes + self.lm_head_bytes
                 + batch * (c.hidden_size * 4 + self.kv_per_token * (ctx_eff + 1)
                            + self.act_bytes_per_token() + 2 * c.vocab_size * ACT_BYTES))
        return Cost(flops, moved)

    def decode_attention(self, batch: int, ctx: float) -> Cost:
        """The attention part of decode(): its FLOPs and the K/V it reads and writes."""
        c = self.cfg
        ctx_eff = self._keys(ctx - 1, ctx) / c.num_layers
        return Cost(batch * 4.0 * c.num_heads * c.head_dim * ctx_eff * c.num_layers,
                    batch * self.kv_per_token * (ctx_eff + 1))

    # ---- memory --------------------------------------------------------------------------
    def activation_memory(self, tokens: int, rows: int) -> float:
        """Peak transient activations of one step of `tokens` tokens (one layer's
        intermediates live at a time) with logits for `rows` of them."""
        c = self.cfg
        per_token = 2 * c.hidden_size + c.q_size + 2 * c.kv_size + 3 * c.intermediate_size
        return ACT_BYTES * (tokens * per_token + rows * c.vocab_size)

    def footprint(self, batch: int, ctx: int, step_tokens: int = 2048,
                  overhead: float = 300e6) -> dict:
        """Memory for `batch` sequences of `ctx` tokens: weights, KV, activations, runtime."""
        kv = batch * ctx * self.kv_per_token
        act = self.activation_memory(min(step_tokens, batch * ctx), batch)
        total = self.weight_memory() + kv + act + overhead
        return {"weights": self.weight_memory(), "kv_cache": kv, "activations": act,
                "runtime": overhead, "total": total}

    def max_batch(self, budget: float, ctx: int, step_tokens: int = 2048,
                  overhead: float = 300e6) -> int:
        """Most sequences of `ctx` tokens that fit in `budget` bytes: each needs its KV
        and a logits row, besides the weights, one step's activations and the runtime."""
        free = budget - self.weight_memory() - self.activation_memory(step_tokens, 0) - overhead
        return max(0, int(free // (ctx * self.kv_per_token + ACT_BYTES * self.cfg.vocab_size)))


def _sum_capped(first: int, last: int, cap: int | None) -> float:
    """sum over c in first+1..last of min(c, cap)."""
    if last <= first:
        return 0.0
    if cap is None or last <= cap:
        return (first + 1 + last) * (last - first) / 2
    below = max(0, cap - first)        # terms first+1..cap grow, the rest are cap
    s = (first + 1 + cap) * below / 2 if below else 0.0
    return s + (last - first - below) * cap


def predict_workload(cost: CostModel, machine: Machine, requests: list[tuple[int, int]],
                     max_num_seqs: int = 64) -> dict:
    """Roofline time of an offline batch of (prompt_len, output_len) requests, simulated the
    way the engine schedules it: admit up to max_num_seqs (prefill), decode all active.

    A decode step's time is the larger of its compute and memory times, as if its matmuls
    (compute-bound with many sequences) overlapped its attention (memory-bound: the K/V
    read) perfectly. An engine that runs them one after the other can at best reach
    ``decode_parts_time``: the matmuls' bound plus attention's bound, step by step."""
    queue, active = list(requests), []
    t_prefill = t_decode = t_parts = 0.0
    total = Cost()
    while queue or active:
        while queue and len(active) < max_num_seqs:
            p, out = queue.pop(0)
            c = cost.prefill(p)
            t_prefill += machine.time(c)
            total += c
            if out > 1:
                active.append([p + 1, out - 1])   # [keys at the next step, tokens still to come]
        if not active:
            continue
        ctx = sum(a[0] for a in active) / len(active)
        c = cost.decode(len(active), ctx)
        t_decode += machine.time(c)
        attn = cost.decode_attention(len(active), ctx)
        t_parts += machine.time(attn) + machine.time(Cost(c.flops - attn.flops, c.bytes - attn.bytes))
        total += c
        for a in active:
            a[0] += 1
            a[1] -= 1
        active = [a for a in active if a[1] > 0]
    return {"time": t_prefill + t_decode, "prefill_time": t_prefill, "decode_time": t_decode,
            "decode_parts_time": t_parts, "flops": total.flops, "bytes": total.bytes}


# ---- calibration ------------------------------------------------------------------------
def calibration_path() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "miaotui", "calibration.json")


def _best_time(fn, repeats: int) -> float:
    """Fastest of `repeats` runs after one warm-up: the peak, least disturbed by neighbours."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def calibrate(threads: int | None = None, mib: int = 256, repeats: int = 7) -> Machine:
    """Measure peak memory bandwidth (sum and copy of a large tensor) and matmul FLOP/s."""
    threads = threads or torch.get_num_threads()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(mib << 18)                      # mib MiB of float32
        y = torch.empty_like(x)
        read = x.nbytes / _best_time(lambda: x.sum(), repeats)
        copy = 2 * x.nbytes / _best_time(lambda: y.copy_(x), repeats)
        del x, y
        flops = {}
        # half types have no fast path on many CPUs: smaller problems, fewer repeats
        for dtype, n, reps in [(torch.float32, 1024, repeats), (torch.float32, 2048, 3),
                               (torch.bfloat16, 256, 3), (torch.float16, 256, 3)]:
            a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
            name = str(dtype)[6:]
            flops[name] = max(flops.get(name, 0.0), 2 * n ** 3 / _best_time(lambda: a @ b, reps))
    finally:
        torch.set_num_threads(old)
    return Machine(max(read, copy), flops, threads,
                   f"calibrated {time.strftime('%Y-%m-%d %H:%M')} (read {read / 1e9:.1f} GB/s, "
                   f"copy {copy / 1e9:.1f} GB/s)")


BUSY_LOAD = 0.5     # load average per CPU above which a calibration is not stored
ROUNDS = 2          # calibrations a measurement takes the best of


def machine_load() -> tuple[float, int]:
    """(1-minute load average, CPUs)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return load, os.cpu_count() or 1


def is_busy() -> bool:
    load, cpus = machine_load()
    return load > BUSY_LOAD * cpus


def best_of(machines: list[Machine]) -> Machine:
    """The highest bandwidth and FLOP/s seen: each disturbance only ever slows a run."""
    best = max(machines, key=lambda m: m.bandwidth)
    flops = {k: max(m.flops.get(k, 0.0) for m in machines) for k in best.flops}
    return Machine(best.bandwidth, flops, best.threads, best.source)


def measure(threads: int, rounds: int = ROUNDS) -> Machine:
    """The best of `rounds` calibrations, half a second apart."""
    runs = []
    for i in range(rounds):
        if i:
            time.sleep(0.5)
        runs.append(calibrate(threads))
    return best_of(runs)


def _key(threads: int) -> str:
    from miaotui.bench.report import cpu_model
    return f"{cpu_model()}|{threads} threads"


def _read(path: str) -> dict:
    if os.path.isfile(path):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            pass
    return {}


def store(machine: Machine, cache: str | None = None) -> bool:
    """Save the figures for later runs, unless the machine is busy now (figures measured
    under load are low, and every later prediction would inherit them)."""
    if is_busy():
        load, cpus = machine_load()
        print(f"[miaotui] load average {load:.1f} on {cpus} CPUs: this calibration is used "
              "for this run only, not stored", file=sys.stderr)
        return False
    path = cache or calibration_path()
    data = _read(path)
    data[_key(machine.threads)] = asdict(machine)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return True


def load_machine(threads: int | None = None, recalibrate: bool = False, cache: str | None = None) -> Machine:
    """This machine's figures from the cache, measured (a few seconds) when missing; stored
    only when measured on a quiet machine."""
    threads = threads or torch.get_num_threads()
    data = _read(cache or calibration_path())
    key = _key(threads)
    if key in data and not recalibrate:
        return Machine(**data[key])
    m = measure(threads)
    store(m, cache)
    return m


def reconcile(machine: Machine, predict, measured: float, cache: str | None = None) -> Machine:
    """Make `machine` (updated in place) consistent with a measured run: when the run took
    less time than the roofline allows (`predict(machine)` > measured), the figures are too
    low (say, calibrated while busy). Re-measure, keep the better of old and new, store that
    if the machine is quiet; if the run still beats the roof, raise the figures to what the
    run proves (for this run only), so no report ever says more than 100%."""
    if not measured > 0 or predict(machine) <= measured:
        return machine
    print("[miaotui] the run beat the stored roofline: re-measuring this machine", file=sys.stderr)
    fresh = best_of([machine, measure(machine.threads)])
    store(fresh, cache)
    machine.bandwidth, machine.flops, machine.source = fresh.bandwidth, fresh.flops, fresh.source
    t = predict(machine)
    if t > measured:
        k = t / measured
        machine.bandwidth *= k
        machine.flops = {d: f * k for d, f in machine.flops.items()}
        machine.source += f"; raised {k:.2f}x to match a measured run"
    return machine


def fraction_report(label: str, predicted: float, measured: float, cost: Cost,
                    machine: Machine) -> dict:
    """Measured time beside its roofline: achieved fraction and effective bandwidth/FLOP/s."""
    return {"label": label, "predicted_s": predicted, "measured_s": measured,
            "fraction": predicted / measured if measured else 0.0,
            "bound": machine.bound(cost), "effective_GBps": cost.bytes / measured / 1e9 if measured else 0.0,
            "effective_GFLOPs": cost.flops / measured / 1e9 if measured else 0.0}


def describe(r: dict, rate: float, unit: str = "tok/s") -> str:
    """'decode 9.1 tok/s, 87% of the bandwidth limit, 21.3 GB/s effective'."""
    limit = "bandwidth" if r["bound"] == "memory" else "compute"
    eff = (f"{r['effective_GBps']:.1f} GB/s" if r["bound"] == "memory"
           else f"{r['effective_GFLOPs']:.1f} GFLOP/s")
    return f"{r['label']} {rate:.1f} {unit}, {r['fraction']:.0%} of the {limit} limit, {eff} effective"


def engine_cost_model(engine) -> CostModel:
    """The cost model of a loaded LLMEngine (measured weight sizes, its KV dtype)."""
    from miaotui.engine.model_runner import ModelRunner
    kv = ModelRunner.kv_bytes_per_token(engine.model_config, engine.runner.caches[0].k.dtype)
    return CostModel.from_model(engine.model, engine.model_config, kv)
