"""Training data for `sparsek adapt`: files -> documents -> token rows -> padded batches.

The one rule that shapes everything here: **attention never crosses a document boundary**.
Our sparse attention takes right-padded rows (one valid prefix per row, ``seqlens``), not packed
rows with segment ids, so every row holds a chunk of exactly one document:

* a document is tokenized and cut into chunks of ``seq_len`` tokens; the last, shorter chunk
  becomes a shorter row (rows of fewer than 2 tokens carry no next-token target and are dropped);
* rows are right-padded to the longest row of their batch (rounded up to a multiple of 8), and
  the padding is masked out of attention and loss;
* to keep padding small, rows are shuffled in a buffer, sorted by length inside the buffer and
  cut into batches (length bucketing), and the batch order is shuffled again.

Large corpora are streamed: files are read lazily (.txt in line blocks, .jsonl line by line,
.parquet in record batches), only one shuffle buffer of rows is held at a time. The stream is a
deterministic function of the seed, so a resumed run replays it and skips the batches it has
already consumed: the data position is just a batch count (checkpoints store it).

Held-out data: ``--eval-data`` files, or every ``round(1 / eval_fraction)``-th document of the
training sources (taken out of training).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsek.runtime.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".parquet")
_TXT_BLOCK = 1 << 20  # characters per streamed piece of a .txt document
PAD_MULTIPLE = 8


# --- files and documents ------------------------------------------------------------------------


def list_files(sources: list[str]) -> list[Path]:
    """Expand folders (recursively, sorted) into .txt/.jsonl/.parquet files; check each is readable."""
    files: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not found:
                raise UserError(f"no data: folder {path} holds no {'/'.join(SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise UserError(f"unsupported data file {path}: use {', '.join(SUFFIXES)} files or folders")
            files.append(path)
        else:
            raise UserError(f"data not found: {path}")
    for f in files:
        if not os.access(f, os.R_OK):
            raise UserError(f"cannot read data file {f}: permission denied")
        try:
            with open(f, "rb") as fh:
                fh.read(1)
        except OSError as e:
            raise UserError(f"cannot read data file {f}: {e.strerror or e}") from None
    return files


def _txt_pieces(path: Path) -> Iterator[tuple[str, bool]]:
    """A whole .txt file is one document, streamed in blocks cut at line ends."""
    first, block = True, []
    size = 0
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                block.append(line)
                size += len(line)
                if size >= _TXT_BLOCK:
                    yield "".join(block), first
                    first, block, size = False, [], 0
    except OSError as e:
        raise UserError(f"cannot read data file {path}: {e.strerror or e}") from None
    if block:
        yield "".join(block), first


def _jsonl_pieces(path: Path, text_field: str) -> Iterator[tuple[str, bool]]:
    """One document per line: a JSON object with ``text_field``, or a JSON string."""
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                text = obj if isinstance(obj, str) else obj.get(text_field) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise UserError(f"{path}:{n}: no string field {text_field!r} (set --text-field)")
                yield text, True
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read data file {path}: {e.strerror or e}") from None


def _parquet_pieces(path: Path, text_field: str) -> Iterator[tuple[str, bool]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow, or sparsek[data])") from None
    try:
        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise UserError(f"{path}: no column {text_field!r} (set --text-field)")
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str):
                    yield text, True
    except UserError:
        raise
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise UserError(f"cannot read parquet file {path}: {str(e).splitlines()[0]}") from None


def embedded_documents() -> Iterator[tuple[str, bool]]:
    """The default corpus: Python's own help topics (``pydoc_data.topics``), real English text
    that ships with every Python, one document per topic."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name], True


def iter_pieces(files: list[Path] | None, text_field: str = "text") -> Iterator[tuple[str, bool]]:
    """``(text, starts_new_document)`` pieces of every document, in a fixed order."""
    if files is None:
        yield from embedded_documents()
        return
    for f in files:
        suffix = f.suffix.lower()
        if suffix == ".txt":
            yield from _txt_pieces(f)
        elif suffix == ".jsonl":
            yield from _jsonl_pieces(f, text_field)
        else:
            yield from _parquet_pieces(f, text_field)


# --- token rows ---------------------------------------------------------------------------------


def _bos_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer adds one by default (so rows look like what validate feeds)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids[:1] == [bos] else None


def iter_rows(tokenizer, pieces: Iterator[tuple[str, bool]], seq_len: int, split: str = "all",
              eval_period: int = 0) -> Iterator[list[int]]:
    """Rows of at most ``seq_len`` tokens, each from a single document.

    ``split``: ``"train"`` drops every ``eval_period``-th document, ``"eval"`` keeps only those,
    ``"all"`` keeps everything.
    """
    bos = _bos_id(tokenizer)
    doc = -1
    buf: list[int] = []

    def keep(n: int) -> bool:
        if split == "all" or eval_period <= 0:
            return split != "eval"
        held_out = n % eval_period == eval_period - 1
        return held_out if split == "eval" else not held_out

    for text, new_doc in pieces:
        if new_doc:
            if len(buf) >= 2:
                yield buf
            buf = []
            doc += 1
            if keep(doc) and bos is not None:
                buf.append(bos)
        if not keep(doc):
            continue
        buf.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            buf = buf[seq_len:]
    if len(buf) >= 2:
        yield buf


