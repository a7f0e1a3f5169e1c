"""A batch job's output file: locked, checked, appended batch by batch with fsync, and read back to resume."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ldlm.jobs.items import Item
from ldlm.jobs.settings import JobOutputError, JobSettings

log = logging.getLogger("ldlm.jobs")


def output_record(item: Item, text: str | None, settings: JobSettings) -> dict:
    record = {"id": item.id} if item.id is not None else {"line": item.line}
    if item.error is not None:
        return {**record, "error": item.error, "settings_hash": settings.hash(), "key": item.key}
    record.update({"text": text, "mode": item.mode, "seed": item.seed})
    if item.text is not None:
        record["input"] = item.text
    for key in ("source", "label", "guidance"):
        if getattr(item, key) is not None:
            record[key] = getattr(item, key)
    if item.strength is not None:
        record["strength"] = item.strength
    record.update(item.extra)
    return {**record, "settings": settings.public(), "settings_hash": settings.hash(), "key": item.key}


def _job_record(raw: bytes) -> dict | None:
    """A line of a job's output as its record, or None if ldlm did not write it."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or not ("id" in record or "line" in record):
        return None
    if not isinstance(record.get("settings_hash"), str) or not isinstance(record.get("key"), str):
        return None
    return record


def _json_line(record: dict) -> bytes:
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # text that UTF-8 cannot hold: escaped, still valid JSON
        return (json.dumps(record) + "\n").encode("ascii")


class JobOutput:
    """A job's output file, held for the whole job: locked against other jobs, checked (and, after a crash, its
    torn last record cut) before anything is written, then appended to batch by batch, each batch flushed and
    fsync'ed before `write` returns. `done` holds the keys already written, `done_idents` their identities."""

    def __init__(self, path: str | Path, settings: JobSettings, resume: bool):
        self.path, self.settings, self.written = Path(path), settings, 0
        if self.path.is_dir():
            raise JobOutputError(f"--output {self.path} is a directory: pass a file")
        if self.path.exists() and not self.path.is_file():  # a device or pipe: nothing a job can resume or own
            raise JobOutputError(f"--output {self.path} is not a regular file: pass a file")
        blocking = next((p for p in self.path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise JobOutputError(f"--output {self.path} cannot be created: {blocking} is a file, not a folder")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a+b")
        except OSError as e:
            raise JobOutputError(f"--output {self.path} cannot be opened for writing ({e.strerror})") from None
        try:
            self._lock()
            self.done, self.done_idents = self._read(resume)
        except BaseException:
            self.file.close()
            raise

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobOutputError(f"{self.path} is being written by another job (it holds the file's lock): wait for "
                                 "that job to end, or pass another --output") from None

    def _read(self, resume: bool) -> tuple[set[str], set[str]]:
        self.file.seek(0)
        data = self.file.read()
        if not data:
            return set(), set()
        if not resume:
            raise FileExistsError(f"{self.path} already exists: pass --resume to continue it, or choose a new --output")
        complete, _, tail = data.rpartition(b"\n")
        records = []
        for number, raw in enumerate(complete.split(b"\n") if complete or data.startswith(b"\n") else [], 1):
            records.append(self._record(raw, number))
        if tail:
            record = _job_record(tail)
            if record is not None:  # whole, cut just before its newline
                records.append(self._record(tail, len(records) + 1))
                self._append(b"\n")
            elif tail.startswith((b'{"id": ', b'{"line": ')):  # a record torn by a crash mid-write
                self.file.truncate(len(data) - len(tail))
                log.warning("%s ended in a partial record (an interrupted write): removed it; that item runs again",
                            self.path)
            else:
                raise JobOutputError(f"{self.path} ends in a line ldlm did not write ({tail[:60]!r}): --resume "
                                     "continues only a job's own output, and the file was left as it is; pass "
                                     "another --output")
        return {r["key"] for r in records}, {r["key"].split("#")[0] for r in records}

    def _record(self, raw: bytes, number: int) -> dict:
        record = _job_record(raw)
        if record is None:
            raise JobOutputError(f"{self.path} line {number} is not a record of an ldlm job ({raw[:60]!r}): --resume "
                                 "continues only a job's own output, and the file was left as it is; pass another "
                                 "--output")
        if record["settings_hash"] != self.settings.hash() and record.get("settings") == self.settings.public():
            raise ValueError(f"{self.path} line {number} was written by another model (its fingerprint differs from "
                             f"{self.settings.model}: other weights or files): resume with the model that wrote it, "
                             "or write to a new --output")
        if record["settings_hash"] != self.settings.hash():
            raise ValueError(f"{self.path} line {number} was written with other settings ({record.get('settings')}); "
                             f"this run has {self.settings.public()} on model {self.settings.model}: resume with the "
                             "same settings and model, or write to a new --output")
        if "#" not in record["key"]:
            raise JobOutputError(f"{self.path} was written by an earlier ldlm, whose records do not say what each "
                                 "line asked for: resume it with that version, or pass a new --output")
        return record

    def _append(self, data: bytes) -> None:
        try:
            self.file.write(data)
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as e:
            raise JobOutputError(f"writing {self.path} failed ({e.strerror}): the {self.written} records written "
                                 "before are kept; make room or fix the permissions, then run again with "
                                 "--resume") from e

    def write(self, records: list[dict]) -> None:
        if records:
            self._append(b"".join(_json_line(r) for r in records))
            self.written += len(records)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> JobOutput:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def pending(self, items: list[Item]) -> list[Item]:
        """The items not yet written, all at once (the Ray driver plans its dataset up front)."""
        return [item for batch in self.pending_batches(items, max(1, len(items)), lambda _: None) for item in batch]

    def pending_batches(self, items: Iterable[Item], size: int, skipped: Callable[[int], None]
                        ) -> Iterator[list[Item]]:
        """The items not yet written, `size` at a time, read from `items` as they are needed (a job of any length
        holds one batch); skipped(k) hears of each run of items already written. Says at the end how many were
        edited since they were written."""
        batch, edited, first = [], 0, None
        for item in items:
            if item.key in self.done:
                skipped(1)
                continue
            if item.ident in self.done_idents:
                edited, first = edited + 1, first or item.ident
            batch.append(item)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch
        if edited:
            log.warning("%d lines of the input changed since %s was written (first: %s): they ran again, and their "
                        "new records follow the old ones (an id's last record is its current one)", edited,
                        self.path, first)
