"""Command intent of a transcript, to score what a robot would *do* with the ASR-LLM output.

Issue [3] asks for command-intent accuracy of the aligned path next to the cascade. The scorer
must treat both the same and measure the transcript, not a model, so it is deliberately simple
and home-made: TF-IDF bag-of-words centroids of our own training commands, cosine similarity, no
training beyond counting (scikit-learn is not installed and would add nothing here).
The test split's commands are unseen paraphrases, so this scorer is far from perfect even on the
reference text; `agreement` (same intent for hypothesis and reference) isolates what the
transcript changes, and `accuracy` on the references gives the scorer's own ceiling.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from .metrics import normalize_text

NO_INTENT = ""  # questions and other non-command text


class IntentMatcher:
    def __init__(self, examples: Iterable[tuple[str, str]]) -> None:
        """`examples`: (sentence, intent) pairs; intent '' for sentences that are not commands."""
        unique = {(normalize_text(t), i) for t, i in examples}
        unique = {(t, i) for t, i in unique if t}
        if not unique:
            raise ValueError("IntentMatcher needs at least one example sentence")
        df = Counter(w for t, _ in unique for w in set(t.split()))
        n = len(unique)
        self.idf = {w: math.log((n + 1) / (c + 1)) + 1 for w, c in df.items()}
        self.unseen_idf = math.log(n + 1) + 1
        centroids: dict[str, Counter] = defaultdict(Counter)
        for t, intent in unique:
            centroids[intent].update(self._vector(t))
        self.centroids = {i: (c, self._norm(c)) for i, c in centroids.items()}

    def _vector(self, words: str) -> dict[str, float]:
        return {w: k * self.idf.get(w, self.unseen_idf) for w, k in Counter(words.split()).items()}

    @staticmethod
    def _norm(v: dict[str, float]) -> float:
        return math.sqrt(sum(x * x for x in v.values())) or 1.0

    def __call__(self, text: str) -> str:
        v = self._vector(normalize_text(text))
        if not v:
            return NO_INTENT
        nv = self._norm(v)
        return max(sorted(self.centroids), key=lambda i: sum(x * self.centroids[i][0].get(w, 0.0) for w, x in v.items())
                   / (nv * self.centroids[i][1]))

    def accuracy(self, hyps: Sequence[str], intents: Sequence[str]) -> float | None:
        """Share of command utterances (intent != '') whose hypothesis maps to the labelled intent."""
        pairs = [(h, i) for h, i in zip(hyps, intents) if i != NO_INTENT]
        return sum(self(h) == i for h, i in pairs) / len(pairs) if pairs else None

    def agreement(self, hyps: Sequence[str], refs: Sequence[str], intents: Sequence[str]) -> float | None:
        """Share of command utterances whose hypothesis maps to the same intent as its reference text."""
        triples = [(h, r) for h, r, i in zip(hyps, refs, intents) if i != NO_INTENT]
        return sum(self(h) == self(r) for h, r in triples) / len(triples) if triples else None
