"""bench/learning.py's own logic (variants, commands, resumability, summaries), without training
or scoring: those are the real entry point and evaluation/evaluate.py, tested elsewhere."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_learning", ROOT / "bench" / "learning.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def args_for(bench, tmp_path: Path, *extra: str):
    return bench.parse_args(["--train-shards", "T", "--heldout-shards", "H", "--out", str(tmp_path),
                             "--variant", "spade=model.sfm=false", "--variant", "ssgan=",
                             "--variant", "paper=model.sfm_form=paper model.sfm_resize=nearest", *extra])


def test_variants_and_train_command(bench, tmp_path) -> None:
    args = args_for(bench, tmp_path, "--seeds", "0,2", "--steps", "600", "--set", "model.ngf=4")
    assert [(v.name, v.overrides) for v in args.variant] == [
        ("spade", ["model.sfm=false"]), ("ssgan", []), ("paper", ["model.sfm_form=paper", "model.sfm_resize=nearest"])]
    assert args.seeds == [0, 2]
    cmd = bench.train_command(args, args.variant[2], 2)
    assert cmd[1:5] == ["-m", "ssgan_dist.train", "--config", "demo"]
    # common overrides first, the variant's next, the benchmark's own settings last
    assert cmd.index("model.ngf=4") < cmd.index("model.sfm_form=paper") < cmd.index("train.max_steps=600")
    for expected in ("checkpoint.every=200", "run.seed=2", "train.threads=1", "data.shards=T",
                     f"run.dir={tmp_path / 'runs' / 'paper-s2'}"):
        assert expected in cmd
    keep = next(c for c in cmd if c.startswith("checkpoint.keep="))
    assert int(keep.split("=")[1]) >= 600 // 200 + 1


@pytest.mark.parametrize("bad", ["noname", "=x=1", "a=model.sfm", "../x=model.sfm=false"])
def test_bad_variants_are_refused(bench, bad) -> None:
    with pytest.raises(Exception):
        bench.parse_variant(bad)


def test_finished_runs_are_skipped(bench, tmp_path) -> None:
    args = args_for(bench, tmp_path, "--steps", "400")
    rd = bench.run_dir(args, args.variant[0], 0)
    rd.mkdir(parents=True)
    (rd / "ckpt-000000200.pt").write_bytes(b"")
    assert not bench.finished(args, args.variant[0], 0)
    (rd / "ckpt-000000400.pt").write_bytes(b"")
    assert bench.finished(args, args.variant[0], 0)


def test_summary_and_markdown(bench, tmp_path) -> None:
    args = args_for(bench, tmp_path)
    table = {"spade": {0: {200: {"ssim": 0.4, "l1": 0.2}, 400: {"ssim": 0.5, "l1": 0.1}},
                       1: {200: {"ssim": 0.6, "l1": 0.1}}}}
    mean = bench.summarize(args, table)
    assert mean["spade"][200]["ssim"] == pytest.approx(0.5) and mean["spade"][200]["seeds"] == 2
    assert mean["spade"][400]["ssim_min"] == mean["spade"][400]["ssim_max"] == 0.5
    md = bench.markdown(table, mean)
    assert "| spade | 200 | 0.500 | 0.150 | 0.400 / 0.200 | 0.600 / 0.100 |" in md
    assert "| spade | 400 | 0.500 | 0.100 | 0.500 / 0.100 | - |" in md
    json.dumps({n: {str(k): v for k, v in per.items()} for n, per in mean.items()})
