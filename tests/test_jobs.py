"""Batch jobs: per-item seeds, input order, every bad line reported, resume, a SIGKILL mid-run, OOM halving."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import ldlm
from ldlm.cli import main
from ldlm.jobs.batch import run_job
from ldlm.jobs.items import read_items, unconditional_items
from ldlm.jobs.output import JobOutput
from ldlm.jobs.settings import JobSettings, model_fingerprint

from .conftest import TINY_TEXTS


def write_jsonl(path, rows) -> None:
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_per_item_seeds_make_results_independent_of_the_batch(tiny_pipeline):
    seeds = [11, 12, 13, 14]
    for sampler, steps, eta in (("ddpm", None, 0.0), ("ddim", 10, 1.0)):  # both draw noise at every step but the last
        together = tiny_pipeline.sample_latents(4, sampler=sampler, steps=steps, seeds=seeds, eta=eta, progress=False)
        alone = torch.cat([tiny_pipeline.sample_latents(1, sampler=sampler, steps=steps, seeds=[s], eta=eta,
                                                        progress=False) for s in reversed(seeds)]).flip(0)
        assert torch.allclose(together, alone, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(together[0], together[1])
    texts = TINY_TEXTS[:3]
    varied = tiny_pipeline.vary_latents(texts, 0.5, seeds=[1, 2, 3], progress=False)
    assert torch.allclose(varied[2:], tiny_pipeline.vary_latents(texts[2:], 0.5, seeds=[3], progress=False), atol=1e-6)
    with pytest.raises(ValueError, match="one seed per sample"):
        tiny_pipeline.sample_latents(2, seeds=[1], progress=False)


def test_fused_backend_follows_per_item_seeds(tiny_checkpoint):
    reference, fused = ldlm.load(tiny_checkpoint), ldlm.load(tiny_checkpoint, backend="fused")
    kwargs = {"sampler": "ddpm", "seeds": [3, 4, 5], "progress": False}
    assert torch.allclose(fused.sample_latents(3, **kwargs), reference.sample_latents(3, **kwargs), atol=1e-5)


GOOD = [{"id": "a"}, {"id": "b", "text": "the cat sat on the mat.", "mode": "reconstruct"},
        {"id": 70, "text": "a dog ran in the park.", "mode": "vary", "strength": 0.5, "seed": 9},
        {"id": "d", "seed": 123}, {"id": "e", "text": "rain fell on the quiet town."}]
BAD = [b"{not json", {"text": "no id here"}, {"id": "a"}, {"id": "f", "text": "   "}, b'{"id": "g", "text": "caf\xe9"}',
       {"id": "h", "text": "x", "mode": "paraphrase"}, {"id": "i", "text": "x", "mode": "vary", "strength": 1.5},
       {"id": "j", "seed": -1}, [1, 2]]


def settings_for(checkpoint, **overrides) -> JobSettings:
    return JobSettings(model=model_fingerprint(checkpoint), **{"sampler": "ddim", "steps": 5, **overrides})


def test_job_reports_every_bad_line_and_keeps_the_rest_in_order(tiny_checkpoint, tiny_pipeline, tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, [GOOD[0], BAD[0], GOOD[1], *BAD[1:], GOOD[2], GOOD[3], GOOD[4]])
    items = read_items(source.open("rb"), job_seed=0)
    counts = run_job(tiny_pipeline, items, out, settings_for(tiny_checkpoint), batch_size=3, progress=False)
    records = read_jsonl(out)
    assert counts == {"written": 5, "errors": len(BAD), "skipped": 0}
    assert [r.get("id", r.get("line")) for r in records] == ["a", 2, "b", 4, "a", "f", 7, "h", "i", "j", 11, 70, "d", "e"]
    errors = {str(r.get("id", r.get("line"))): r["error"] for r in records if "error" in r}
    assert "not valid JSON" in errors["2"] and "no usable \"id\"" in errors["4"]
    assert "duplicate id 'a' on line 5 (first on line 1)" in errors["a"]
    assert "empty" in errors["f"] and "UTF-8" in errors["7"] and "unknown mode 'paraphrase'" in errors["h"]
    assert "strength must be a number in [0, 1]" in errors["i"] and "\"seed\" must be" in errors["j"]
    assert "not an object" in errors["11"]
    good = {r["id"]: r for r in records if "error" not in r}
    assert good[70]["seed"] == 9 and good[70]["mode"] == "vary" and good[70]["strength"] == 0.5
    assert good["d"]["seed"] == 123 and good["a"]["mode"] == "sample" and good["e"]["mode"] == "reconstruct"
    assert good["b"]["input"] == GOOD[1]["text"] and good["b"]["settings"]["sampler"] == "ddim"
    assert all(isinstance(r["text"], str) for r in good.values())


def test_job_settings_that_cannot_run_fail_before_any_output(tiny_checkpoint, tiny_pipeline, tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, GOOD)
    settings = settings_for(tiny_checkpoint, sampler="dpm++2m", eta=1.0)
    with pytest.raises(ValueError, match="applies to sampler 'ddim' only"):
        run_job(tiny_pipeline, read_items(source.open("rb"), 0), out, settings, progress=False)
    assert not out.exists()


def test_job_output_does_not_depend_on_batching_and_flags_truncation(tiny_checkpoint, tiny_pipeline, tmp_path,
                                                                      caplog, recwarn):
    rows = [*GOOD, {"id": "long", "text": "a b c d " * 50}]
    source = tmp_path / "in.jsonl"
    write_jsonl(source, rows)
    outputs = []
    with caplog.at_level(logging.WARNING, logger="ldlm.jobs.batch"):
        for batch_size in (1, 4):
            out = tmp_path / f"out{batch_size}.jsonl"
            run_job(tiny_pipeline, read_items(source.open("rb"), 0), out, settings_for(tiny_checkpoint),
                    batch_size=batch_size, progress=False)
            outputs.append(read_jsonl(out))
    assert outputs[0] == outputs[1]
    assert outputs[0][-1]["truncated"] is True and "limit of" in outputs[0][-1]["warning"]
    # said by the line's id, not by its place in a batch (issue 37)
    assert [r.getMessage()[:10] for r in caplog.records if "encoder tokens" in r.getMessage()] == ['id:"long":'] * 2
    assert not [w for w in recwarn if "encoder tokens" in str(w.message)]


def test_resume_skips_done_ids_and_refuses_changed_settings(tiny_checkpoint, tiny_pipeline, tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, GOOD)
    items = read_items(source.open("rb"), 0)
    settings = settings_for(tiny_checkpoint)
    run_job(tiny_pipeline, items[:2], out, settings, progress=False)
    with out.open("ab") as f:
        f.write(b'{"id": "torn')  # a write cut short by a crash
    with pytest.raises(FileExistsError, match="pass --resume"):
        run_job(tiny_pipeline, items, out, settings, progress=False)
    counts = run_job(tiny_pipeline, read_items(source.open("rb"), 0), out, settings, resume=True, progress=False)
    assert counts["skipped"] == 2 and counts["written"] == 3
    full = tmp_path / "full.jsonl"
    run_job(tiny_pipeline, read_items(source.open("rb"), 0), full, settings, progress=False)
    assert read_jsonl(out) == read_jsonl(full)
    with pytest.raises(ValueError, match="written with other settings"):
        run_job(tiny_pipeline, items, out, settings_for(tiny_checkpoint, steps=6), resume=True, progress=False)


def test_a_jobs_temperature_scales_its_sampled_lines_and_keys_its_settings(tiny_checkpoint, tiny_pipeline,
                                                                          tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, [{"id": "d", "seed": 123}, {"id": "v", "text": "a dog ran in the park.", "mode": "vary",
                                                    "strength": 0.5, "seed": 9}])
    settings = settings_for(tiny_checkpoint, eta=1.0, temperature=0.3)
    run_job(tiny_pipeline, read_items(source.open("rb"), 0), out, settings, progress=False)
    records = {r["id"]: r for r in read_jsonl(out)}
    cooled = tiny_pipeline.sample_latents(1, seeds=[123], sampler="ddim", steps=5, eta=1.0, temperature=0.3,
                                          progress=False)
    assert records["d"]["text"] == tiny_pipeline.decode(cooled, progress=False)[0]
    assert records["d"]["settings"]["temperature"] == 0.3
    varied = tiny_pipeline.vary(["a dog ran in the park."], 0.5, sampler="ddim", steps=5, eta=1.0, seeds=[9],
                                progress=False)  # a varied line starts from its text, not from noise
    assert records["v"]["text"] == varied[0]
    assert settings_for(tiny_checkpoint, temperature=1.0).hash() == settings_for(tiny_checkpoint).hash()
    with pytest.raises(ValueError, match="written with other settings"):
        run_job(tiny_pipeline, read_items(source.open("rb"), 0), out, settings_for(tiny_checkpoint, eta=1.0),
                resume=True, progress=False)
    with pytest.raises(ValueError, match=r"temperature must be a number in \[0, 2\]"):
        run_job(tiny_pipeline, [], tmp_path / "bad.jsonl", settings_for(tiny_checkpoint, temperature=-1),
                progress=False)


def test_out_of_memory_halves_the_batch_and_says_so(tiny_checkpoint, tmp_path, monkeypatch, caplog):
    pipe = ldlm.load(tiny_checkpoint)
    real = pipe.sample_latents

    def small_memory(n, **kwargs):
        if n > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(n, **kwargs)

    monkeypatch.setattr(pipe, "sample_latents", small_memory)
    out = tmp_path / "out.jsonl"
    with caplog.at_level(logging.WARNING, logger="ldlm.jobs.batch"):
        counts = run_job(pipe, read_items([json.dumps({"id": i}).encode() for i in range(7)], 0), out,
                         settings_for(tiny_checkpoint), batch_size=8, progress=False)
    assert counts["written"] == 7 and [r["id"] for r in read_jsonl(out)] == list(range(7))
    assert "out of memory at a batch of 7 items: retrying at 4" in caplog.text
    assert "retrying at 2" in caplog.text


def test_job_killed_mid_run_and_resumed_writes_every_id_once(tiny_checkpoint, tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, [{"id": i} for i in range(40)] + [b"{bad"])
    command = ["generate", str(tiny_checkpoint), "--input", str(source), "--output", str(out), "--batch-size", "2",
               "--sampler", "ddpm", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "ldlm.cli", *command], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 600  # generous: a loaded CI machine starts Python slowly
    while time.time() < deadline and process.poll() is None and (
            not out.exists() or len(out.read_bytes().splitlines()) < 4):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert out.exists(), f"the job wrote nothing before it was killed: {process.stderr.read().decode()[-2000:]}"
    written = len(out.read_bytes().splitlines())
    assert 4 <= written < 41, "the job should have been killed mid-run"
    assert main([*command, "--resume"]) == 0
    records = read_jsonl(out)
    ids = [r["id"] for r in records if "id" in r]
    assert sorted(ids) == list(range(40)) and len(records) == 41
    assert records[-1]["line"] == 41 and "not valid JSON" in records[-1]["error"]


def test_cli_unconditional_job_and_usage_errors(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(tiny_checkpoint), "-n", "3", "--output", str(out), "--sampler", "ddim",
                 "--steps", "4", "--no-progress"]) == 0
    records = read_jsonl(out)
    assert [r["id"] for r in records] == [0, 1, 2] and len({r["seed"] for r in records}) == 3
    assert "3 written, 0 bad lines reported, 0 already done" in capsys.readouterr().err
    assert main(["generate", str(tiny_checkpoint), "--input", str(out)]) == 2
    assert "--input needs --output" in capsys.readouterr().err


def test_job_records_name_the_sampler_and_steps_that_ran(tiny_checkpoint, tiny_pipeline, tmp_path):
    out = tmp_path / "out.jsonl"
    run_job(tiny_pipeline, read_items(b'{"id": 1}\n', 0), out, settings_for(tiny_checkpoint, sampler=None, steps=None),
            progress=False)
    settings = read_jsonl(out)[0]["settings"]
    expected = tiny_pipeline.sampling(None, None)
    assert (settings["sampler"], settings["steps"]) == expected and settings["sampler"] is not None


def test_a_job_reads_its_items_as_it_reaches_them(tiny_checkpoint, tiny_pipeline, tmp_path, monkeypatch):
    """`ldlm generate -n N --output F` used to build all N items before writing one (3.5 GB and no file after
    150 s for N = 10**9, issue 37): items are drawn from an iterator a batch at a time, each batch written as
    it ends."""
    drawn, at_write = [0], []

    def counted(items):
        for item in items:
            drawn[0] += 1
            yield item

    real_write = JobOutput.write
    monkeypatch.setattr(JobOutput, "write", lambda self, records: (at_write.append(drawn[0]),
                                                                   real_write(self, records)))
    out = tmp_path / "out.jsonl"
    counts = run_job(tiny_pipeline, counted(unconditional_items(10, 0)), out, settings_for(tiny_checkpoint),
                     batch_size=4, progress=False, total=10)
    assert counts == {"written": 10, "errors": 0, "skipped": 0}
    assert at_write == [4, 8, 10]  # never more than the batch in flight
    assert [r["id"] for r in read_jsonl(out)] == list(range(10))
    again = run_job(tiny_pipeline, counted(unconditional_items(12, 0)), out, settings_for(tiny_checkpoint),
                    batch_size=4, resume=True, progress=False)
    assert again == {"written": 2, "errors": 0, "skipped": 10}
