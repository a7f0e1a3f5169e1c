"""`ldlm bench`: every stage timed per backend and batch size, JSON and a plot written."""

from __future__ import annotations

import json

from ldlm.cli import main
from ldlm.jobs.benchmark import CONDITIONAL_STAGES, STAGES


def test_bench_a_preset_on_two_backends(tmp_path, capsys):
    out, picture = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["bench", "--preset", "tiny", "--backends", "reference", "onnx", "--batch-sizes", "1", "3",
                 "--sampler", "ddim", "--steps", "3", "--iters", "3", "--max-new-tokens", "4", "--json", str(out),
                 "--plot", str(picture), "--int8", "--threads", "1"])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["backend"], r["batch"], r["stage"]) for r in rows} == {
        (b, n, s) for b in ("reference", "onnx", "onnx int8") for n in (1, 3) for s in STAGES
        if s not in CONDITIONAL_STAGES}
    for r in rows:
        assert 0 < r["median_s"] <= r["p90_s"] <= r["p99_s"] and r["iters"] == 3
        assert r["first_call_s"] > 0  # the one warm-up run, timed alone (compiles, captures, allocations)
        assert abs(r["samples_per_s"] - r["batch"] / r["median_s"]) < 1e-6 * r["samples_per_s"]
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    captured = capsys.readouterr()
    assert "| onnx | 3 | end_to_end |" in captured.out and "| onnx int8 | 1 | loop |" in captured.out
    assert "1 intra-op threads" in captured.err  # --threads reaches ONNX Runtime too
    assert {(r["sampler"], r["steps"]) for r in rows} == {("ddim", 3)}


def test_bench_usage_errors(tiny_checkpoint, capsys):
    assert main(["bench", str(tiny_checkpoint), "--preset", "tiny"]) == 2
    assert "not both" in capsys.readouterr().err


def test_bench_of_a_checkpoint_runs_its_own_sampler_and_says_so(tiny_checkpoint, tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", str(tiny_checkpoint), "--batch-sizes", "2", "--iters", "1", "--warmup", "0",
                 "--max-new-tokens", "2", "--no-progress", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["sampler"], r["steps"]) for r in rows} == {tiny_pipeline.sampling(None, None)}
    assert all(r["first_call_s"] is None for r in rows)  # --warmup 0: no first call timed apart
