"""benchmarks/adapt_scaleout.py in its CPU smoke mode: 1 process vs 2 gloo processes, reload check.

The script is run as the lead runs it on the GPU machine (a subprocess), on a tiny model: it must
report a loss MATCH (on CPU in float32 the two runs agree to rounding), a reload through the
folders' own remote code with ``sparsek`` blocked, and copy both metrics files next to the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "adapt_scaleout.py"


@pytest.mark.slow
def test_cpu_smoke_mode_matches_and_reloads(tmp_path):
    report = tmp_path / "report" / "scaleout.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    res = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--work", str(tmp_path / "work"),
                          "--out", str(report)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    text = report.read_text()
    assert "verdict: **MATCH**" in text and "**reload OK**" in text
    assert "`import sparsek` in that process: blocked" in text
    assert "transformers_modules" in text  # served by the folders' remote code
    # both runs logged every step; the 2-process run's losses equal the 1-process run's to rounding
    one = [json.loads(x) for x in (report.parent / "scaleout-one-metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (report.parent / "scaleout-two-metrics.jsonl").read_text().splitlines()]
    la = [r["loss"] for r in one if r["kind"] == "train"]
    lb = [r["loss"] for r in two if r["kind"] == "train"]
    assert len(la) == len(lb) == 3
    assert lb == pytest.approx(la, rel=1e-4)
    assert la[0] != la[-1]  # training moved the loss: the comparison is not of constants
    # the 2-process run checkpointed half-way (steps 1 and 2 of 3) with one row per process
    cfg = json.loads((tmp_path / "work" / "two" / "adapt_config.json").read_text())
    assert cfg["config"]["checkpoint_every"] == 1 and cfg["config"]["batch_size"] == 1
    assert sorted(p.name for p in report.parent.iterdir()) == [
        "scaleout-one-metrics.jsonl", "scaleout-two-metrics.jsonl", "scaleout.md"]


def test_bad_arguments_exit_2(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    (tmp_path / "notes.md").write_text("my notes\n")
    cases = [
        (["--work", str(tmp_path / "busy")], "is not empty"),
        (["--out", str(tmp_path / "notes.md"), "--work", str(tmp_path / "w1")], "not overwriting"),
        (["--steps", "1", "--work", str(tmp_path / "w2")], "--steps must be >= 2"),
    ]
    for extra, message in cases:
        res = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", *extra], capture_output=True,
                             text=True, cwd=tmp_path, timeout=120)
        assert res.returncode == 2, res.stderr
        assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert (tmp_path / "notes.md").read_text() == "my notes\n"
