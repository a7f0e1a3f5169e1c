"""Tiles tuned on a GPU and stored in the repository (ldlm.kernels.tile_table, bench/gpu/tune_tiles.py): the lookup
the kernel's launch makes, its fallback to the untuned rule, and the tuner on the CPU (the interpreter: its
times mean nothing there; what is checked is that it records the engine's shapes, checks every candidate
against torch and writes a table the lookup reads)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldlm.kernels import tile_table
from ldlm.kernels.fused_linear import Tiles, default_tiles

BENCH = Path(__file__).resolve().parents[1] / "bench"
CUDA = torch.device("cuda")
H200 = {"multiprocessors": 132}


def test_keys_bucket_rows_and_name_the_epilogue_and_weights():
    assert tile_table.shape_key(64, 768, 768, dtype="bfloat16", gelu=False) == "bfloat16/same/linear/m64/n768/k768"
    assert tile_table.shape_key(33, 3072, 768, dtype="float32", gelu=True, weights="fp8") == \
        "float32/fp8/gelu/m64/n3072/k768"
    assert [tile_table.row_bucket(r) for r in (1, 2, 3, 4, 5, 256, 257)] == [1, 2, 4, 4, 8, 256, 512]


def test_a_stored_tiling_is_used_on_its_gpu_only(tmp_path, monkeypatch):
    table = {"format": 1, "gpus": {"NVIDIA H200": {"fused_linear": {
        "bfloat16/same/linear/m64/n768/k768": {"block_m": 32, "block_n": 128, "block_k": 128, "split_k": 2,
                                                "num_warps": 8, "num_stages": 4, "us": 3.1, "default_us": 4.0},
        "bfloat16/same/gelu/m64/n3072/k768": {"block_m": 64, "block_n": 64, "block_k": 64, "split_k": 4,
                                              "num_warps": 4, "num_stages": 3, "us": 5.0, "default_us": 6.0}}}}}
    (tmp_path / "tiles.json").write_text(json.dumps(table))
    monkeypatch.setattr(tile_table, "TABLE", tmp_path / "tiles.json")
    tile_table._read.cache_clear()
    try:
        args = {"device": CUDA, "dtype": torch.bfloat16, **H200}
        assert default_tiles(50, 768, 768, gelu=False, gpu="NVIDIA H200", **args) == Tiles(32, 128, 128, 2, 8, 4)
        untuned = default_tiles(50, 768, 768, gelu=False, gpu="NVIDIA H100 80GB HBM3", **args)
        assert untuned == default_tiles(50, 768, 768, gelu=False, gpu="(untuned)", **args) != Tiles(32, 128, 128, 2, 8, 4)
        # a GELU needs the whole sum: a stored split for it is not trusted
        assert default_tiles(64, 3072, 768, gelu=True, gpu="NVIDIA H200", **args).split_k == 1
        # fp32 activations, or fp8 weights, are other shapes
        assert default_tiles(64, 768, 768, gelu=False, gpu="NVIDIA H200", **{**args, "dtype": torch.float32}) == untuned
    finally:
        tile_table._read.cache_clear()


def test_the_committed_table_reads_and_an_old_format_is_refused(tmp_path):
    tile_table._read.cache_clear()
    assert tile_table.TABLE.is_file()  # kernels/tiles.json, shipped as package data (pyproject.toml)
    assert isinstance(tile_table._read(tile_table.TABLE), dict)
    (tmp_path / "old.json").write_text(json.dumps({"format": 0, "gpus": {}}))
    with pytest.raises(ValueError, match="tune again with bench/gpu/tune_tiles.py"):
        tile_table.tuned("fused_linear", "x", "y", path=tmp_path / "old.json")


def test_tuner_records_the_engines_shapes_and_writes_a_table_the_lookup_reads(tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCH / "gpu"))
    try:
        import tune_tiles
    finally:
        sys.path.remove(str(BENCH / "gpu"))
    shapes = tune_tiles.engine_shapes("tiny", [3])
    steps, decodes = [s for s in shapes if s.where == "step"], [s for s in shapes if s.where == "decode"]
    assert {s.rows for s in steps} == {3} and {s.rows for s in decodes} == {12}  # 4 beams a row of the batch
    assert any(s.gelu is True for s in steps) and any(s.gelu == "tanh" and s.conv1d for s in decodes)
    for s in shapes:
        tiles = tune_tiles.candidates(s, CUDA, **H200)
        assert tiles[0] == default_tiles(s.rows, s.n, s.k, device=CUDA, gelu=s.gelu, gpu="(untuned)", **H200)
        assert all(t.block_m == 16 for t in tiles[1:])  # no more rows a program than the shape has (16 at least)
        if s.gelu or s.k <= 64:  # a GELU needs the whole sum; one K step leaves nothing to split
            assert all(t.split_k == 1 for t in tiles), s
        else:
            assert any(t.split_k > 1 for t in tiles), s
    out = tmp_path / "tiles.json"
    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton compiled, or its interpreter (conftest)
    argv = ["tune_tiles.py", "--preset", "tiny", "--device", device, "--rows", "2", "--reps", "1",
            "--max-candidates", "2", "--dtypes", "float32", "--no-fp8", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    tune_tiles.main()  # in this process (the conftest set TRITON_INTERPRET=1 on CPU)
    table = json.loads(out.read_text())
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
    shapes = table["gpus"][gpu]["fused_linear"]
    assert len(shapes) >= 6 and all(e["us"] <= e["default_us"] and e["candidates"] == 2 for e in shapes.values())
    key = next(iter(shapes))
    merged = tmp_path / "merged.json"
    subprocess.run([sys.executable, str(BENCH / "gpu" / "tune_tiles.py"), "--merge", str(tile_table.TABLE), str(out),
                    "--out", str(merged)], check=True, timeout=120)
    entry = tile_table.tuned("fused_linear", gpu, key, path=merged)
    assert entry == shapes[key]
