"""The roofline cost model (roofline.py) scaled out: tensor parallel over N processes and
data parallel over M replicas, joined by a link of some bandwidth and latency.

Tensor parallel, one step: each rank computes 1/N of every matmul, reads 1/N of the
weights and keeps 1/N of the KV heads, so its compute and memory time is the roofline time
of a 1/N-sized step on its own share of the machine; then per layer two all-reduces of the
step's hidden states (after o and down), one for the embedding and an all-gather of the
logits, each a ring: 2 (N-1)/N x bytes / bandwidth + 2 (N-1) hops x latency (the gather
half that), plus rank 0's broadcast of the step's metadata (a latency-bound message).
Data parallel: M replicas each run 1/M of the requests; on one machine they share its
bandwidth and FLOP/s, on M machines each has its own.
"""
from __future__ import annotations

from dataclasses import dataclass

from miaotui.bench.roofline import Cost, CostModel, Machine


@dataclass
class Link:
    gbps: float                 # bandwidth per direction, Gbit/s
    latency_us: float           # per hop

    @property
    def bytes_per_s(self) -> float:
        return self.gbps * 1e9 / 8

    def all_reduce(self, nbytes: float, n: int) -> float:
        if n <= 1:
            return 0.0
        return 2 * (n - 1) / n * nbytes / self.bytes_per_s + 2 * (n - 1) * self.latency_us * 1e-6

    def all_gather(self, nbytes: float, n: int) -> float:
        """nbytes: the gathered total."""
        if n <= 1:
            return 0.0
        return (n - 1) / n * nbytes / self.bytes_per_s + (n - 1) * self.latency_us * 1e-6


# processes on one machine talk through gloo over loopback TCP: the 2-rank all-reduce probe
# of bench/distributed.py measured ~these on the (busy, 2-core) dev machine
# (results/distributed.json); the defaults of `miaotui estimate --tp`
LOOPBACK = Link(gbps=7.5, latency_us=74.0)


def share(machine: Machine, k: float) -> Machine:
    """1/k of a machine (k processes sharing its bandwidth and FLOP/s)."""
    return Machine(machine.bandwidth / k, {d: f / k for d, f in machine.flops.items()},
                   max(1, machine.threads // max(1, int(k))), machine.source)


def tp_step(cost: CostModel, machine: Machine, link: Link, n: int, tokens: int, step: Cost,
            same_machine: bool, dtype: str = "float32") -> dict:
    """Predicted seconds of one step (`step`: its single-process Cost, `tokens` rows) split
    over n ranks: compute/memory of a 1/n step, then the collectives."""
    rank_machine = share(machine, n) if same_machine else machine
    compute = rank_machine.time(step.scaled(1 / n), dtype)
    h, vocab, layers = cost.cfg.hidden_size, cost.cfg.vocab_size, cost.cfg.num_layers
    comm = (2 * layers + 1) * link.all_reduce(tokens * h * 4, n)
    comm += link.all_gather(min(tokens, 256) * vocab * 4, n)       # logits of the sampled rows
    comm += 2 * link.latency_us * 1e-6 * max(0, n - 1)              # the step's metadata
    return {"compute_memory_s": compute, "comm_s": comm, "step_s": compute + comm}


def dp_throughput(machine: Machine, m: int, step_time, batch: int, same_machine: bool) -> float:
    """Tokens/s of m replicas each decoding batch/m sequences; step_time(machine, batch) -> s."""
    rep = share(machine, m) if same_machine else machine
    per = max(1, batch // m)
    return m * per / step_time(rep, per)


def predict_table(models: dict, setups: list[dict], batch: int = 32, ctx: int = 1024) -> list[dict]:
    """Decode predictions for each (model, setup): step time and tokens/s, TP x DP."""
    rows = []
    for name, cost in models.items():
        for s in setups:
            machine, link, n, m = s["machine"], s["link"], s["tp"], s.get("dp", 1)
            per = max(1, batch // m)
            r = tp_step(cost, machine, link, n, per, cost.decode(per, ctx), False, s.get("dtype", "float32"))
            fits = cost.weight_memory() / n < s.get("memory", float("inf"))
            rows.append({"model": name, "setup": s["name"], "tp": n, "dp": m, "batch": batch,
                         "ctx": ctx, "step_ms": r["step_s"] * 1e3, "comm_ms": r["comm_s"] * 1e3,
                         "tok_s": m * per / r["step_s"], "weights_per_rank_gb": cost.weight_memory() / n / 1e9,
                         "fits": fits})
    return rows


# ---- predictions at scale (`miaotui estimate --scaling-table`) ------------------------------
LLAMA_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
LLAMA_70B = dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
# peak figures (a roofline: real kernels reach some fraction of them)
GPU_NODE = dict(name="8x H100 SXM, NVLink", machine=Machine(3.35e12, {"float32": 989e12}, 1, "H100 datasheet"),
                link=Link(gbps=3600.0, latency_us=3.0), memory=80e9, fmt=("none", "bf16"))
CPU_CLUSTER = dict(name="4 CPU nodes, 25 GbE", machine=Machine(200e9, {"float32": 3e12}, 64, "2-socket server"),
                   link=Link(gbps=25.0, latency_us=30.0), memory=256e9, fmt=("int8", "auto"))


def scaling_predictions(batch: int = 32, ctx: int = 1024) -> list[dict]:
    from miaotui.bench.roofline import weight_format
    from miaotui.config import config_from_hf
    rows = []
    for node, layouts in ((GPU_NODE, [(1, 1), (2, 1), (8, 1), (2, 4), (1, 8)]),
                          (CPU_CLUSTER, [(1, 1), (2, 1), (4, 1), (1, 4)])):
        fmt = weight_format(*node["fmt"])
        models = {name: CostModel.from_config(config_from_hf(d), fmt, "auto", node["fmt"][1])
                  for name, d in (("7B", LLAMA_7B), ("70B", LLAMA_70B))}
        setups = [dict(node, tp=n, dp=m) for n, m in layouts]
        rows += predict_table(models, setups, batch, ctx)
    return rows
