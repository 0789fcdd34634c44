"""Long-context measurement (issue 12): does a model use context beyond a sliding window?

One implementation for every caller, so each model is measured the same way: the ``longctx`` suite
of `merge-xlstm eval` (its ``ce_by_position`` measure, `merge_xlstm.eval.measures`), the expert's
validation report (`merge_xlstm.linearize.report`) and ``bench/longctx_ablation.py``.

- Cross-entropy by position on the held-out long documents (`merge_xlstm.eval.longdocs`): the CE of
  the token at position p (p >= 1; nothing predicts position 0) given the p tokens before it, summed
  over documents and averaged per bin [a, b) of positions. Documents are cut to one length and
  batched; each batch runs in chunks of positions that continue the model's own cache, so memory is
  bounded by the chunk and a recurrent student reads every document as one sequence, exactly as a
  single forward pass would (tested). Hybrid students' output gates are recorded on the way.
- Recovery, the issue's figure for a bin: (CE_swa - CE) / (CE_swa - CE_teacher), the share of what
  the teacher gains over the SWA-only student (same window and sinks, no memory) that a model gains.
- Pass-key retrieval run natively (`merge_xlstm.eval.suites.passkey` builds and scores the prompts,
  and its task YAMLs give the generation settings), for callers that hold a model in memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from merge_xlstm.eval.suites import passkey
from merge_xlstm.io import atomic_path
from merge_xlstm.linearize.report import gate_medians, output_gates
from merge_xlstm.model_files import check_model_dir
from merge_xlstm.student.cache import CACHE_FIELD, output_cache


def eval_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are slow there and add rounding), bfloat16 on GPUs: `merge-xlstm eval`'s rule."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def load_model(path: str | Path, device: torch.device) -> nn.Module:
    """A model directory (teacher or student, registered types) in eval mode, checked first: safetensors only."""
    from transformers import AutoModelForCausalLM

    check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=eval_dtype(device), use_safetensors=True, trust_remote_code=False
    )
    return model.to(device).eval()


# ------------------------------------------------------------------------------ CE by position
@dataclass(frozen=True)
class PositionLosses:
    """Summed CE and token count per position over documents, and per-layer output-gate medians."""

    sums: np.ndarray
    counts: np.ndarray
    gates: list[float] | None  # None for models without output gates

    def mean(self, start: int, end: int) -> float:
        """Mean CE of the tokens at positions start..end-1 (position 0 has none)."""
        tokens = self.counts[start:end].sum()
        return float(self.sums[start:end].sum() / tokens) if tokens else math.nan

    def bins(self, edges: Sequence[int]) -> list[dict[str, Any]]:
        """Mean CE per bin [a, b); the last edge is cut to the documents' length, later bins dropped."""
        length = len(self.counts)
        out = []
        for start, end in zip(edges, edges[1:]):
            if start >= length:
                break
            end = min(end, length)
            out.append({"start": start, "end": end, "ce": self.mean(start, end),
                        "tokens": int(self.counts[start:end].sum())})  # fmt: skip
        return out


@torch.no_grad()
def position_losses(
    model: nn.Module,
    documents: Sequence[Sequence[int]],
    *,
    chunk_tokens: int,
    batch_size: int,
    device: torch.device,
    desc: str = "CE by position",
) -> PositionLosses:
    """Per-position CE of `model` on token `documents`; see the module docstring for the method."""
    length = max(len(doc) for doc in documents)
    sums, counts = np.zeros(length), np.zeros(length)
    by_length: dict[int, list[Sequence[int]]] = {}
    for doc in documents:  # equal lengths batch without padding
        by_length.setdefault(len(doc), []).append(doc)
    batches = [docs[i : i + batch_size] for docs in by_length.values() for i in range(0, len(docs), batch_size)]
    with output_gates(model) as gates, tqdm(total=sum(map(len, documents)), desc=desc, unit="tok",
                                            unit_scale=True, leave=False) as bar:  # fmt: skip
        for batch in batches:
            ids = torch.tensor(batch, dtype=torch.long, device=device)
            cache = None
            for start in range(0, ids.shape[1], chunk_tokens):
                stop = min(start + chunk_tokens, ids.shape[1])
                more = {CACHE_FIELD: cache} if cache is not None else {}
                out = model(input_ids=ids[:, start:stop], use_cache=True, **more)
                cache = output_cache(out)
                targets = ids[:, start + 1 : stop + 1]  # logits at t predict the token at t + 1
                losses = F.cross_entropy(out.logits[:, : targets.shape[1]].float().transpose(1, 2), targets,
                                         reduction="none")  # fmt: skip
                sums[start + 1 : start + 1 + targets.shape[1]] += losses.sum(0).double().cpu().numpy()
                counts[start + 1 : start + 1 + targets.shape[1]] += len(batch)
                bar.update(ids.shape[0] * (stop - start))
    return PositionLosses(sums, counts, None if gates is None else gate_medians(gates))


