"""The serving engine past one machine: a Ray Serve deployment whose replicas each load the pipeline and run one
AsyncEngine; Serve routes each request to a replica (power of two choices, by queue length), and each replica
batches what it is given at every iteration.

    from ray import serve
    from ldlm.serving.ray_serve import engine_app
    handle = serve.run(engine_app("runs/e2e", num_replicas=2))
    text = handle.submit.remote("generate_from", {"source": "name : Aromi", "seed": 3}).result()["text"]

Over HTTP (serve.run(..., route_prefix="/ldlm")): POST a JSON object {"task": "generate_from", "source": ...,
"seed": 3, ...}; the answer is {"text": ...}, or {"error": ...} with status 400 (a bad request), 503 (the
replica's queue is full) or 500. Needs `pip install 'ldlm[serve]'`. Each replica's checkpoint path must be
readable on its node, as for batch jobs on Ray (ldlm.jobs.ray_jobs).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import asdict
from pathlib import Path

from ldlm.runtimes.backends import BackendUnavailable
from ldlm.serving.engine import AsyncEngine, EngineOverloaded


class EngineReplica:
    """One replica: a pipeline loaded once and its engine. `submit` is the handle method; `__call__` the HTTP one."""

    def __init__(self, checkpoint: str, load_kwargs: dict, engine_kwargs: dict):
        from ldlm.pipeline import load

        self.engine = AsyncEngine(load(checkpoint, **load_kwargs), **engine_kwargs)
        self.replica = f"{os.uname().nodename}:{os.getpid()}"

    async def submit(self, task: str, settings: dict) -> dict:
        """One request: {"text": ..., "replica": "host:pid"}; raises as AsyncEngine.submit does."""
        text = await asyncio.wrap_future(self.engine.submit(task, **settings))
        return {"text": text, "replica": self.replica}

    def stats(self) -> dict:
        return {"replica": self.replica, **asdict(self.engine.stats())}

    async def __call__(self, request) -> object:
        from starlette.responses import JSONResponse

        try:
            body = await request.json()
            if not isinstance(body, dict) or not isinstance(body.get("task"), str):
                raise ValueError('post a JSON object with "task" (generate, generate_from, vary or reconstruct) '
                                 "and that task's arguments")
            task = body.pop("task")
            return JSONResponse(await self.submit(task, body))
        except EngineOverloaded as e:
            return JSONResponse({"error": str(e)}, status_code=503)
        except (ValueError, TypeError) as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except Exception as e:  # noqa: BLE001 (the request's own failure, e.g. a non-finite latent)
            return JSONResponse({"error": f"{type(e).__name__}: {e}"}, status_code=500)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(cancel=True, timeout=10)


def engine_app(checkpoint: str | Path, *, num_replicas: int = 1, load_kwargs: dict | None = None,
               engine_kwargs: dict | None = None, ray_actor_options: dict | None = None,
               max_ongoing_requests: int | None = None):
    """A Serve application of `num_replicas` EngineReplica replicas of `checkpoint`. load_kwargs: ldlm.load's
    (backend, device, onnx_options, ...); engine_kwargs: AsyncEngine's (max_rows, max_queued).
    max_ongoing_requests: requests Serve hands one replica at once, which its engine batches (Serve's default,
    5, would cap every batch at 5); None: the engine's max_queued plus max_rows."""
    try:
        from ray import serve
    except ImportError as e:
        raise BackendUnavailable("a Ray Serve deployment needs Ray Serve: pip install 'ldlm[serve]'") from e
    engine_kwargs = dict(engine_kwargs or {})
    if max_ongoing_requests is None:
        max_ongoing_requests = engine_kwargs.get("max_queued", 1024) + engine_kwargs.get("max_rows", 64)
    deployment = serve.deployment(EngineReplica, name="ldlm", num_replicas=num_replicas,
                                  max_ongoing_requests=max_ongoing_requests,
                                  ray_actor_options=ray_actor_options or {"num_cpus": 1})
    return deployment.bind(str(checkpoint), dict(load_kwargs or {}), engine_kwargs)
