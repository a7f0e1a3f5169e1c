"""What each training example is generated from, for a conditional model's diffusion stage (ldlm.sampling.guidance).

Labels are ids into the model's label set. Source texts are encoded once by the frozen encoder into their token
states: each distinct source once (E2E's 7,600 lines have about 1,000 meaning representations), by the trainer,
which caches them with its other encodings, so a resumed run reads them back.
"""

from __future__ import annotations

import torch

from ldlm.model.encoder import pad_states
from ldlm.model.reverse import Condition, ReverseTransformer


class TrainingConditions:
    """The conditions of the train and validation examples, ready to batch."""

    def __init__(self, config, conditions: dict[str, list[str]], source_states):
        """`source_states(sources)`: the frozen encoder's token states [(L_i, D)] of distinct source texts (the
        trainer's, cached)."""
        self.kind = config.condition
        if self.kind == "label":
            index = {name: i for i, name in enumerate(config.labels)}
            unknown = sorted({c for split in conditions.values() for c in split if c not in index})
            if unknown:
                raise ValueError(f"labels {unknown[:5]} are not in the model's label set {config.labels}")
            self.ids = {split: torch.tensor([index[c] for c in values], dtype=torch.long)
                        for split, values in conditions.items()}
            return
        distinct = sorted({c for values in conditions.values() for c in values})
        position = {source: i for i, source in enumerate(distinct)}
        self.ids = {split: torch.tensor([position[c] for c in values], dtype=torch.long)
                    for split, values in conditions.items()}
        self.states = source_states(distinct)

    def batch(self, model: ReverseTransformer, split: str, idx: torch.Tensor | list[int],
              device: torch.device) -> Condition:
        """The Condition of examples `idx` of `split` ("train" or "val"), embedded by `model` (with grad)."""
        ids = self.ids[split][torch.as_tensor(idx, dtype=torch.long)]
        if self.kind == "label":
            return model.embed_condition(ids.to(device))
        states, mask = pad_states([self.states[i] for i in ids.tolist()])
        return model.embed_condition(states.to(device), mask.to(device))
