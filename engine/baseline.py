"""The baseline a user would pick instead: a plain GPT-2 language model of the decoder's size, trained on the
same texts with the same time budget, sampled with ordinary settings (nucleus sampling, p = 0.95).

Saved like a checkpoint: `lm.safetensors`, `config.json` (the GPT-2 config and the budget), `tokenizer/`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

from .config import ModelConfig
from .decoder import gpt2_config, load_tokenizer, train_bpe_tokenizer
from .model_files import ModelFileError, check_weight_shapes, folder_files, read_json
from .train import autocast, check_precision, training_device, warmup_cosine


def train_language_model(texts: list[str], out: str | Path, config: ModelConfig, *, time_budget: float | None,
                         max_steps: int | None = None, batch_size: int = 64, lr: float = 5e-4, warmup_steps: int = 100,
                         seed: int = 0, device: str = "cpu", precision: str = "fp32", progress: bool = True) -> dict:
    """Train until `time_budget` seconds or `max_steps` steps, whichever comes first (None: that limit is off).
    A step limit makes a run reproducible whatever else the machine does; the cosine schedule follows whichever
    limit is nearer, as in `ldlm train`, and so do `device` and `precision` ("fp32" or "bf16" autocast)."""
    if not time_budget and not max_steps:
        raise ValueError("give the baseline a time budget or a step limit (time_budget > 0 or max_steps > 0)")
    place, precision = training_device(device), check_precision(precision)
    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = train_bpe_tokenizer(texts, config.vocab_size)
    model = GPT2LMHeadModel(gpt2_config(config, tokenizer)).to(place).train()
    model.loss_type = "ForCausalLM"  # transformers infers it from the class name, which "LMHead" misses, and warns
    eos = tokenizer.eos_token_id
    rows = [[eos] + ids[: config.max_text_tokens] + [eos] for ids in tokenizer(texts)["input_ids"]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    step, elapsed, loss_ema = 0, 0.0, None
    bar = tqdm(total=max_steps, desc="language model", disable=not progress)
    while (not time_budget or elapsed < time_budget) and (not max_steps or step < max_steps):
        start = time.perf_counter()
        batch = [rows[i] for i in torch.randint(0, len(rows), (batch_size,), generator=generator).tolist()]
        width = max(map(len, batch))
        ids = torch.full((batch_size, width), eos)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        ids, mask = ids.to(place), mask.to(place)
        with autocast(place, precision):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        for group in optimizer.param_groups:
            done = max(step / max_steps if max_steps else 0.0, elapsed / time_budget if time_budget else 0.0)
            group["lr"] = lr * warmup_cosine(step, done, warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        elapsed += time.perf_counter() - start
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.4f}")
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "lm.safetensors"))
    tokenizer.save_pretrained(out / "tokenizer")
    summary = {"steps": step, "seconds": elapsed, "train_loss": loss_ema, "time_budget": time_budget,
               "max_steps": max_steps}
    (out / "config.json").write_text(json.dumps({"gpt2": model.config.to_diff_dict(), "training": summary}, indent=2))
    return summary


@torch.no_grad()
def sample_language_model(path: str | Path, n: int, *, seed: int = 0, top_p: float = 0.95, max_new_tokens: int = 64,
                          batch_size: int = 64) -> list[str]:
    """n texts from the language model: nucleus sampling from EOS, one generator seed for the whole call."""
    path = Path(path)
    folder_files(path)  # every file inside the folder
    values = read_json(path / "config.json", "the baseline model").get("gpt2")
    if not isinstance(values, dict) or values.get("model_type", "gpt2") != "gpt2" or "auto_map" in values:
        raise ModelFileError(f"{path / 'config.json'} holds no plain GPT-2 config (\"gpt2\"): pass a folder written "
                             "by `ldlm baseline train`")
    config = GPT2Config.from_dict(values)
    check_weight_shapes(lambda: GPT2LMHeadModel(config), path / "lm.safetensors", {"transformer.h": config.n_layer},
                        str(path / "config.json"))
    model = GPT2LMHeadModel(config)
    load_model(model, str(path / "lm.safetensors"))
    model.eval()
    # rows are one start token each, never padded; transformers drops the all-ones mask before the first
    # forward and would then warn that the pad id (= EOS) might be padding
    model.config.pad_token_id = None
    tokenizer = load_tokenizer(path / "tokenizer")
    eos = tokenizer.eos_token_id
    max_new_tokens = min(max_new_tokens, model.config.n_positions - 1)  # the start token takes one position
    torch.manual_seed(seed)
    texts = []
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        out = model.generate(input_ids=torch.full((size, 1), eos), attention_mask=torch.ones(size, 1, dtype=torch.long),
                             do_sample=True, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, eos_token_id=eos,
                             pad_token_id=eos)
        # whitespace folded as in the training data, so each sample stays on one line
        texts += [" ".join(tokenizer.decode(row[1:], skip_special_tokens=True).split()) for row in out.tolist()]
    return texts
