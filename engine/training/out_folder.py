"""A training run's output folder: never an export or a folder inside a model, and held by one run at a time."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

from ldlm.model.checkpoint import FORMAT as CHECKPOINT_FORMAT


def _model_folder_kind(folder: Path) -> str | None:
    """"an export" or "a checkpoint" when `folder` is one (by its manifest or config.json's format), else None."""
    from ldlm.export.manifest import is_export

    if is_export(folder):
        return "an export"
    try:
        meta = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return "a checkpoint" if isinstance(meta, dict) and meta.get("format") == CHECKPOINT_FORMAT else None


def check_training_out(out: Path) -> None:
    """Refuse an output folder that is an export, or lies inside a checkpoint or an export (its tokenizer/ or
    training/ folder, say): training writes a whole checkpoint there, leaving that model unloadable."""
    kind = _model_folder_kind(out)
    if kind == "an export":
        raise ValueError(f"--out {out} is an export (it holds manifest.json): training writes a checkpoint, which "
                         "would leave the export unloadable; pass a new folder")
    for parent in Path(out).resolve().parents:
        kind = _model_folder_kind(parent)
        if kind is not None:
            raise ValueError(f"--out {out} lies inside {kind}, {parent}: training would write a checkpoint among "
                             "its files; pass a folder outside it")


@contextlib.contextmanager
def training_lock(out: Path):
    """Hold `out` for the whole run (an exclusive lock on out/training/lock, which names the holder), as a batch
    job holds its output: a second run on the same folder, fresh or resumed, is refused instead of mixing its
    saves and log with this one's."""
    state_dir, created = out / "training", not out.exists()
    state_dir.mkdir(parents=True, exist_ok=True)
    file = (state_dir / "lock").open("a+")
    finished = False
    try:
        try:
            import fcntl

            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            raise FileExistsError(f"{out} is being trained by another run ({holder}, which holds "
                                  f"{state_dir / 'lock'}): wait for it to end, or pass another --out") from None
        file.seek(0)
        file.truncate()
        file.write(f"ldlm train, process {os.getpid()} on {socket.gethostname()}, since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        file.flush()
        yield
        finished = True
    finally:
        file.close()
        if created and not finished and [p.name for p in out.rglob("*")] == ["training", "lock"]:
            shutil.rmtree(out)  # a run refused before any work leaves no folder behind