def recovery(
    model: list[dict[str, Any]], teacher: list[dict[str, Any]], swa: list[dict[str, Any]], *, start: int
) -> list[dict[str, Any]]:
    """Per bin from `start`: the share of the teacher's gain over the SWA-only student that `model` gains.

    None where the teacher gains nothing (the ratio means nothing there).
    """
    out = []
    for mine, best, base in zip(model, teacher, swa, strict=True):
        if mine["start"] < start:
            continue
        gain = base["ce"] - best["ce"]
        value = (base["ce"] - mine["ce"]) / gain if gain > 0 else None
        out.append({"start": mine["start"], "end": mine["end"], "recovery": value})
    return out


def bin_label(entry: dict[str, Any]) -> str:
    """'1K–2K' style label of a bin."""

    def short(n: int) -> str:
        return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)

    return f"{short(entry['start'])}–{short(entry['end'])}"


def plot_ce_curves(curves: dict[str, list[dict[str, Any]]], png: Path, *, title: str) -> None:
    """Mean CE per position bin, one line per model (x: the bins' centres, log scale), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, bins in curves.items():
        ax.plot([max(1.0, (b["start"] + b["end"]) / 2) for b in bins], [b["ce"] for b in bins], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("position in document (bin centre)")
    ax.set_ylabel("mean cross-entropy (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------------- pass-key
@torch.no_grad()
def passkey_accuracy(
    model: nn.Module,
    tokenizer: Any,
    lengths: Sequence[int],
    trials: int,
    *,
    device: torch.device,
    batch_size: int,
    desc: str = "pass-key",
) -> list[dict[str, Any]]:
    """Pass-key accuracy per length, with the longctx suite's prompts, generation budget and scorer.

    Greedy, left-padded batches with an attention mask (prompts of one length rarely differ).
    """
    from transformers import GenerationConfig

    settings = passkey.task_settings()
    answer_tokens = settings["answer_tokens"]
    context = passkey.context_length(model.config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=answer_tokens, do_sample=False, pad_token_id=pad,
                              eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    plans = {length: [passkey.build_doc(tokenizer, length, i, max_depth=settings["max_depth"],
                                        size=passkey.prompt_size(length, context, answer_tokens))
                      for i in range(trials)] for length in lengths}  # fmt: skip
    results = []
    with tqdm(total=sum(d["tokens"] for docs in plans.values() for d in docs), desc=desc, unit="tok",
              unit_scale=True, leave=False) as bar:  # fmt: skip
        for length, docs in plans.items():
            answers = []
            for i in range(0, len(docs), batch_size):
                prompts = [tokenizer(d["prompt"])["input_ids"] for d in docs[i : i + batch_size]]
                width = max(map(len, prompts))
                ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
                for text in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True):
                    for stop in settings["until"]:  # as lm-eval cuts a generation at its stop strings
                        text = text.split(stop, 1)[0]
                    answers.append(text)
                bar.update(sum(map(len, prompts)))
            scores = [passkey.score(doc, [text])["exact_match"] for doc, text in zip(docs, answers)]
            results.append({
                "length": length, "tokens": max(d["tokens"] for d in docs), "trials": trials,
                "correct": int(sum(scores)), "accuracy": sum(scores) / trials,
                "answers": [{"key": d["passkey"], "depth": d["depth"], "response": text,
                             "answer": passkey.answer(text)} for d, text in zip(docs, answers)],
            })  # fmt: skip
    return results
