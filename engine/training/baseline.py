"""The baseline a user would pick instead: a plain GPT-2 language model of the decoder's size, trained on the
same texts with the same time budget, sampled with ordinary settings (nucleus sampling, p = 0.95).

Conditional (`sources`): the same GPT-2 trained as a conditional language model on `source <|sep|> text`,
its loss on the text alone, and decoded from `source <|sep|>` by beam search (or nucleus sampling): what a
user would train for data-to-text instead of a latent diffusion model.

Saved like a checkpoint: `lm.safetensors`, `config.json` (the GPT-2 config, the budget, and for a conditional
model its separator and source length), `tokenizer/`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

from ldlm.evaluation.rerank import check_reranking, choose
from ldlm.model.config import ModelConfig
from ldlm.model.decoder import gpt2_config, load_tokenizer, train_bpe_tokenizer
from ldlm.model.model_files import ModelFileError, check_weight_shapes, folder_files, read_json
from ldlm.training.train import autocast, check_precision, training_device, warmup_cosine

SEP = "<|sep|>"  # between the source and the text of a conditional baseline
MAX_SOURCE_TOKENS = 64  # a conditional baseline's source is cut to this many tokens (E2E MRs take about 40)


def train_language_model(texts: list[str], out: str | Path, config: ModelConfig, *, time_budget: float | None,
                         max_steps: int | None = None, batch_size: int = 64, lr: float = 5e-4, warmup_steps: int = 100,
                         seed: int = 0, device: str = "cpu", precision: str = "fp32", progress: bool = True,
                         sources: list[str] | None = None) -> dict:
    """Train until `time_budget` seconds or `max_steps` steps, whichever comes first (None: that limit is off).
    A step limit makes a run reproducible whatever else the machine does; the cosine schedule follows whichever
    limit is nearer, as in `ldlm train`, and so do `device` and `precision` ("fp32" or "bf16" autocast).
    With `sources` (one per text), a conditional language model of p(text | source)."""
    if not time_budget and not max_steps:
        raise ValueError("give the baseline a time budget or a step limit (time_budget > 0 or max_steps > 0)")
    if sources is not None and len(sources) != len(texts):
        raise ValueError(f"{len(sources)} sources for {len(texts)} texts: give one source per text")
    place, precision = training_device(device), check_precision(precision)
    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = train_bpe_tokenizer(texts + (sources or []), config.vocab_size, extra_special=[SEP] if sources else [])
    if sources is not None:  # the source, the separator and the text share the context
        config = dataclasses.replace(config, n_positions=max(config.n_positions,
                                                             MAX_SOURCE_TOKENS + config.max_text_tokens + 3))
    model = GPT2LMHeadModel(gpt2_config(config, tokenizer)).to(place).train()
    model.loss_type = "ForCausalLM"  # transformers infers it from the class name, which "LMHead" misses, and warns
    eos = tokenizer.eos_token_id
    text_ids = [ids[: config.max_text_tokens] + [eos] for ids in tokenizer(texts)["input_ids"]]
    if sources is None:
        rows, prompt_lengths = [[eos] + ids for ids in text_ids], [1] * len(texts)
    else:
        prompts = _prompts(tokenizer, sources)
        rows, prompt_lengths = [p + ids for p, ids in zip(prompts, text_ids)], [len(p) for p in prompts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    step, elapsed, loss_ema = 0, 0.0, None
    bar = tqdm(total=max_steps, desc="language model", disable=not progress)
    while (not time_budget or elapsed < time_budget) and (not max_steps or step < max_steps):
        start = time.perf_counter()
        picked = torch.randint(0, len(rows), (batch_size,), generator=generator).tolist()
        batch, picked_prompts = [rows[i] for i in picked], [prompt_lengths[i] for i in picked]
        width = max(map(len, batch))
        ids = torch.full((batch_size, width), eos)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        labels = torch.full((batch_size, width), -100)
        for i, row in enumerate(batch):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
            labels[i, picked_prompts[i] : len(row)] = torch.tensor(row[picked_prompts[i] :])  # the text's tokens
        ids, mask, labels = ids.to(place), mask.to(place), labels.to(place)
        with autocast(place, precision):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
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
    meta = {"gpt2": model.config.to_diff_dict(), "training": summary}
    if sources is not None:
        meta["conditional"] = {"separator": SEP, "max_source_tokens": MAX_SOURCE_TOKENS}
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    return summary


def _prompts(tokenizer, sources: list[str]) -> list[list[int]]:
    """EOS, the source's tokens (cut to MAX_SOURCE_TOKENS), the separator: what a conditional baseline reads."""
    eos, sep = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(SEP)
    return [[eos] + ids[:MAX_SOURCE_TOKENS] + [sep] for ids in tokenizer(sources)["input_ids"]]


