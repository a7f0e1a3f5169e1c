"""Serving: one loaded pipeline, many callers, batched at every iteration of the sampling loop (AsyncEngine)."""

from ldlm.serving.engine import AsyncEngine, EngineClosed, EngineOverloaded, EngineStats

__all__ = ["AsyncEngine", "EngineClosed", "EngineOverloaded", "EngineStats"]
