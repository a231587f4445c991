"""Passkey retrieval: can the model find a number hidden deep in filler text?

The classic long-context probe (Mohtashami & Jaggi, 2023): a 5-digit key is hidden at a chosen
depth (0 = start, 1 = end) inside repetitive filler, and the prompt ends by asking for it. The
answer is read by greedy decoding a few tokens; a trial counts when the key's digits appear.
A sparse model that drops old keys fails at depths far from the end, which is exactly what this
grid (length x depth) shows.

Prompts are built in token space so each one has the requested length (within one filler
sentence) for any tokenizer.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .dense_switch import dense_attention

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    input_ids: torch.Tensor  # [1, L]
    key: str
    depth: float


def build_prompt(tokenizer, length: int, depth: float, key: str) -> PasskeyPrompt:
    """A prompt of about ``length`` tokens with ``key`` at relative ``depth`` of the filler."""
    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    intro, needle, question = enc(INTRO), enc(NEEDLE.format(key=key)), enc(QUESTION)
    filler = enc(FILLER)
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    budget = length - len(bos) - len(intro) - len(needle) - len(question)
    if budget < len(filler):
        raise ValueError(f"passkey length {length} is too short for the prompt (needs > {length - budget + len(filler)})")
    repeats = budget // len(filler)
    before = round(repeats * min(max(depth, 0.0), 1.0))
    ids = bos + intro + filler * before + needle + filler * (repeats - before) + question
    return PasskeyPrompt(torch.tensor([ids], dtype=torch.long), key, depth)


@torch.no_grad()
def greedy_answer(model, input_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Greedy decode through the same decode cache as the consistency check."""
    from .evaluation import _forward_step, new_decode_cache

    device = next(model.parameters()).device
    ids = input_ids.to(device)
    cache = new_decode_cache(model)
    logits = _forward_step(model, ids, cache, 0)
    out: list[int] = []
    pos = ids.shape[1]
    for _ in range(max_new_tokens):
        token = logits[:, -1:].argmax(-1)
        out.append(int(token))
        logits = _forward_step(model, token, cache, pos)
        pos += 1
    return out


@dataclass
class PasskeyResult:
    lengths: list[int]
    depths: list[float]
    trials: int
    correct: list[list[int]]  # [length][depth] number of correct trials

    def accuracy_grid(self) -> list[list[float]]:
        return [[c / self.trials for c in row] for row in self.correct]

    @property
    def accuracy(self) -> float:
        total = len(self.lengths) * len(self.depths) * self.trials
        return sum(map(sum, self.correct)) / max(1, total)

    def accuracy_by_length(self) -> dict[int, float]:
        return {n: sum(row) / (len(self.depths) * self.trials) for n, row in zip(self.lengths, self.correct, strict=True)}

    def as_dict(self) -> dict:
        return {
            "lengths": self.lengths,
            "depths": self.depths,
            "trials": self.trials,
            "accuracy": self.accuracy,
            "accuracy_by_length": {str(k): v for k, v in self.accuracy_by_length().items()},
            "grid": self.accuracy_grid(),
        }


def passkey_retrieval(
    model,
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int = 1,
    seed: int = 0,
    dense: bool = False,
    progress: Callable[[int], None] | None = None,
) -> PasskeyResult:
    """Accuracy per length and depth. The same keys are used for sparse and dense (same ``seed``)."""
    rng = random.Random(seed)
    keys = [[[str(rng.randint(10000, 99999)) for _ in range(trials)] for _ in depths] for _ in lengths]
    correct = [[0] * len(depths) for _ in lengths]
    ctx = dense_attention(model) if dense else nullcontext()
    with ctx:
        for li, length in enumerate(lengths):
            for di, depth in enumerate(depths):
                for trial in range(trials):
                    prompt = build_prompt(tokenizer, length, depth, keys[li][di][trial])
                    answer_ids = greedy_answer(model, prompt.input_ids, max_new_tokens=len(prompt.key) + 3)
                    answer = tokenizer.decode(answer_ids, skip_special_tokens=True)
                    correct[li][di] += int(prompt.key in answer.replace(" ", ""))
                    if progress:
                        progress(1)
    return PasskeyResult(list(lengths), list(depths), trials, correct)
