"""Bench results: JSON files with the environment, printed tables, PNG plots, comparisons."""
from __future__ import annotations

import json
import os
import platform
import sys
import time


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


ISA_ENV = ("MIAOTUI_NO_AVX512", "MIAOTUI_NO_VNNI", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
           "ONEDNN_MAX_CPU_ISA")


def environment() -> dict:
    import torch
    try:
        from importlib.metadata import version
        miaotui_version = version("miaotui")
    except Exception:
        miaotui_version = "unknown"
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "loadavg_1m": os.getloadavg()[0],
            "avx2": " avx2" in flags, "avx512f": " avx512f" in flags,
            "avx512_vnni": " avx512_vnni" in flags,
            # what the run was told to leave out of this CPU's instruction sets, if anything
            "isa_limits": {k: v for k, v in os.environ.items() if k in ISA_ENV},
            "python": platform.python_version(), "torch": torch.__version__,
            "miaotui": miaotui_version, "platform": platform.platform(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def warn_if_busy() -> None:
    """Other processes make multi-threaded timings jump (each parallel region waits for a
    time slice): say so before measuring."""
    import torch
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cpus and torch.get_num_threads() > 1:
        print(f"[miaotui] warning: load average {load:.1f} on {cpus} CPUs; multi-threaded "
              f"timings will be noisy (compare with --threads 1)", file=sys.stderr)


def make_result(kind: str, config: dict, results: dict, roofline: dict | None = None) -> dict:
    return {"kind": kind, "env": environment(), "config": config, "results": results,
            "roofline": roofline or {}}


def write_json(result: dict, path: str | None) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=float)
    print(f"[miaotui] wrote {path}")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def table(rows: list[list], header: list[str] | None = None) -> str:
    """A plain aligned text table."""
    rows = [[_fmt(c) for c in r] for r in rows]
    if header:
        rows.insert(0, header)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def flatten(d: dict, prefix: str = "") -> dict:
    """Numeric leaves of nested dicts as {"a.b.c": value}."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def compare(a: dict, b: dict) -> str:
    """Numeric results of two bench JSONs side by side, with B/A ratios."""
    fa, fb = flatten(a.get("results", {})), flatten(b.get("results", {}))
    rows = []
    for k in fa:
        if k in fb and not k.endswith(".n"):
            ratio = fb[k] / fa[k] if fa[k] else float("nan")
            rows.append([k, fa[k], fb[k], f"{ratio:.3f}x"])
    return table(rows, ["metric", "A", "B", "B/A"])


# ---- plots ------------------------------------------------------------------------------
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(result: dict, path: str) -> None:
    """A PNG for a bench result: distributions, throughput bars or a concurrency sweep,
    each with the roofline prediction beside the measurement."""
    plt = _pyplot()
    kind, r = result["kind"], result["results"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if kind == "latency":
        samples = r["samples"]
        axes[0].boxplot([[x * 1e3 for x in samples[k]] for k in ("ttft", "tpot")])
        axes[0].set_xticks([1, 2], ["TTFT", "TPOT"])
        axes[0].set_yscale("log")
        axes[0].set_ylabel("ms")
        axes[0].set_title(f"latency over {len(samples['e2e'])} repeats")
        _measured_vs_roofline(axes[1], result["roofline"])
    elif kind == "throughput":
        runs = r["runs"]
        names = list(runs)
        axes[0].bar(names, [runs[n]["output_tok_s"] for n in names], color="tab:blue")
        if "roofline" in result and result["roofline"].get("output_tok_s"):
            axes[0].axhline(result["roofline"]["output_tok_s"], color="tab:red", ls="--",
                            label="roofline (miaotui workload)")
            axes[0].legend()
        axes[0].set_ylabel("output tokens/s")
        axes[0].set_title("offline throughput")
        for i, n in enumerate(names):
            axes[0].text(i, runs[n]["output_tok_s"], f"{runs[n]['output_tok_s']:.0f}",
                         ha="center", va="bottom")
        _measured_vs_roofline(axes[1], result["roofline"])
    elif kind == "serve":
        levels = r["levels"]
        xs = [lv["load"] for lv in levels]
        axes[0].plot(xs, [lv["output_tok_s"] for lv in levels], "o-", label="output tok/s")
        axes[0].set_xlabel("concurrency" if r.get("mode") == "concurrency" else "request rate (req/s)")
        axes[0].set_ylabel("tokens/s")
        axes[0].set_title("throughput vs load")
        axes[1].plot(xs, [lv["ttft"]["median"] * 1e3 for lv in levels], "o-", label="TTFT median")
        axes[1].plot(xs, [lv["ttft"]["p99"] * 1e3 for lv in levels], "o--", label="TTFT p99")
        axes[1].plot(xs, [lv["tpot"]["median"] * 1e3 for lv in levels], "s-", label="TPOT median")
        axes[1].set_xlabel(axes[0].get_xlabel())
        axes[1].set_ylabel("ms")
        axes[1].legend()
    else:
        raise ValueError(f"no plot for {kind!r} results")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"[miaotui] wrote {path}")


def _ms(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


def _measured_vs_roofline(ax, roof: dict) -> None:
    """Achieved fraction of the roofline per item, with both times written on the bar."""
    items = [v for v in roof.values() if isinstance(v, dict) and "predicted_s" in v]
    y = list(range(len(items)))
    ax.barh(y, [v["fraction"] * 100 for v in items], color="tab:green")
    for i, v in enumerate(items):
        ax.text(v["fraction"] * 100 + 1, i, f"measured {_ms(v['measured_s'])}, roofline {_ms(v['predicted_s'])} "
                      f"({v['bound']}-bound)", va="center")
    ax.set_yticks(y, [v["label"] for v in items])
    ax.axvline(100, color="tab:red", ls="--")
    ax.set_xlim(0, max([200] + [v["fraction"] * 200 for v in items]))
    ax.set_xlabel("% of the roofline achieved")
    ax.set_title("measured vs roofline")
