"""What the runtimes of exported graphs share (ONNX Runtime's and AOTInductor's, ldlm.runtimes.onnx_runtime and
aoti_runtime): the element types a graph's inputs and outputs may have, and the shape checks the loader runs on
any graph against its manifest."""

from __future__ import annotations

from pathlib import Path

import torch

ELEMENT_TYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64"}  # torch -> graph


class GraphShapes:
    """What the loader checks of any exported graph: `path`, and `shapes`, each input's and output's shape as the
    graph itself states it (fixed sizes as ints, dynamic axes as names)."""

    path: Path
    shapes: dict[str, list]

    def expect_shape(self, name: str, shape: list, source: str) -> None:
        """Refuse a manifest whose sizes (`source`) disagree with the graph's own: the loader allocates the
        outputs from the manifest's numbers, so a hostile one could ask for any amount of memory."""
        actual = self.shapes[name]
        if len(actual) != len(shape) or any(isinstance(a, int) and a != e for a, e in zip(actual, shape)):
            raise ValueError(f"{self.path} gives {name} the shape {actual}, but manifest.json's {source} implies "
                             f"{shape}: the manifest does not belong to this graph; re-run `ldlm export`")
