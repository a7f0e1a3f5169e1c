"""ldlm: latent diffusion language models, a reference path and the engine around it.

    import ldlm
    pipe = ldlm.load("runs/e2e")
    pipe.generate(4, sampler="ddim", steps=50, seed=0)
"""

__version__ = "0.1.0"

from .config import PRESETS, ModelConfig  # noqa: E402
from .pipeline import Pipeline, load  # noqa: E402

__all__ = ["ModelConfig", "PRESETS", "Pipeline", "load", "__version__"]
