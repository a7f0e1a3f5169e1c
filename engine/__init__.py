"""ldlm: latent diffusion language models, a reference path and the engine around it.

    import ldlm
    pipe = ldlm.load("runs/e2e")
    pipe.generate(4, sampler="ddim", steps=50, seed=0)

`import ldlm` is cheap: torch and transformers are imported when a model is first loaded (ldlm.load, or any
module that needs them), so `ldlm --help` and programs that only read configs start at once.
"""

__version__ = "0.1.0"

from ldlm.model.config import PRESETS, ModelConfig  # noqa: E402  (no torch)

__all__ = ["AsyncEngine", "ModelConfig", "OnnxOptions", "PRESETS", "Pipeline", "load", "__version__"]


def __getattr__(name: str):
    """ldlm.Pipeline, ldlm.load, ldlm.AsyncEngine and ldlm.OnnxOptions, imported on first use (PEP 562)."""
    if name in ("Pipeline", "load"):
        from ldlm import pipeline

        return getattr(pipeline, name)
    if name == "AsyncEngine":
        from ldlm.serving import AsyncEngine

        return AsyncEngine
    if name == "OnnxOptions":
        from ldlm.runtimes.onnx_session import OnnxOptions

        return OnnxOptions
    raise AttributeError(f"module 'ldlm' has no attribute {name!r}")
