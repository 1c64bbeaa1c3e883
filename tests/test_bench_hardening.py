"""Bench/estimate hardening. Roofline calibration: never stored when taken under load, the
best of several rounds, re-measured when a run beats it, so no report says more than 100%
(measurements mocked). Perplexity shows progress."""
import json

import pytest

from miaotui.bench import roofline


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """calibrate() returns the queued bandwidths (GB/s); the load average is settable."""
    state = {"bw": [], "load": 0.0, "calls": 0}

    def calibrate(threads=None):
        state["calls"] += 1
        bw = state["bw"].pop(0)
        return roofline.Machine(bw * 1e9, {"float32": bw * 10e9}, threads or 1, f"cal {bw}")

    monkeypatch.setattr(roofline, "calibrate", calibrate)
    monkeypatch.setattr(roofline.time, "sleep", lambda s: None)
    monkeypatch.setattr(roofline.os, "getloadavg", lambda: (state["load"], 0.0, 0.0))
    monkeypatch.setattr(roofline.os, "cpu_count", lambda: 2)
    path = str(tmp_path / "calibration.json")
    monkeypatch.setattr(roofline, "calibration_path", lambda: path)
    state["path"] = path
    return state


def stored(fake) -> list[float]:
    try:
        with open(fake["path"]) as f:
            return [m["bandwidth"] / 1e9 for m in json.load(f).values()]
    except FileNotFoundError:
        return []


def test_busy_calibration_is_used_but_not_stored(fake, capsys):
    fake["load"], fake["bw"] = 3.4, [3.4, 5.0]                # 2 CPUs, load 3.4: busy
    m = roofline.load_machine(threads=2)
    assert m.bandwidth == 5.0e9                               # best of the rounds
    assert stored(fake) == []
    assert "not stored" in capsys.readouterr().err
    fake["load"], fake["bw"] = 0.1, [30.0, 28.0]               # quiet: measured again, stored
    assert roofline.load_machine(threads=2).bandwidth == 30.0e9
    assert stored(fake) == [30.0]
    assert roofline.load_machine(threads=2).bandwidth == 30.0e9 and fake["calls"] == 4   # cached


def test_a_run_that_beats_the_roof_recalibrates(fake):
    m = roofline.Machine(3.4e9, {"float32": 34e9}, 2, "taken under load")
    cost = roofline.Cost(flops=1e6, bytes=1e9)                # memory-bound: 1 GB
    fake["bw"] = [25.0, 30.0]
    roofline.reconcile(m, lambda mm: mm.time(cost), measured=0.05)   # 20 GB/s measured
    assert m.bandwidth == 30e9 and stored(fake) == [30.0]
    r = roofline.fraction_report("decode", m.time(cost), 0.05, cost, m)
    assert r["fraction"] == pytest.approx(20 / 30)


def test_never_over_100_percent_even_if_recalibration_is_low(fake):
    m = roofline.Machine(3.4e9, {"float32": 34e9}, 2, "taken under load")
    cost = roofline.Cost(flops=1e6, bytes=1e9)
    fake["load"], fake["bw"] = 4.0, [4.0, 5.0]                 # still busy: stays low, not stored
    roofline.reconcile(m, lambda mm: mm.time(cost), measured=0.05)
    assert stored(fake) == []
    r = roofline.fraction_report("decode", m.time(cost), 0.05, cost, m)
    assert r["fraction"] <= 1.0 + 1e-9
    assert "100%" in roofline.describe(r, 20.0) and "raised" in m.source


def test_a_run_within_the_roof_changes_nothing(fake):
    m = roofline.Machine(30e9, {"float32": 300e9}, 2, "quiet")
    cost = roofline.Cost(flops=1e6, bytes=1e9)
    roofline.reconcile(m, lambda mm: mm.time(cost), measured=0.05)
    assert fake["calls"] == 0 and m.bandwidth == 30e9


def test_perplexity_shows_progress(tiny_llama_dir, capsys):
    """A long text took 93 s without a word: the CLI shows a token bar on stderr."""
    import os

    from miaotui.cli import main
    data = os.path.join(os.path.dirname(__file__), "data")
    text = os.path.join(data, sorted(f for f in os.listdir(data) if f.endswith(".txt"))[0])
    assert main(["perplexity", "--model", tiny_llama_dir[0], "--text", text, "--max-tokens", "200",
                 "--window", "64"]) == 0
    err = capsys.readouterr().err
    assert "perplexity: 100%" in err and "tok" in err
