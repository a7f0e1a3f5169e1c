"""Batch jobs on Ray: the same input, output format and order as ldlm.jobs.batch, with one pipeline actor per GPU
(or per CPU worker) running `map_batches` over a Ray Dataset.

The driver parses the input (duplicate ids and `--resume` need the whole file), writes bad lines itself, and
hands the valid items to Ray as a Dataset; results come back in input order (`preserve_order`) and are
appended batch by batch as they arrive, so a crash of the driver loses at most what was in flight. Each item
draws its noise from its own seed, so the texts equal a local run's whatever worker ran them.

Pointing it at a cluster: start Ray on the machines (`ray start --head` on one, `ray start --address HEAD:6379`
on the others), install ldlm there, make the checkpoint readable at the same path on every node (a shared
filesystem), then run `ldlm generate CKPT --input in.jsonl --output out.jsonl --ray --ray-address auto` on the
head node (or set RAY_ADDRESS). Without an address, a local Ray instance is started.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from ldlm.jobs.batch import mark_bad_conditions, mark_truncated, run_isolating_failures
from ldlm.jobs.items import Item
from ldlm.jobs.output import JobOutput, output_record
from ldlm.jobs.settings import JobSettings, resolved_settings
from ldlm.pipeline import read_model_config
from ldlm.runtimes.backends import BackendUnavailable


class PipelineActor:
    """Holds one loaded pipeline; turns a batch of serialized items into their texts (halving on OOM), or the
    errors of the items that failed on their own."""

    def __init__(self, checkpoint: str, load_kwargs: dict, settings: dict):
        from ldlm.pipeline import load

        self.pipe = load(checkpoint, **load_kwargs)
        self.settings = JobSettings(**settings)

    def __call__(self, batch: dict) -> dict:
        items = [Item(**json.loads(s)) for s in batch["item"]]
        mark_truncated(self.pipe, items)
        texts, _ = run_isolating_failures(self.pipe, items, self.settings, len(items))
        return {"order": batch["order"], "text": [text or "" for text in texts],
                "extra": [json.dumps({"extra": item.extra, "error": item.error}) for item in items]}


def run_job_on_ray(checkpoint: str, items: list[Item], output: str | Path, settings: JobSettings, *,
                   load_kwargs: dict | None = None, batch_size: int = 64, resume: bool = False,
                   workers: int | None = None, address: str | None = None, progress: bool = True) -> dict:
    try:
        import ray
    except ImportError as e:
        raise BackendUnavailable("--ray needs Ray: pip install 'ldlm[ray]'") from e
    # settings that cannot run fail here, before Ray starts (as run_job fails before any work)
    config = read_model_config(checkpoint)
    settings = resolved_settings(settings, config)
    with JobOutput(output, settings, resume) as out:
        todo = out.pending(items)
        mark_bad_conditions(config, todo, settings)
        return _run_on_ray(ray, checkpoint, items, todo, out, settings, load_kwargs=load_kwargs,
                           batch_size=batch_size, workers=workers, address=address, progress=progress)


def _run_on_ray(ray, checkpoint: str, items: list[Item], todo: list[Item], out: JobOutput, settings: JobSettings, *,
                load_kwargs, batch_size: int, workers: int | None, address: str | None, progress: bool) -> dict:
    counts = {"written": 0, "errors": 0, "skipped": len(items) - len(todo)}
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if workers is None:
        workers = gpus or max(1, int(ray.cluster_resources().get("CPU", 1)) // 2)
    load_kwargs = {**(load_kwargs or {}), "device": "cuda" if gpus else "cpu"}
    valid = [(order, item) for order, item in enumerate(todo) if item.error is None]
    bar = tqdm(total=len(todo), desc="generate (ray)", unit="item", disable=not progress, dynamic_ncols=True)
    next_position = 0  # index into todo of the next record to write
    arrived: dict[int, tuple[str | None, dict, str | None]] = {}  # todo index -> (text, extra, error), unwritten

    def position_ready(position: int) -> bool:
        return position < len(todo) and (todo[position].error is not None or position in arrived)

    def write_through(position: int, texts: dict[int, tuple[str | None, dict, str | None]]) -> int:
        """Write the todo items from `position` on while they are ready (bad lines, and valid ones whose text
        has arrived): the file stays in input order."""
        records = []
        while position_ready(position):
            item = todo[position]
            text, extra, error = texts.pop(position, (None, {}, None))
            item.extra.update(extra)
            item.error = item.error or error
            records.append(output_record(item, text, settings))
            position += 1
        out.write(records)
        counts["written"] += sum(1 for r in records if "error" not in r)
        counts["errors"] += sum(1 for r in records if "error" in r)
        bar.update(len(records))
        return position

    try:
        if valid:
            context = ray.data.DataContext.get_current()
            context.execution_options.preserve_order = True
            context.enable_progress_bars = progress
            dataset = ray.data.from_items([{"order": order, "item": json.dumps(asdict(item))} for order, item in valid])
            results = dataset.map_batches(
                PipelineActor, fn_constructor_args=(str(checkpoint), load_kwargs, asdict(settings)),
                batch_size=batch_size, concurrency=workers, num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
                batch_format="numpy")
            for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
                for order, text, extra in zip(batch["order"], batch["text"], batch["extra"]):
                    result = json.loads(extra)
                    arrived[int(order)] = (str(text), result["extra"], result["error"])
                next_position = write_through(next_position, arrived)
        next_position = write_through(next_position, arrived)  # trailing bad lines
    finally:
        bar.close()
    return counts
