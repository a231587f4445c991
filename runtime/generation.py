"""The generation loop: chunked prefill into a bounded cache, then decode with sampling.

Why our own loop rather than ``model.generate``: (1) prefill in chunks, so a long prompt never
materialises more than one chunk of activations (the bounded cache keeps memory flat after it);
(2) the bounded caches have fixed-size buffers, so a decode step has static shapes and, on CUDA,
is captured once in a CUDA graph and replayed (Python and kernel-launch overhead vanish, which
matters at batch 1). ``generate()`` also works with the caches (``make_cache(model)``) and gives
the same greedy tokens; the tests check that.

Batches of prompts of different lengths are left-padded; each row has its own positions
(``cumsum(mask) - 1``), so a row's result does not depend on its neighbours. Rows that finished
keep being fed (their output is ignored) until every row is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .cache_cca import make_cache
from .cache_sparsek import BoundedCache
from .sampling import SamplingConfig, next_tokens
from .transformers_compat import with_cache

# on_token(row, token_id, text_delta): called for every generated token of a live row
TokenCallback = Callable[[int, int, str], None]


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    new_tokens: int
    finish_reason: str  # "stop" (stop token or string), "length", "interrupted"
    time_to_first_token_s: float
    total_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        decode_time = self.total_s - self.time_to_first_token_s
        return (self.new_tokens - 1) / decode_time if self.new_tokens > 1 and decode_time > 0 else 0.0


class _GraphedStep:
    """A decode step captured in a CUDA graph, re-captured when the cache reallocates."""

    def __init__(self, step: Callable, cache: BoundedCache, batch: int, device: torch.device):
        self.step, self.cache = step, cache
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.left = 0
        self.captures = 0
        self.warm = False

    def _capture(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.step(self.tokens, self.positions)
        self.cache.advance_columns(-1)  # capture ran the Python once without a real step
        self.captures += 1

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.graph is None and not self.warm:
            # one real step eagerly first: compiles the Triton kernels and allocates workspaces
            # outside the capture (capturing a first launch is not allowed)
            self.warm = True
            return self.step(tokens, positions)
        if self.left <= 0:
            grown = self.cache.reserve(64)
            self.left = 64
            if grown or self.graph is None:
                self._capture()
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        self.cache.advance_columns(1)
        self.left -= 1
        return self.logits


class Generator:
    """Runs a converted model (sparse attention) with bounded caches.

    Args:
        model: a converted model (``sparsek.runtime.load_model``).
        tokenizer: needed for text in/out, stop strings and streaming text.
        prefill_chunk: prompt columns per forward pass during prefill.
        cuda_graph: capture the decode step on CUDA (ignored on CPU).
    """

    def __init__(self, model, tokenizer=None, prefill_chunk: int = 4096, cuda_graph: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.prefill_chunk = max(1, prefill_chunk)
        self.device = next(model.parameters()).device
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self.pad_id = self._pad_id()

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for cand in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None),
                     getattr(self.model.config, "pad_token_id", None)):
            if isinstance(cand, int):
                return cand
        return 0

    def default_stop_ids(self) -> tuple[int, ...]:
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            eos = getattr(src, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(int(e) for e in eos)
        return tuple(sorted(ids))

    # --- model calls ----------------------------------------------------------------------------
    def _forward(self, ids, cache, mask=None, positions=None) -> torch.Tensor:
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
            **with_cache(self.model, cache),
        )
        return out.logits[:, -1]

    def prefill(self, cache: BoundedCache, ids: torch.Tensor, mask: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Feed ``ids`` (left-padded ``[B, L]``) in chunks; returns the last logits ``[B, V]``.

        ``start`` ``[B]`` is each row's number of tokens already in the cache.
        """
        positions = (start[:, None] + mask.long().cumsum(-1) - 1).clamp(min=0)
        # the 2D mask must cover every column the cache has seen: earlier columns were real
        past = torch.ones(ids.shape[0], cache.get_seq_length(), dtype=mask.dtype, device=mask.device)
        full_mask = torch.cat([past, mask], dim=1)
        logits = None
        for c0 in range(0, ids.shape[1], self.prefill_chunk):
            c1 = min(ids.shape[1], c0 + self.prefill_chunk)
            upto = past.shape[1] + c1
            logits = self._forward(ids[:, c0:c1], cache, full_mask[:, :upto], positions[:, c0:c1])
        return logits

    # --- the loop -------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        cfg: SamplingConfig,
        on_token: TokenCallback | None = None,
        cache: BoundedCache | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[list[GenerationResult], BoundedCache]:
        """Generate for a batch of tokenised prompts.

        With ``cache`` (a previous call's, same batch size), the prompts are appended to what it
        holds (a chat turn). Returns the results and the cache, which then holds every prompt
        token and every generated token but the last.
        """
        cfg.validate()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        t0 = time.perf_counter()
        b = len(prompts)
        dev = self.device
        longest = max(len(p) for p in prompts)
        ids = torch.full((b, longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros(b, longest, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, longest - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        if cache is None:
            cache = make_cache(self.model)
            start = torch.zeros(b, dtype=torch.long, device=dev)
        else:
            start = cache.layers[0].count.clone()
        stop_ids = torch.tensor(sorted(set(cfg.stop_token_ids)) or [-1], device=dev)
        gen = None
        if cfg.seed is not None:
            gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        seen = None
        if cfg.repetition_penalty != 1.0:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            seen = torch.zeros(b, vocab, dtype=torch.bool, device=dev)
            seen.scatter_(1, ids, mask.bool())

        logits = self.prefill(cache, ids, mask, start)
        positions = (start + mask.sum(-1))[:, None]  # position of the next token fed

        def step(tokens, pos):
            return self._forward(tokens, cache, None, pos)

        stepper = _GraphedStep(step, cache, b, dev) if self.cuda_graph else step
        out_ids: list[list[int]] = [[] for _ in range(b)]
        texts = [""] * b
        done = [False] * b
        reasons = ["length"] * b
        ttft = 0.0
        for n in range(cfg.max_new_tokens):
            tok = next_tokens(logits, cfg, seen, gen)
            if seen is not None:
                seen[torch.arange(b, device=dev), tok] = True
            is_stop = torch.isin(tok, stop_ids)
            tok_host, stop_host = tok.tolist(), is_stop.tolist()
            if n == 0:
                ttft = time.perf_counter() - t0
            for i in range(b):
                if done[i]:
                    continue
                out_ids[i].append(tok_host[i])
                if stop_host[i]:
                    done[i], reasons[i] = True, "stop"
                    continue
                delta = self._text_delta(i, out_ids[i], texts)
                if cfg.stop_strings and self._hit_stop_string(i, texts, cfg.stop_strings):
                    done[i], reasons[i] = True, "stop"
                    continue
                if on_token is not None:
                    on_token(i, tok_host[i], delta)
            if all(done) or n == cfg.max_new_tokens - 1:
                break
            if should_stop is not None and should_stop():
                reasons = ["interrupted" if not d else r for d, r in zip(done, reasons)]
                break
            logits = stepper(tok[:, None], positions)
            positions = positions + 1
        total = time.perf_counter() - t0
        results = []
        for i in range(b):
            text = self._cut_stop_strings(self._decode(out_ids[i], cfg.stop_token_ids), cfg.stop_strings)
            results.append(GenerationResult(out_ids[i], text, len(prompts[i]), len(out_ids[i]), reasons[i], ttft, total))
        return results, cache

    def generate_text(self, prompts: Sequence[str], cfg: SamplingConfig, on_token: TokenCallback | None = None):
        """Tokenise plain-text prompts and generate; see :meth:`generate_ids`."""
        ids = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        return self.generate_ids(ids, cfg, on_token)[0]

    # --- text helpers -------------------------------------------------------------------------
    def _decode(self, ids: list[int], stop_token_ids=()) -> str:
        if self.tokenizer is None:
            return ""
        if ids and ids[-1] in set(stop_token_ids):
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _text_delta(self, i: int, ids: list[int], texts: list[str]) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for the rest
            return ""
        delta = text[len(texts[i]):] if text.startswith(texts[i]) else text
        texts[i] = text
        return delta

    @staticmethod
    def _hit_stop_string(i: int, texts: list[str], stops: Sequence[str]) -> bool:
        return any(s and s in texts[i] for s in stops)

    @staticmethod
    def _cut_stop_strings(text: str, stops: Sequence[str]) -> str:
        cut = len(text)
        for s in stops:
            at = text.find(s) if s else -1
            if at >= 0:
                cut = min(cut, at)
        return text[:cut]


# --- a chat conversation over one bounded cache -----------------------------------------------


def render_chat_text(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """A conversation as text through the tokenizer's chat template (a plain fallback without one)."""
    if not getattr(tokenizer, "chat_template", None):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation through the chat template."""
    text = render_chat_text(tokenizer, messages, add_generation_prompt)
    special = not getattr(tokenizer, "chat_template", None)
    return tokenizer(text, add_special_tokens=special)["input_ids"]


class ChatSession:
    """Keeps the conversation and its cache; each turn feeds only the new tokens.

    Every turn the conversation is rendered through the chat template; when the rendering starts
    with the text the cache already holds (previous rendering + the answer), only the rest is
    tokenised and fed, after the answer's last token (sampled but never fed): a chunked
    continuation of the bounded cache. Otherwise the cache is rebuilt from the whole conversation.
    An answer stopped through ``should_stop`` ends between two steps and keeps its cache; one cut by
    KeyboardInterrupt may leave a layer half-updated, so its cache is dropped.
    """

    def __init__(self, generator: Generator, cfg: SamplingConfig, system: str | None = None):
        self.generator, self.cfg, self.system = generator, cfg, system
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.cache: BoundedCache | None = None
        self.cached_text: str | None = None
        self.pending: list[int] = []
        self.fed_ids: list[int] = []  # every token the cache has seen, in order
        self.last: GenerationResult | None = None
        self.last_fed = 0

    @property
    def context_tokens(self) -> int:
        return 0 if self.cache is None else int(self.cache.layers[0].count.max())

    def reply(self, user_text: str, on_text: Callable[[str], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> GenerationResult:
        """Answer one user message, streaming text deltas to ``on_text``.

        ``should_stop`` is checked after every token; when it returns True the answer ends there
        (``finish_reason == "interrupted"``) and is kept, cache included, like a finished one.
        On KeyboardInterrupt the partial answer is kept in the conversation, the cache is dropped
        and the exception is re-raised for the caller to report.
        """
        tok = self.generator.tokenizer
        self.messages.append({"role": "user", "content": user_text})
        text = render_chat_text(tok, self.messages)
        if self.cache is not None and self.cached_text is not None and text.startswith(self.cached_text):
            new = self.pending + tok(text[len(self.cached_text):], add_special_tokens=False)["input_ids"]
            cache, before = self.cache, self.fed_ids
        else:
            new, cache, before = render_chat(tok, self.messages), None, []
        partial: list[str] = []

        def on_token(row: int, token: int, delta: str) -> None:
            partial.append(delta)
            if on_text is not None and delta:
                on_text(delta)

        self.cache, self.cached_text = None, None  # untrustworthy until the turn completes
        try:
            results, cache = self.generator.generate_ids([new], self.cfg, on_token, cache=cache,
                                                         should_stop=should_stop)
        except KeyboardInterrupt:
            self.messages.append({"role": "assistant", "content": "".join(partial)})
            raise
        res = results[0]
        self.messages.append({"role": "assistant", "content": res.text})
        self.cache, self.cached_text = cache, text + res.text
        self.pending = res.token_ids[-1:]
        self.fed_ids = before + new + res.token_ids[:-1]
        self.last, self.last_fed = res, len(new)
        return res

    def stats(self) -> dict:
        """Numbers for ``/stats``: speed of the last answer, prompt and cache sizes."""
        out = {"context_tokens": self.context_tokens, "turns": sum(m["role"] == "user" for m in self.messages)}
        if self.last is not None:
            out.update(
                last_prompt_tokens_fed=self.last_fed,
                last_new_tokens=self.last.new_tokens,
                time_to_first_token_s=round(self.last.time_to_first_token_s, 4),
                decode_tokens_per_s=round(self.last.decode_tokens_per_s, 2),
            )
        if self.cache is not None:
            held = self.cache.stored_kv_entries()
            out.update(
                cache_kv_entries_per_head=int(held.max()),
                cache_kv_mib=round(self.cache.kv_bytes() / 2**20, 3),
                cache_method=self.cache.settings.describe(),
            )
        return out


# --- batch generation from a JSONL file, resumable ------------------------------------------


@dataclass
class JsonlRequest:
    id: str
    prompt: str | None
    messages: list | None
    line: int


def read_requests(path, warn: Callable[[str], None]) -> list[JsonlRequest]:
    """Parse the input file; a malformed line is reported with its number and skipped."""
    import json

    requests, ids = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                warn(f"line {lineno}: not valid JSON ({e.msg}); skipped")
                continue
            problem = _request_problem(obj)
            if problem:
                warn(f"line {lineno}: {problem}; skipped")
                continue
            rid = str(obj["id"])
            if rid in ids:
                warn(f"line {lineno}: duplicate id {rid!r}; skipped")
                continue
            ids.add(rid)
            requests.append(JsonlRequest(rid, obj.get("prompt"), obj.get("messages"), lineno))
    return requests


def _request_problem(obj) -> str | None:
    if not isinstance(obj, dict):
        return "expected a JSON object"
    if "id" not in obj or not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
        return "missing or invalid 'id' (a string or an integer)"
    has_p, has_m = "prompt" in obj, "messages" in obj
    if has_p == has_m:
        return "needs exactly one of 'prompt' or 'messages'"
    if has_p and (not isinstance(obj["prompt"], str) or not obj["prompt"]):
        return "'prompt' must be a non-empty string"
    if has_m:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        ):
            return "'messages' must be a non-empty list of {role, content} strings"
    return None


def finished_ids(path) -> set[str]:
    """Ids already in the output (a truncated last line from an interrupted run is ignored)."""
    import json
    from pathlib import Path

    done: set[str] = set()
    p = Path(path)
    if not p.exists():
        return done
    with open(p, encoding="utf-8") as f:
        for raw in f:
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "id" in obj:
                done.add(str(obj["id"]))
    return done


def run_jsonl_job(
    generator: Generator,
    input_path,
    output_path,
    cfg: SamplingConfig,
    batch_size: int = 1,
    system: str | None = None,
    chat_template: bool = True,
    warn: Callable[[str], None] = print,
    progress: bool = True,
) -> dict:
    """Generate for every request not yet in the output; append one line per finished prompt."""
    import json
    import os

    from tqdm.auto import tqdm

    requests = read_requests(input_path, warn)
    done = finished_ids(output_path)
    todo = [r for r in requests if r.id not in done]
    tok = generator.tokenizer
    if os.path.exists(output_path) and os.path.getsize(output_path) > 0:
        with open(output_path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            needs_newline = f.read(1) != b"\n"
    else:
        needs_newline = False
    stats = {"requests": len(requests), "skipped_done": len(requests) - len(todo), "generated": 0, "new_tokens": 0}
    bar = tqdm(total=len(todo), unit="prompt", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    with open(output_path, "a", encoding="utf-8") as out:
        if needs_newline:
            out.write("\n")
        for b0 in range(0, len(todo), batch_size):
            batch = todo[b0 : b0 + batch_size]
            prompts = []
            for r in batch:
                if r.messages is not None:
                    msgs = list(r.messages)
                    if system and not any(m["role"] == "system" for m in msgs):
                        msgs = [{"role": "system", "content": system}, *msgs]
                    prompts.append(render_chat(tok, msgs))
                elif chat_template:
                    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": r.prompt}]
                    prompts.append(render_chat(tok, msgs))
                else:
                    prompts.append(tok(r.prompt, add_special_tokens=True)["input_ids"])
            results, _ = generator.generate_ids(prompts, cfg)
            for r, res in zip(batch, results):
                line = {
                    "id": r.id, "text": res.text, "prompt_tokens": res.prompt_tokens,
                    "completion_tokens": res.new_tokens, "finish_reason": res.finish_reason,
                    "time_to_first_token_s": round(res.time_to_first_token_s, 4), "total_s": round(res.total_s, 4),
                    "decode_tokens_per_s": round(res.decode_tokens_per_s, 2),
                }
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
                out.flush()
                stats["generated"] += 1
                stats["new_tokens"] += res.new_tokens
            elapsed = time.perf_counter() - t0
            bar.set_postfix_str(f"{stats['new_tokens'] / max(elapsed, 1e-9):.1f} tok/s")
            bar.update(len(batch))
    bar.close()
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return stats
