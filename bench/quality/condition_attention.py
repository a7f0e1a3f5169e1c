"""Cross-attention against joint tokens (issue 18's A/B): the cost of a training step and of a guided sampling
step for each way the reverse transformer reads a text condition, at the same sizes, in one run.

    python bench/quality/condition_attention.py --preset small --latent-tokens 4 --condition-tokens 37

Training: one Adam step of the reverse transformer (forward reading the condition, MSE, backward, update) at
the stage-2 batch (256 latent vectors: 64 texts of K = 4). Sampling: one guided step at --batch items (the
conditional and null rows as one 2B-row forward): the reference model, and for cross-attention the engine's
folded step, which projects the condition's keys and values once per run. --condition-tokens: 37 is the
median MiniLM token count of the E2E held-out MRs. Median of --repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from ldlm.model.config import ModelConfig, size_overrides
from ldlm.fast.folded_reverse import FoldedReverse
from ldlm.model.reverse import Condition, ReverseTransformer


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def condition(model: ReverseTransformer, batch: int, tokens: int) -> Condition:
    states = torch.randn(batch, tokens, model.config.latent_dim)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[::2, tokens * 2 // 3 :] = 0  # every other source a third shorter: padding, as in a real batch
    return model.embed_condition(states, mask)


def training_step(config: ModelConfig, batch: int, tokens: int, repeats: int) -> float:
    torch.manual_seed(0)
    model = ReverseTransformer(config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x_t, z0 = torch.randn(batch, *config.latent_shape), torch.randn(batch, *config.latent_shape)
    t = torch.randint(0, config.num_timesteps, (batch,)).float()
    states = torch.randn(batch, tokens, config.latent_dim)
    mask = torch.ones(batch, tokens, dtype=torch.long)

    def step():
        loss = F.mse_loss(model(x_t, t, condition=model.embed_condition(states, mask)), z0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return median_seconds(step, repeats)


@torch.no_grad()
def sampling_steps(config: ModelConfig, batch: int, tokens: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = ReverseTransformer(config).eval()
    both = Condition.cat([condition(model, batch, tokens), model.null(batch)])  # (2B, L, d)
    x, t = torch.randn(2 * batch, *config.latent_shape), torch.full((2 * batch,), 500.0)
    result = {"reference": median_seconds(lambda: model(x, t, condition=both), repeats)}
    if config.condition_attention == "cross":
        folded = FoldedReverse(model, torch.tensor([500.0]))
        states = folded.condition_states(both)  # once per sampling run, not per step
        step = torch.zeros(1, dtype=torch.long)
        result["engine (folded, keys and values once)"] = median_seconds(lambda: folded(x, step, condition=states),
                                                                         repeats)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--latent-tokens", type=int, default=4)
    parser.add_argument("--condition-tokens", type=int, default=37)
    parser.add_argument("--batch", type=int, default=64, help="items of a guided sampling step (default 64)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    rows = []
    for attention in ("cross", "joint"):
        config = ModelConfig.from_preset(args.preset, condition="text", condition_attention=attention,
                                         **size_overrides(args.preset, None, args.latent_tokens))
        params = sum(p.numel() for p in ReverseTransformer(config).parameters())
        train_batch = max(1, 256 // config.latent_tokens)
        rows.append({"attention": attention, "parameters": params, "what": f"training step ({train_batch} texts)",
                     "seconds": training_step(config, train_batch, args.condition_tokens, args.repeats)})
        for path, seconds in sampling_steps(config, args.batch, args.condition_tokens, args.repeats).items():
            rows.append({"attention": attention, "parameters": params,
                         "what": f"guided sampling step, batch {args.batch}: {path}", "seconds": seconds})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, condition tokens {args.condition_tokens}")
    print("| attention | parameters | step | median |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['attention']} | {r['parameters'] / 1e6:.1f} M | {r['what']} | {1e3 * r['seconds']:.1f} ms |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
