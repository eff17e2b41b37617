"""Label vocabularies: the labels a scan tests, checked, from Python or from a file."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from clipfast.errors import ClipfastError


class VocabularyError(ClipfastError, ValueError):
    """A vocabulary that cannot be scanned: too few, empty, duplicate or non-string labels."""


def check_vocabulary(classnames: Sequence[str]) -> list[str]:
    """The label vocabulary as a list; VocabularyError for fewer than two labels, empty or duplicate ones."""
    if isinstance(classnames, str):
        raise VocabularyError("the label vocabulary must be a sequence of labels, not one string")
    classnames = list(classnames)
    if len(classnames) < 2:
        raise VocabularyError("the label vocabulary needs at least two labels")
    bad = [i for i, name in enumerate(classnames) if not isinstance(name, str) or not name.strip()]
    if bad:
        raise VocabularyError(f"empty or non-string labels at positions {bad[:8]}")
    seen, duplicates = set(), []
    for name in classnames:
        if name.strip() in seen:
            duplicates.append(name)
        seen.add(name.strip())
    if duplicates:
        raise VocabularyError(f"duplicate labels {sorted(set(duplicates))[:8]}: each label must be named once")
    return classnames


def read_vocabulary(path: str | Path) -> list[str]:
    """One label per line of a text file (surrounding spaces dropped), checked."""
    path = Path(path)
    if not path.is_file():
        raise VocabularyError(f"vocabulary file not found: {path}")
    labels = [line.strip() for line in path.read_text().splitlines()]
    if "" in labels:  # a file can say which line
        raise VocabularyError(f"{path}: empty line {labels.index('') + 1}; one non-empty label per line")
    try:
        return check_vocabulary(labels)
    except VocabularyError as error:
        raise VocabularyError(f"{path}: {error}") from None