def _load_language_model(path: Path):
    """(model, tokenizer, meta) of a folder written by train_language_model, checked as checkpoints are."""
    folder_files(path)  # every file inside the folder
    meta = read_json(path / "config.json", "the baseline model")
    values = meta.get("gpt2")
    if not isinstance(values, dict) or values.get("model_type", "gpt2") != "gpt2" or "auto_map" in values:
        raise ModelFileError(f"{path / 'config.json'} holds no plain GPT-2 config (\"gpt2\"): pass a folder written "
                             "by `ldlm baseline train`")
    config = GPT2Config.from_dict(values)
    check_weight_shapes(lambda: GPT2LMHeadModel(config), path / "lm.safetensors", {"transformer.h": config.n_layer},
                        str(path / "config.json"))
    model = GPT2LMHeadModel(config)
    load_model(model, str(path / "lm.safetensors"))
    # rows are never padded on the right of the prompt here; transformers would warn that the pad id (= EOS)
    # might be padding
    model.config.pad_token_id = None
    return model.eval(), load_tokenizer(path / "tokenizer"), meta


@torch.no_grad()
def generate_from_language_model(path: str | Path, sources: list[str], *, num_beams: int = 4,
                                 top_p: float | None = None, seed: int = 0, max_new_tokens: int = 64,
                                 no_repeat_ngram_size: int = 3, candidates: int = 1, rerank: str = "mbr") -> list[str]:
    """One text per source from a conditional baseline, in input order: beam search (as ldlm decodes), or with
    top_p nucleus sampling seeded by `seed`. Each source runs alone, so no padding enters the prompt.
    candidates: keep one of k texts per source, chosen as Pipeline.generate_from chooses (ldlm.evaluation.rerank):
    k nucleus samples, or the k best hypotheses of a beam search of max(num_beams, k) beams."""
    check_reranking(candidates, rerank, sources)
    model, tokenizer, meta = _load_language_model(Path(path))
    if "conditional" not in meta:
        raise ValueError(f"{path} is an unconditional language model: sample it with `ldlm baseline sample`")
    eos = tokenizer.eos_token_id
    torch.manual_seed(seed)
    texts = []
    for source, prompt in zip(sources, _prompts(tokenizer, sources)):
        room = min(max_new_tokens, model.config.n_positions - len(prompt))
        decoding = {"do_sample": True, "top_p": top_p, "top_k": 0} if top_p is not None else \
            {"num_beams": max(num_beams, candidates), "no_repeat_ngram_size": no_repeat_ngram_size,
             "early_stopping": True}
        out = model.generate(input_ids=torch.tensor([prompt]),
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=room,
                             eos_token_id=eos, pad_token_id=eos, num_return_sequences=candidates, **decoding)
        drawn = [" ".join(tokenizer.decode(row[len(prompt):], skip_special_tokens=True).split()) for row in out]
        texts.append(drawn[0] if candidates == 1 else drawn[choose(drawn, rerank, source)])
    return texts


@torch.no_grad()
def sample_language_model(path: str | Path, n: int, *, seed: int = 0, top_p: float = 0.95, max_new_tokens: int = 64,
                          batch_size: int = 64) -> list[str]:
    """n texts from the language model: nucleus sampling from EOS, one generator seed for the whole call."""
    model, tokenizer, meta = _load_language_model(Path(path))
    if "conditional" in meta:
        raise ValueError(f"{path} is a conditional language model: generate from sources with "
                         "`ldlm baseline sample --source-file`")
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
