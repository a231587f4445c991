"""Held-out text for evaluation and adaptation: an embedded corpus, or the user's files.

Why an embedded corpus: ``validate`` must work offline, in CI and on a fresh machine, without a
dataset download. Python ships the text of its own reference documentation
(``pydoc_data.topics``, ~465K characters of English prose with code); it is used as the default.
It is the same everywhere for a given Python version, so numbers stay comparable.

User data: ``.txt`` files (one document per file), ``.jsonl`` (a ``"text"`` field per line, or
the first string field), ``.parquet`` (a ``text`` column, needs ``pyarrow``), or folders of those
(searched recursively, sorted for reproducibility).

Token batches: documents are tokenized, joined with the EOS token and cut into consecutive
windows of ``seq_len`` tokens, so long sequences exist even when every document is short.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from .errors import UserError

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
EMBEDDED_NAME = "embedded:pydoc_topics"


def embedded_corpus() -> list[str]:
    """Python's own documentation topics, one document per topic, in a fixed order."""
    from pydoc_data import topics

    return [topics.topics[name] for name in sorted(topics.topics)]


def _jsonl_texts(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if isinstance(row, str):
                yield row
                continue
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected an object with a 'text' field")
            text = row.get("text")
            if not isinstance(text, str):
                text = next((v for v in row.values() if isinstance(v, str)), None)
            if text is None:
                raise UserError(f"{path}:{lineno}: no text field")
            yield text


def _parquet_texts(path: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install 'sparsek[data]' (or pip install pyarrow)") from None
    table = pq.read_table(path)
    names = table.column_names
    column = "text" if "text" in names else next(
        (n for n in names if str(table.schema.field(n).type) in ("string", "large_string")), None
    )
    if column is None:
        raise UserError(f"{path}: no text column (columns: {', '.join(names)})")
    for value in table.column(column).to_pylist():
        if isinstance(value, str):
            yield value


def _file_texts(path: Path) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace")
    elif suffix == ".jsonl":
        yield from _jsonl_texts(path)
    elif suffix == ".parquet":
        yield from _parquet_texts(path)
    else:
        raise UserError(f"{path}: unsupported data file (use {', '.join(TEXT_SUFFIXES)})")


def data_files(sources: Sequence[str | Path]) -> list[Path]:
    """The data files named by ``sources`` (files, or folders searched recursively)."""
    files: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise UserError(f"{path}: no {', '.join(TEXT_SUFFIXES)} files in this folder")
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in TEXT_SUFFIXES:
                raise UserError(f"{path}: unsupported data file (use {', '.join(TEXT_SUFFIXES)})")
            files.append(path)
        else:
            raise UserError(f"data not found: {source}")
    return files


def load_texts(sources: Sequence[str | Path] | None = None) -> list[str]:
    """Documents from ``sources``; the embedded corpus when ``sources`` is empty or ``None``."""
    if not sources:
        return embedded_corpus()
    texts = [t for f in data_files(sources) for t in _file_texts(f) if t.strip()]
    if not texts:
        raise UserError("the data holds no text")
    return texts


def describe_sources(sources: Sequence[str | Path] | None) -> str:
    return EMBEDDED_NAME if not sources else ", ".join(str(s) for s in sources)


def token_stream(tokenizer, texts: Iterable[str]) -> list[int]:
    """All documents tokenized (no special tokens) and joined by EOS (when the tokenizer has one)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return ids


def token_batches(
    tokenizer,
    texts: Iterable[str],
    seq_len: int,
    num_sequences: int,
    batch_size: int = 1,
    stream: list[int] | None = None,
) -> list[torch.Tensor]:
    """Up to ``num_sequences`` consecutive windows of ``seq_len`` tokens, grouped ``[batch, seq_len]``.

    Windows do not overlap, so every token is scored once. A corpus too short for even one
    window is a user error naming how many tokens it has.
    """
    if seq_len < 2:
        raise UserError(f"sequence length must be at least 2, got {seq_len}")
    ids = stream if stream is not None else token_stream(tokenizer, texts)
    available = len(ids) // seq_len
    if available == 0:
        raise UserError(f"the text has {len(ids)} tokens, fewer than one sequence of {seq_len}")
    n = min(num_sequences, available)
    windows = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return [windows[i : i + batch_size] for i in range(0, n, batch_size)]
