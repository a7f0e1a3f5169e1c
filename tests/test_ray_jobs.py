"""Batch jobs on a local Ray cluster of two CPU workers: the same records, in the same order, as a local run."""

from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is part of the test extra")  # installed by .ci/run

from ldlm.jobs.batch import run_job  # noqa: E402
from ldlm.jobs.items import read_items  # noqa: E402
from ldlm.jobs.ray_jobs import run_job_on_ray  # noqa: E402

from .test_jobs import BAD, GOOD, read_jsonl, settings_for, write_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def test_ray_job_matches_a_local_run_and_resumes(local_cluster, tiny_checkpoint, tiny_pipeline, tmp_path):
    source = tmp_path / "in.jsonl"
    rows = [*GOOD, BAD[0], *({"id": f"s{i}"} for i in range(6)), {"id": "long", "text": "a b c d " * 50}, BAD[2]]
    write_jsonl(source, rows)
    settings = settings_for(tiny_checkpoint)
    local = tmp_path / "local.jsonl"
    run_job(tiny_pipeline, read_items(source.open("rb"), 0), local, settings, batch_size=3, progress=False)

    on_ray = tmp_path / "ray.jsonl"  # a job that stopped after 5 items (written locally), resumed on Ray
    run_job(tiny_pipeline, read_items(source.open("rb"), 0)[:5], on_ray, settings, progress=False)
    counts = run_job_on_ray(str(tiny_checkpoint), read_items(source.open("rb"), 0), on_ray, settings, workers=2,
                            batch_size=2, resume=True, load_kwargs={"backend": "reference"}, progress=False)
    assert counts == {"written": 7, "errors": 2, "skipped": 5}
    assert read_jsonl(on_ray) == read_jsonl(local)
    assert json.loads(on_ray.read_text().splitlines()[-2])["truncated"] is True


def test_settings_that_cannot_run_fail_before_ray_starts(tiny_checkpoint, tmp_path, monkeypatch):
    """The checkpoint's default sampler (tiny: DDPM) read from its config alone: eta has no meaning there."""
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, GOOD)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started for a job that cannot run"))
    with pytest.raises(ValueError, match="applies to sampler 'ddim' only, got eta=0.5 with 'ddpm'"):
        run_job_on_ray(str(tiny_checkpoint), read_items(source.open("rb"), 0), out,
                       settings_for(tiny_checkpoint, sampler=None, steps=None, eta=0.5), progress=False)
    assert not out.exists()


def test_generate_with_ray_and_no_output_runs_the_job_on_ray(local_cluster, tiny_checkpoint, tmp_path, capsys,
                                                             monkeypatch):
    from ldlm.cli import main
    from ldlm.jobs import ray_jobs

    flags = ["--sampler", "ddim", "--steps", "3", "--no-progress"]
    assert main(["generate", str(tiny_checkpoint), "-n", "3", "--output", str(tmp_path / "local.jsonl"), *flags]) == 0
    local = [r["text"] for r in read_jsonl(tmp_path / "local.jsonl")]
    capsys.readouterr()
    used = []
    real = ray_jobs._run_on_ray
    monkeypatch.setattr(ray_jobs, "_run_on_ray", lambda *a, **k: used.append(1) or real(*a, **k))
    assert main(["generate", str(tiny_checkpoint), "-n", "3", "--ray", "--ray-workers", "1", *flags]) == 0
    assert used and capsys.readouterr().out.splitlines() == local  # on Ray, the records of the same job, in order


def test_ray_missing_is_a_one_line_error(tiny_checkpoint, capsys, monkeypatch):
    import sys

    from ldlm.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["generate", str(tiny_checkpoint), "-n", "2", "--ray", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'ldlm[ray]'" in err and "Traceback" not in err
