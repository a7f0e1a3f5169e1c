"""Triton kernels for the engine's hot loops (the fused per-step noise update lands here: issue 3)."""