# --- batches ------------------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor  # [R, T], right-padded with 0
    attention_mask: torch.Tensor  # [R, T], 1 on real tokens
    lengths: torch.Tensor  # [R]

    @property
    def target_tokens(self) -> int:
        """Positions with a next-token target: ``length - 1`` per row."""
        return int((self.lengths - 1).clamp(min=0).sum())

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.lengths.to(device))

    def rows(self, start: int, stop: int) -> Batch:
        lengths = self.lengths[start:stop]
        width = _padded_width(int(lengths.max()) if lengths.numel() else 1, self.input_ids.shape[1])
        return Batch(self.input_ids[start:stop, :width], self.attention_mask[start:stop, :width], lengths)


def _padded_width(longest: int, cap: int) -> int:
    return min(cap, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)


def collate(rows: list[list[int]], seq_len: int) -> Batch:
    longest = max(len(r) for r in rows)
    width = _padded_width(longest, seq_len)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return Batch(ids, mask, torch.tensor([len(r) for r in rows], dtype=torch.long))


class TrainStream:
    """Endless, deterministic stream of global batches (``rows_per_batch`` rows each).

    Epoch after epoch over the sources; a shuffle buffer of ``buffer`` rows is shuffled, sorted by
    length (bucketing), cut into batches, and the batches are shuffled. Everything random comes
    from generators seeded by ``(seed, epoch, buffer number)``, so the n-th batch is always the
    same one and resuming only needs ``n``.
    """

    def __init__(self, tokenizer, files: list[Path] | None, seq_len: int, rows_per_batch: int, seed: int,
                 buffer: int = 256, eval_period: int = 0, text_field: str = "text", describe: str = "data"):
        self.tokenizer, self.files, self.seq_len = tokenizer, files, seq_len
        self.rows_per_batch, self.seed = rows_per_batch, seed
        self.buffer = max(buffer, rows_per_batch)
        self.eval_period, self.text_field, self.describe = eval_period, text_field, describe
        self.consumed = 0
        self._it = self._batches()

    def _batches(self) -> Iterator[list[list[int]]]:
        carry: list[list[int]] = []
        epoch = 0
        while True:
            buffer_no = 0
            rows_this_epoch = 0
            pieces = iter_pieces(self.files, self.text_field)
            split = "train" if self.eval_period > 0 else "all"
            for row in iter_rows(self.tokenizer, pieces, self.seq_len, split, self.eval_period):
                carry.append(row)
                rows_this_epoch += 1
                if len(carry) >= self.buffer:
                    batches, carry = self._cut(carry, epoch, buffer_no)
                    buffer_no += 1
                    yield from batches
            if rows_this_epoch == 0:
                raise UserError(f"no training data: {self.describe} holds no text (after the held-out split)")
            if len(carry) >= self.rows_per_batch:
                batches, carry = self._cut(carry, epoch, buffer_no)
                yield from batches
            epoch += 1

    def _cut(self, rows: list[list[int]], epoch: int, buffer_no: int):
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch * 10_007 + buffer_no) % (1 << 62))
        order = torch.randperm(len(rows), generator=g).tolist()
        rows = [rows[i] for i in order]
        n = len(rows) // self.rows_per_batch * self.rows_per_batch
        rows, rest = rows[:n], rows[n:]
        rows.sort(key=len)  # stable: ties keep their shuffled order
        batches = [rows[i : i + self.rows_per_batch] for i in range(0, n, self.rows_per_batch)]
        perm = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in perm], rest

    def next(self) -> Batch:
        rows = next(self._it)
        self.consumed += 1
        return collate(rows, self.seq_len)

    def skip(self, n: int) -> None:
        """Fast-forward ``n`` batches (resume): replays tokenization, does no model work."""
        for _ in range(n):
            next(self._it)
            self.consumed += 1


def eval_batches(tokenizer, files: list[Path] | None, seq_len: int, rows_per_batch: int, max_batches: int,
                 eval_period: int = 0, text_field: str = "text") -> list[Batch]:
    """The first ``max_batches`` held-out batches (fixed, unshuffled), or [] when there are none."""
    if max_batches <= 0:
        return []
    split = "eval" if eval_period > 0 else "all"
    rows: list[list[int]] = []
    out: list[Batch] = []
    for row in iter_rows(tokenizer, iter_pieces(files, text_field), seq_len, split, eval_period):
        rows.append(row)
        if len(rows) == rows_per_batch:
            out.append(collate(rows, seq_len))
            rows = []
            if len(out) == max_batches:
                return out
    if rows:
        out.append(collate(rows, seq_len))
    return out


def eval_period(fraction: float) -> int:
    return 0 if fraction <= 0 else max(2, round(1 / fraction))
