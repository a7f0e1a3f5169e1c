"""Where ldlm keeps what it builds on this machine (the demo's model, native kernels): $LDLM_CACHE, by default
~/.cache/ldlm."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    return Path(os.environ.get("LDLM_CACHE", Path.home() / ".cache" / "ldlm"))
