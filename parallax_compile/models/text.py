"""Real English text that is always on disk: the prose of Python's own reference manual.

``pydoc_data.topics.topics`` (shipped with CPython, used by ``help()``) holds ~465k characters of
the language reference. :func:`corpus` keeps its prose paragraphs (drops indented code, grammar
rules and heading underlines) and reflows each onto one line, so examples get natural sentences
rather than random ids, without a network or a data set package.

* :func:`sample_text` / :func:`sentences` / :func:`byte_tokens`: deterministic excerpts by seed.
* :func:`train_val_split` + :func:`get_batch`: byte-level data for tiny training runs.
"""

from __future__ import annotations

import functools
import random
import re

import torch
from torch import Tensor

__all__ = ["byte_tokens", "corpus", "get_batch", "sample_text", "sentences", "train_val_split"]

_UNDERLINE = re.compile(r"^[*=\-~^\"]{3,}\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


@functools.cache
def corpus() -> str:
    """The prose of ``pydoc_data.topics`` in sorted topic order: one paragraph per line, paragraphs
    separated by a blank line. Deterministic for a given Python version (~300k characters)."""
    from pydoc_data.topics import topics

    paragraphs: list[str] = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name].replace("\r", "")):
            lines = [ln for ln in block.split("\n") if ln.strip() and not _UNDERLINE.match(ln)]
            if not lines or any(ln[:1].isspace() or ln.startswith(">>>") for ln in lines):
                continue  # code, doctests, grammar productions, indented tables
            text = " ".join(" ".join(ln.split()) for ln in lines)
            if len(text.split()) >= 8:  # headings and fragments are not prose
                paragraphs.append(text)
    return "\n\n".join(paragraphs)


def sample_text(n_chars: int, seed: int = 0) -> str:
    """``n_chars`` characters of contiguous prose starting at a word boundary picked by ``seed``;
    wraps around the corpus when ``n_chars`` exceeds it. Exactly ``n_chars`` long."""
    if n_chars < 0:
        raise ValueError(f"sample_text: n_chars must be >= 0, got {n_chars}")
    text = corpus()
    start = random.Random(seed).randrange(len(text))
    start = text.find(" ", start) + 1  # 0 when there is no space left: start at the top
    out = text[start:]
    while len(out) < n_chars:
        out += "\n\n" + text
    return out[:n_chars]


def sentences(n: int, seed: int = 0, *, min_words: int = 4, max_words: int = 40) -> list[str]:
    """``n`` distinct consecutive sentences of ``min_words``..``max_words`` words, from an offset
    picked by ``seed`` (their lengths differ, which makes padded batches)."""
    picked: list[str] = []
    text = sample_text(min(len(corpus()), 20_000 + 400 * n), seed)
    for para in text.split("\n\n")[1:]:  # the first paragraph starts mid-way
        for sent in _SENTENCE_END.split(para):
            if _is_plain_sentence(sent, min_words, max_words) and sent not in picked:
                picked.append(sent)
                if len(picked) == n:
                    return picked
    raise ValueError(f"sentences: found only {len(picked)} of {n} sentences for seed {seed}")


def _is_plain_sentence(sent: str, min_words: int, max_words: int) -> bool:
    words = sent.split()
    return (
        min_words <= len(words) <= max_words
        and sent[0].isupper()
        and sent.endswith(".")
        and sum(w.isalpha() for w in words) >= 0.6 * len(words)
    )


def byte_tokens(n: int, *, batch_size: int | None = None, seed: int = 0) -> Tensor:
    """UTF-8 bytes of real text as int64 ids in [0, 256): shape ``[n]``, or ``[batch_size, n]`` with
    each row an excerpt from its own offset (seeds ``seed``, ``seed + 1``, ...)."""
    rows = 1 if batch_size is None else batch_size
    out = torch.empty(rows, n, dtype=torch.long)
    for i in range(rows):
        data = sample_text(n, seed + i).encode("utf-8")[:n]  # >= n bytes: UTF-8 never shrinks
        out[i] = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    return out[0] if batch_size is None else out


def train_val_split(val_fraction: float = 0.1, n_bytes: int | None = None) -> tuple[Tensor, Tensor]:
    """The corpus as UTF-8 byte ids (int64 ``[N]``), first ``n_bytes`` of it when given, split into
    ``(train, val)`` with the last ``val_fraction`` held out, as nanoGPT's ``prepare.py`` does."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"train_val_split: val_fraction must be in (0, 1), got {val_fraction}")
    data = corpus().encode("utf-8")[:n_bytes]
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    n_train = int(len(ids) * (1.0 - val_fraction))
    return ids[:n_train], ids[n_train:]


def get_batch(
    data: Tensor, batch_size: int, block_size: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Random windows of ``data`` ``[N]``: inputs ``x`` and next-token targets ``y``, both int64
    ``[batch_size, block_size]`` (nanoGPT's ``get_batch``)."""
    if len(data) <= block_size:
        raise ValueError(f"get_batch: data has {len(data)} tokens, need more than block_size={block_size}")
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([data[i : i + block_size] for i in ix.tolist()])
    y = torch.stack([data[i + 1 : i + 1 + block_size] for i in ix.tolist()])
    return x, y
