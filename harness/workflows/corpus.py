"""Documents for SearchQA, chunked into passages with stable ids, and a BM25 index over them.

The built-in corpus is CPython's documentation topics (`pydoc_data.topics`, shipped with every Python), one
document per topic, so SearchQA runs anywhere with nothing to download. A user's corpus is a folder of .md and
.txt files (one document each, id = the path without suffix) and .jsonl files (one document per line:
`{"id": ..., "text": ..., "title": optional}`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ConfigError

BUILTIN = "builtin"
_STOPWORD_TEXT = (
    "a an and are as at be by can do does for from how i in is it of on or should that the this to was what when "
    "which who why will with you your"
)
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Passage:
    id: str  # "<document id>#<chunk number>"
    doc_id: str
    title: str
    text: str


def builtin_documents() -> list[Document]:
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        text = topics[key].strip()
        title = text.splitlines()[0].strip() if text else key
        docs.append(Document(key, title, text))
    return docs


def _jsonl_documents(path: Path, folder: Path) -> list[Document]:
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"corpus file {path}, line {n}: not valid JSON ({exc}).", "fix that line.") from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not isinstance(row.get("text"), str):
            raise ConfigError(
                f"corpus file {path}, line {n}: each line needs a string 'id' and a string 'text'.",
                'write each document as {"id": "...", "text": "...", "title": "..."}.',
            )
        docs.append(Document(row["id"], str(row.get("title") or row["id"]), row["text"]))
    return docs


def load_documents(corpus: str | None) -> list[Document]:
    """The built-in documents (corpus None or "builtin"), or those of a folder; ConfigError when there are none."""
    if corpus in (None, BUILTIN):
        return builtin_documents()
    folder = Path(corpus).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"workflow.corpus={corpus!r} is not a folder.",
            "give a folder of .md, .txt or .jsonl documents, or workflow.corpus=builtin.",
        )
    docs: list[Document] = []
    for path in sorted(folder.rglob("*")):
        if path.suffix in (".md", ".txt") and path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                doc_id = path.relative_to(folder).with_suffix("").as_posix()
                docs.append(Document(doc_id, text.splitlines()[0].lstrip("# ").strip(), text))
        elif path.suffix == ".jsonl" and path.is_file():
            docs.extend(_jsonl_documents(path, folder))
    if not docs:
        raise ConfigError(
            f"the corpus folder {folder} has no documents (no non-empty .md, .txt or .jsonl files).",
            "put documents in it, or use workflow.corpus=builtin.",
        )
    ids = [d.id for d in docs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(
            f"the corpus folder {folder} has several documents with the id(s) {', '.join(duplicates[:5])}.",
            "give each document a distinct id.",
        )
    return docs


def chunk(docs: list[Document], words: int, overlap: int) -> list[Passage]:
    """Split each document into passages of about `words` words, the next starting `words - overlap` later.

    Splitting keeps line breaks (code and grammar in the documentation depend on them)."""
    passages = []
    step = max(words - overlap, 1)
    for doc in docs:
        tokens = re.findall(r"\S+\s*", doc.text)
        starts = range(0, max(len(tokens) - overlap, 1), step)
        for n, start in enumerate(starts):
            text = "".join(tokens[start : start + words]).strip()
            if text:
                passages.append(Passage(f"{doc.id}#{n}", doc.id, doc.title, text))
    return passages


def terms(text: str) -> list[str]:
    return [t for t in re.findall(r"[a-z0-9_]+", text.lower()) if t not in _STOPWORDS]


class BM25Index:
    """BM25 (Okapi) over passages; a passage's title is part of what is matched."""

    def __init__(self, passages: list[Passage]) -> None:
        from rank_bm25 import BM25Okapi

        if not passages:
            raise ConfigError("the corpus has no passages to index.", "give documents with some text.")
        self.passages = passages
        self._bm25 = BM25Okapi([terms(p.title + " " + p.text) for p in passages])

    def search(self, query: str, k: int) -> list[tuple[Passage, float]]:
        query_terms = terms(query)
        if not query_terms:
            return []
        scores = self._bm25.get_scores(query_terms)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
        return [(self.passages[i], float(scores[i])) for i in order]
