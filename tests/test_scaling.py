"""The scale-out cost model (bench/scaling.py) and `miaotui estimate --tp/--dp`."""
from __future__ import annotations

import json

import pytest

from miaotui.bench import roofline, scaling
from miaotui.config import config_from_hf


def test_ring_all_reduce_formula():
    link = scaling.Link(gbps=8.0, latency_us=10.0)          # 1 GB/s
    assert link.all_reduce(1e6, 1) == 0
    assert link.all_reduce(1e6, 2) == pytest.approx(1e-3 + 2 * 10e-6)
    assert link.all_reduce(1e6, 4) == pytest.approx(1.5e-3 + 6 * 10e-6)


def test_tp_step_splits_compute_and_adds_two_all_reduces_per_layer():
    cost = roofline.CostModel.from_config(config_from_hf(scaling.LLAMA_7B), roofline.weight_format("int8"))
    machine = roofline.Machine(100e9, {"float32": 1e12}, 8)
    free = scaling.Link(gbps=1e12, latency_us=1e-9)
    step = cost.decode(1, 100)
    one = machine.time(step)
    r = scaling.tp_step(cost, machine, free, 4, 1, step, same_machine=False)
    assert r["compute_memory_s"] == pytest.approx(one / 4)     # own machines: 4x
    assert scaling.tp_step(cost, machine, free, 4, 1, step, same_machine=True)["compute_memory_s"] == \
        pytest.approx(one)                                      # one shared machine: no gain
    slow = scaling.Link(gbps=1e12, latency_us=100.0)
    comm = scaling.tp_step(cost, machine, slow, 2, 1, step, False)["comm_s"]
    layers = cost.cfg.num_layers
    hops = (2 * layers + 1) * 2 + 1 + 2                         # all-reduces, gather, metadata
    assert comm == pytest.approx(hops * 100e-6, rel=1e-3)


def test_scaling_table_predicts_and_flags_what_does_not_fit():
    rows = scaling.scaling_predictions(batch=32, ctx=1024)
    by = {(r["model"], r["setup"], r["tp"], r["dp"]): r for r in rows}
    gpu = scaling.GPU_NODE["name"]
    assert not by[("70B", gpu, 1, 1)]["fits"] and by[("70B", gpu, 8, 1)]["fits"]
    assert by[("7B", gpu, 2, 1)]["tok_s"] > by[("7B", gpu, 1, 1)]["tok_s"]


def test_estimate_cli_tp_dp(tiny_llama_dir, tmp_path, capsys):
    from miaotui.cli import main
    out = tmp_path / "e.json"
    assert main(["estimate", "--model", tiny_llama_dir[0], "--tp", "2", "--dp", "2", "--link-gbps", "10",
                 "--link-latency-us", "50", "--scaling-table", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "PREDICTED tensor parallel 2" in text and "PREDICTED data parallel 2" in text
    assert "PREDICTIONS (roofline" in text
    res = json.loads(out.read_text())["results"]
    assert res["tp2 decode step, batch 1"]["comm_s"] > 0 and res["scaling_predictions"]
