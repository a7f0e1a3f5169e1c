"""Broken and hostile inputs to batch jobs and to the API and CLI (issue 17): no job loses or mixes data, one poison
line never stops the others, and every bad argument gets a one-line error naming it."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import ldlm
from ldlm.cli import main
from ldlm.jobs.batch import run_job
from ldlm.jobs.items import read_items
from ldlm.jobs.output import JobOutput
from ldlm.jobs.settings import JobOutputError, model_fingerprint

from .conftest import TINY_TEXTS
from .test_jobs import GOOD, read_jsonl, settings_for, write_jsonl


def run_lines(pipe, checkpoint, lines: list[bytes], out, **kwargs) -> dict:
    return run_job(pipe, read_items(lines, 0), out, settings_for(checkpoint), progress=False, **kwargs)


def test_poison_lines_become_their_own_error_records(tiny_checkpoint, tiny_pipeline, tmp_path):
    """Each of these stopped a job for good, and every resume stopped at it again."""
    out = tmp_path / "out.jsonl"
    poison = [b'{"id": "big-seed", "seed": 18446744073709551616}', b'{"id": "surrogate", "text": "caf\\ud800"}',
              b'{"id": "bad\\udc80id"}', b'{"id": ' + b"7" * 5000 + b"}", b'{"id": ' + b"7" * 30 + b"}",
              b'{"id": "typo", "text": "the cat sat.", "mode": "vary", "strenght": 0.95}',
              b'{"id": "strength-alone", "text": "the cat sat.", "strength": 0.5}',
              b'{"id": true}', b'{"id": "deep", "seed": ' + b"[" * 100000 + b"]" * 100000 + b"}",
              b'{"id": "number-source", "source": 42}']
    lines = [json.dumps(GOOD[0]).encode(), *poison, json.dumps(GOOD[4]).encode()]
    counts = run_lines(tiny_pipeline, tiny_checkpoint, lines, out)
    assert counts == {"written": 2, "errors": len(poison), "skipped": 0}
    records = read_jsonl(out)
    errors = [r["error"] for r in records[1:-1]]
    assert "\"seed\" must be a whole number in [0, 2**63 - 1]" in errors[0]
    assert "lone surrogate" in errors[1] and "lone surrogate" in errors[2]
    assert "cannot be read" in errors[3] and "fit in 64 bits" in errors[4]
    assert "unknown field(s) ['strenght']" in errors[5] and "applies to mode \"vary\" only" in errors[6]
    assert "no usable \"id\"" in errors[7] and "cannot be read" in errors[8]
    assert "\"source\" must be a text (a JSON string), got 42" in errors[9]
    assert records[0]["id"] == "a" and records[-1]["id"] == "e" and "text" in records[-1]
    assert run_lines(tiny_pipeline, tiny_checkpoint, lines, out, resume=True)["skipped"] == len(lines)


def test_an_item_failing_alone_is_reported_and_the_others_run(tiny_checkpoint, tmp_path, monkeypatch):
    pipe = ldlm.load(tiny_checkpoint)
    real = pipe.encode

    def encode(texts, **kwargs):
        if "poison" in " ".join(texts):
            raise FloatingPointError("non-finite latent at step 3")
        return real(texts, **kwargs)

    monkeypatch.setattr(pipe, "encode", encode)
    out = tmp_path / "out.jsonl"
    lines = [json.dumps({"id": i, "text": t}).encode() for i, t in enumerate(["the cat sat.", "poison pill.", "rain."])]
    assert run_lines(pipe, tiny_checkpoint, lines, out, batch_size=3) == {"written": 2, "errors": 1, "skipped": 0}
    records = read_jsonl(out)
    assert [r["id"] for r in records] == [0, 1, 2] and "non-finite latent at step 3" in records[1]["error"]
    monkeypatch.setattr(pipe, "encode", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost")))
    with pytest.raises(RuntimeError, match="device lost"):  # every item fails: the job's failure, not theirs
        run_lines(pipe, tiny_checkpoint, lines, tmp_path / "other.jsonl", batch_size=3)


def test_bom_and_cr_line_endings_read_as_meant(tiny_checkpoint, tiny_pipeline, tmp_path):
    rows = [json.dumps(r).encode() for r in GOOD[:3]]
    expected = read_items(b"\n".join(rows), 0)
    for data in (b"\xef\xbb\xbf" + b"\n".join(rows), b"\r".join(rows), b"\r\n".join(rows) + b"\r\n"):
        items = read_items(data, 0)
        assert [(i.id, i.text, i.error) for i in items] == [(i.id, i.text, i.error) for i in expected]


def test_resume_never_touches_a_file_ldlm_did_not_write(tiny_checkpoint, tiny_pipeline, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(json.dumps(r).encode() for r in GOOD))  # no final newline
    before = source.read_bytes()
    assert main(["generate", str(tiny_checkpoint), "--input", str(source), "--output", str(source), "--resume",
                 "--sampler", "ddim", "--steps", "2", "--no-progress"]) == 2
    assert "is the --input file" in capsys.readouterr().err and source.read_bytes() == before
    other = tmp_path / "notes.jsonl"
    shutil.copy(source, other)
    with pytest.raises(JobOutputError, match="is not a record of an ldlm job"):
        run_job(tiny_pipeline, read_items(source.read_bytes(), 0), other, settings_for(tiny_checkpoint), resume=True,
                progress=False)
    assert other.read_bytes() == before
    other.write_bytes(b"just a note without a newline")
    with pytest.raises(JobOutputError, match="ends in a line ldlm did not write"):
        run_job(tiny_pipeline, [], other, settings_for(tiny_checkpoint), resume=True, progress=False)
    assert other.read_bytes() == b"just a note without a newline"


def test_a_whole_record_missing_only_its_newline_is_kept(tiny_checkpoint, tiny_pipeline, tmp_path):
    out = tmp_path / "out.jsonl"
    items = read_items([json.dumps(r).encode() for r in GOOD], 0)
    run_job(tiny_pipeline, items[:2], out, settings_for(tiny_checkpoint), progress=False)
    out.write_bytes(out.read_bytes()[:-1])
    counts = run_job(tiny_pipeline, items, out, settings_for(tiny_checkpoint), resume=True, progress=False)
    assert counts["skipped"] == 2 and [r["id"] for r in read_jsonl(out)] == [r["id"] for r in GOOD]


def test_resume_refuses_a_checkpoint_with_other_weights(tiny_checkpoint, tiny_pipeline, tmp_path):
    """Two checkpoints that share config.json and latent_stats but not their weights used to share a fingerprint."""
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    weights = load_file(other / "reverse.safetensors")
    weights = {k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}
    save_file(weights, other / "reverse.safetensors")
    assert model_fingerprint(other) != model_fingerprint(tiny_checkpoint)
    out = tmp_path / "out.jsonl"
    items = read_items([json.dumps(r).encode() for r in GOOD], 0)
    run_job(tiny_pipeline, items[:2], out, settings_for(tiny_checkpoint), progress=False)
    with pytest.raises(ValueError, match="was written by another model"):
        run_job(ldlm.load(other), items, out, settings_for(other), resume=True, progress=False)


def test_resume_runs_a_line_edited_since_it_was_written(tiny_checkpoint, tiny_pipeline, tmp_path, caplog):
    out = tmp_path / "out.jsonl"
    first = [{"id": "x", "text": "the cat sat on the mat."}, {"id": "y", "text": "rain fell on the quiet town."}]
    run_job(tiny_pipeline, read_items([json.dumps(r).encode() for r in first], 0), out, settings_for(tiny_checkpoint),
            progress=False)
    edited = [first[0], {"id": "y", "text": "she reads a book every night."}]
    with caplog.at_level(logging.WARNING, logger="ldlm.jobs.batch"):
        counts = run_job(tiny_pipeline, read_items([json.dumps(r).encode() for r in edited], 0), out,
                         settings_for(tiny_checkpoint), resume=True, progress=False)
    assert counts == {"written": 1, "errors": 0, "skipped": 1}
    records = read_jsonl(out)
    assert [r["id"] for r in records] == ["x", "y", "y"] and records[-1]["input"] == edited[1]["text"]
    assert "1 lines of the input changed" in caplog.text


def test_two_jobs_never_write_one_output(tiny_checkpoint, tiny_pipeline, tmp_path):
    out = tmp_path / "out.jsonl"
    settings = settings_for(tiny_checkpoint)
    with JobOutput(out, settings, resume=False):
        with pytest.raises(JobOutputError, match="being written by another job"):
            run_job(tiny_pipeline, read_items([b'{"id": 1}'], 0), out, settings, progress=False)
    assert run_job(tiny_pipeline, read_items([b'{"id": 1}'], 0), out, settings, progress=False)["written"] == 1


def test_a_failed_write_says_where_and_keeps_what_was_written(tiny_checkpoint, tiny_pipeline, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    items = read_items([json.dumps({"id": i}).encode() for i in range(4)], 0)
    real_fsync, calls = os.fsync, []

    def full_disk(fd):
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(JobOutputError, match=r"writing .*out.jsonl failed \(No space left on device\): the 2 records"):
        run_job(tiny_pipeline, items, out, settings_for(tiny_checkpoint), batch_size=2, progress=False)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert [r["id"] for r in read_jsonl(out)][:2] == [0, 1]
    counts = run_job(tiny_pipeline, items, out, settings_for(tiny_checkpoint), resume=True, progress=False)
    assert counts["skipped"] >= 2 and sorted({r["id"] for r in read_jsonl(out)}) == [0, 1, 2, 3]


@pytest.mark.parametrize("call, message", [
    (lambda p: p.generate(1, seed=-1, progress=False), r"seed must be a whole number in \[0, 2\*\*63 - 1\]"),
    (lambda p: p.generate(1, seed=2**63, progress=False), "seed must be a whole number"),
    (lambda p: p.generate(1, seed=1.5, progress=False), "seed must be a whole number"),
    (lambda p: p.generate(1, seed="1", progress=False), "seed must be a whole number"),
    (lambda p: p.generate(1, seed=None, progress=False), "seed must be a whole number"),
    (lambda p: p.sample_latents(1, seeds=[2**64], progress=False), r"seeds\[0\] must be a whole number"),
    (lambda p: p.generate(1, sampler="ddim", steps=2.5, progress=False), "steps must be a whole number"),
    (lambda p: p.generate(1, sampler="ddim", steps=True, progress=False), "steps must be a whole number"),
    (lambda p: p.generate(1, sampler="ddim", eta=True, progress=False), "eta must be a number"),
    (lambda p: p.vary(["the cat."], strength=True, progress=False), "strength must be a number in"),
    (lambda p: p.encode(["caf\ud800"]), "text 0 holds a lone surrogate"),
    (lambda p: p.encode(["the cat."], batch_size=0), "batch_size must be a whole number >= 1"),
    (lambda p: p.generate(2, batch_size=0, progress=False), "batch_size must be a whole number >= 1"),
    (lambda p: p.decode(torch.zeros(1, 32), num_beams=0, progress=False), "num_beams must be a whole number"),
    (lambda p: p.generate(1, num_beams=33, progress=False), "num_beams must be a whole number from 1 to 32"),
    (lambda p: p.vary(["the cat."], num_beams=10**9, progress=False), "from 1 to 32"),
])
def test_strict_arguments_in_the_api(tiny_pipeline, call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_pipeline)


def test_devices_that_do_not_exist_are_one_line_errors(tiny_checkpoint, capsys):
    with pytest.raises(ValueError, match="not a device name"):
        ldlm.load(tiny_checkpoint, device="gpu0")
    for device, message in (("banana", "not a device name"), ("cuda:99", "cuda:99")):
        assert main(["generate", str(tiny_checkpoint), "-n", "1", "--device", device]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    if not torch.cuda.is_available():
        assert main(["generate", str(tiny_checkpoint), "-n", "1", "--device", "cuda"]) == 2
        assert "CUDA is not available here" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bench", "--preset", "tiny", "--batch-sizes", "0"], "each batch size must be a whole number >= 1"),
    (["bench", "--preset", "tiny", "--iters", "0"], "iters must be a whole number >= 1"),
    (["generate", "{ckpt}", "-n", "1", "--seed", "-1"], "seed must be a whole number in [0, 2**63 - 1]"),
    (["generate", "{ckpt}", "--input", "{tmp}/missing.jsonl", "--output", "{tmp}/o.jsonl"],
     "missing.jsonl does not exist"),
    (["generate", "{ckpt}", "--input", "{tmp}", "--output", "{tmp}/o.jsonl"], "is a directory"),
    (["generate", "{ckpt}", "-n", "1", "--output", "{tmp}"], "is a directory: pass a file"),
    (["reconstruct", "{ckpt}", "--file", "{tmp}/missing.txt"], "--file {tmp}/missing.txt does not exist"),
    (["reconstruct", "{ckpt}", "--file", "{tmp}"], "is a directory: pass a text file"),
    (["reconstruct", "{ckpt}", "--file", "{tmp}/latin1.txt"], "latin1.txt is not UTF-8 text"),
    (["generate", "{ckpt}", "-n", "-5", "--output", "{tmp}/o.jsonl"], "-n must be from 1 to 1,000,000, got -5"),
    (["generate", "{ckpt}", "-n", "0"], "-n must be from 1 to 1,000,000, got 0"),
    (["generate", "{ckpt}", "-n", "1000000000", "--output", "{tmp}/o.jsonl"], "-n must be from 1 to 1,000,000"),
    (["generate", "{ckpt}", "-n", "1", "--num-beams", "100000"], "num_beams must be a whole number from 1 to 32"),
    (["generate", "{ckpt}", "-n", "1", "--guidance", "2"], "this model is unconditional"),
    (["generate", "{ckpt}", "-n", "1", "--output", "{tmp}/o.jsonl", "--batch-size", "100000"],
     "--batch-size must be from 1 to 4096"),
    (["generate", "{ckpt}", "-n", "1", "--source", "a cat"], "this model is unconditional"),
])
def test_strict_arguments_in_the_cli(tiny_checkpoint, tmp_path, capsys, argv, message):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    fill = {"ckpt": str(tiny_checkpoint), "tmp": str(tmp_path)}
    assert main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message.format(**fill) in err and "Traceback" not in err


def test_a_write_the_system_refuses_names_the_file(tiny_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["generate", str(tiny_checkpoint), "-n", "1", "--output", str(blocker / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{blocker / 'o.jsonl'} cannot be created: {blocker} is a file" in err and "Traceback" not in err
