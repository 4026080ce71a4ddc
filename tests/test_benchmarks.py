"""Every benchmark starts: its imports resolve and its command line parses (a benchmark is run by hand, and
nothing else would notice one that no longer starts after a helper moved)."""
import argparse
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import featureviz as fv
import training

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("bench_*.py"))


def test_there_are_benchmarks_to_start():
    assert len(BENCHMARKS) >= 7


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_a_benchmark_starts_and_lists_its_options(script, tmp_path):
    run = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage:" in run.stdout and "--" in run.stdout.replace("--help", "")  # an option of its own


# A bad value is refused by name when the command line is read, before any data are loaded or models trained.
BAD_VALUES = [
    ("bench_featureviz.py", ["--speed", "--epochs", "3"], "argument --epochs: not used by --speed"),
    ("bench_featureviz.py", ["--rounds", "3"], "argument --rounds: not used by the quality table"),
    ("bench_featureviz.py", ["--png", "grid.pgn"], "argument --png: 'grid.pgn' is no figure format"),
    ("bench_featureviz.py", ["--vae-lr", "0"], "argument --vae-lr: must be a number > 0"),
    ("bench_planted.py", ["--steps", "0"], "argument --steps: must be an int >= 1"),
    ("bench_vae.py", ["--epochs", "nan"], "argument --epochs: must be a number > 0"),
    ("bench_training.py", ["accuracy", "--epochs", "-1"], "argument --epochs: must be a number > 0"),
    ("bench_diversity.py", ["--seeds", "0"], "argument --seeds: must be an int >= 1"),
    ("bench_interpolation.py", ["--frames", "2"], "argument --frames: must be an int >= 3"),
]


@pytest.mark.parametrize("script, args, message", BAD_VALUES, ids=lambda v: v if isinstance(v, str) else None)
def test_a_bad_value_is_named_before_the_run(script, args, message, monkeypatch, capsys):
    """Run as a script in this process (started apart above): its parser's error, exit status 2."""
    monkeypatch.syspath_prepend(str(BENCHMARKS[0].parent))  # the benchmarks import one another by name
    monkeypatch.setattr(sys, "argv", [script, *args])
    for module, name in ((data, "load_data"), (training, "train_classifier"), (training, "train_vae"), (fv, "render")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail(f"{script} {args} started its run"))
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(BENCHMARKS[0].parent / script), run_name="__main__")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err, err[-2000:]


def test_the_speed_tables_time_every_run(monkeypatch, capsys):
    """--speed at 1 step and 1 round (one lockstep cycle, no quartiles) on the CPU: the helpers of render() it
    calls in this process (fv._prepared, _eager_step, _resolve...) are still there, and each table has every run."""
    monkeypatch.syspath_prepend(str(BENCHMARKS[0].parent))  # the benchmarks import one another by name
    import bench_featureviz as bench
    monkeypatch.setattr(bench.training, "get_device", lambda: torch.device("cpu"))
    bench.speed(argparse.Namespace(preset="small", steps=1, rounds=1))
    tables = capsys.readouterr().out.split("Step by step")
    assert len(tables) == 2, tables
    for table in tables:
        for name in (bench.BARE, *bench.IMAGE_SPACE, *map(bench.by_hand, bench.BY_HAND)):
            assert f"\n| {name} | " in table, (name, table)
    assert "(step by step): " in tables[1]


def test_every_step_part_is_timed(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS[0].parent))
    import bench_step_parts
    runs, _ = bench_step_parts.parts()
    us = bench_step_parts.per_call(runs, calls=1, rounds=2)
    assert list(us) == list(runs) and all(0 < v < 1e6 for v in us.values()), us
    slept = bench_step_parts.per_call({"1 ms": lambda: time.sleep(1e-3)}, calls=3, rounds=2)["1 ms"]
    assert 1000 <= slept < 20000, slept  # microseconds a call


def test_the_atlas_benchmark_judges_only_a_run_of_its_goal(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS[0].parent))
    import bench_atlas
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    cpu, goal = torch.device("cpu"), argparse.Namespace(preset="compact", steps=256)
    assert bench_atlas.verdict(goal, cpu, 899) == "goal 15 min: met"
    assert bench_atlas.verdict(goal, cpu, 901) == "goal 15 min: NOT met"
    other = argparse.Namespace(preset="small", steps=256)
    assert bench_atlas.verdict(other, cpu, 10).endswith("on 2 CPU threads: not this run")
    assert bench_atlas.verdict(goal, torch.device("mps"), 10).endswith("not this run")  # an Apple GPU: neither
