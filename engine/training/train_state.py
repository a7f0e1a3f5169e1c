"""Optimizer and RNG state as safetensors plus JSON, so `--resume` never unpickles anything."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Tensors of optimizer.state_dict() to `path` (safetensors), everything else to `path`.json."""
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for param_id, entries in state["state"].items():
        plain[str(param_id)] = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{name}"] = value.detach().contiguous().cpu()
            else:
                plain[str(param_id)][name] = value
    save_file(tensors, str(path))
    path.with_suffix(".json").write_text(json.dumps({"param_groups": state["param_groups"], "state": plain}))


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    tensors = load_file(str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    state = {int(pid): dict(entries) for pid, entries in meta["state"].items()}
    for key, value in tensors.items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
