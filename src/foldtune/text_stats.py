"""Simple statistics of a text, the features a stack (foldtune.stack) adds to its members' predictions.

    chars            length in characters (every character, spaces and newlines included)
    words            number of words: runs of letters and digits, with inner apostrophes
                     ("don't", "student's" are one word each); punctuation is not a word
    sentences        pieces between runs of . ! ? that hold at least one word ("Hi. You?" is 2,
                     a text without end punctuation is 1, "Mr. Smith" is 2: cheap, not a parser)
    mean_word_length letters and digits per word (apostrophes not counted); 0 without words
    type_token_ratio distinct words (lowercased) over words; 0 without words
    unknown_share    share of the words (lowercased, every occurrence) that are not in the
                     vocabulary; 0 without words

The vocabulary is the stack's own, built from its training texts (vocabulary_of): the
words found in at least MIN_ESSAYS of them. Nothing is downloaded and no tokenizer is
needed, so a stack of TF-IDF runs has it as one of transformers has; misspellings and
rare words fall outside it. A training text must not vouch for its own words: its
unknown_share counts the essays other than itself (leave_one_out), so that a test text,
which is in none of them, is measured the same way.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

STAT_NAMES = ("chars", "words", "sentences", "mean_word_length", "type_token_ratio", "unknown_share")
MIN_ESSAYS = 3
WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")
SENTENCE_END = re.compile(r"[.!?]+")
APOSTROPHES = re.compile(r"['\u2019]")


def words_of(text: str) -> list[str]:
    return WORD.findall(text)


def essay_counts(texts: Iterable[str]) -> Counter:
    """How many texts each lowercased word occurs in."""
    counts: Counter = Counter()
    for text in texts:
        counts.update({w.lower() for w in words_of(text)})
    return counts


def vocabulary_of(texts: Iterable[str], min_essays: int = MIN_ESSAYS) -> list[str]:
    """The lowercased words of at least `min_essays` of the texts, sorted."""
    return sorted(w for w, n in essay_counts(texts).items() if n >= min_essays)


def text_stats(text: str, known) -> list[float]:
    """The STAT_NAMES of one text; `known(word)` says whether a lowercased word is in the vocabulary."""
    words = words_of(text)
    n = len(words)
    sentences = sum(1 for piece in SENTENCE_END.split(text) if WORD.search(piece))
    if n == 0:
        return [float(len(text)), 0.0, float(sentences), 0.0, 0.0, 0.0]
    lower = [w.lower() for w in words]
    letters = sum(len(APOSTROPHES.sub("", w)) for w in words)
    unknown = sum(1 for w in lower if not known(w))
    return [float(len(text)), float(n), float(sentences), letters / n, len(set(lower)) / n, unknown / n]


def stats_matrix(texts: Sequence[str], vocabulary: Iterable[str]) -> np.ndarray:
    """(texts, STAT_NAMES) for texts outside the vocabulary's essays: test texts."""
    vocab = frozenset(vocabulary)
    return np.array([text_stats(t, vocab.__contains__) for t in texts], dtype=np.float64).reshape(-1, len(STAT_NAMES))


def leave_one_out_stats(texts: Sequence[str], min_essays: int = MIN_ESSAYS) -> tuple[np.ndarray, list[str]]:
    """(texts, STAT_NAMES) for the texts the vocabulary is built from, each measured against
    the vocabulary of the others (a word of this text is known when at least `min_essays`
    other texts have it), and the vocabulary of them all."""
    counts = essay_counts(texts)
    rows = [text_stats(t, lambda w: counts[w] - 1 >= min_essays) for t in texts]
    vocabulary = sorted(w for w, n in counts.items() if n >= min_essays)
    return np.array(rows, dtype=np.float64).reshape(-1, len(STAT_NAMES)), vocabulary
