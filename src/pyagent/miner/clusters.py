"""Clusters of failure signatures: embedded with all-MiniLM-L6-v2, grouped by HDBSCAN, described.

HDBSCAN (scikit-learn's) finds groups of any shape and says which signatures belong to none
(noise) instead of forcing them into a group. Each cluster is described by its size, the
signatures nearest its centre (its representatives), what its attempts cost, and a label: the
symptoms over-represented in it against all signatures (a class-based TF-IDF over symptoms).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pyagent.miner.signatures import Signature

REPRESENTATIVES = 3
LABEL_SYMPTOMS = 3


@dataclass(frozen=True)
class Cluster:
    """A group of signatures that failed alike."""

    id: int
    label: str
    members: tuple[Signature, ...]
    representatives: tuple[str, ...]  # keys of the members nearest the centre
    symptoms: tuple[tuple[str, float], ...]  # over-represented symptoms and their share in it

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.members)

    @property
    def wall_s(self) -> float:
        return sum(s.wall_s for s in self.members)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, "size": self.size,
                "representatives": list(self.representatives),
                "symptoms": [{"symptom": s, "share": share} for s, share in self.symptoms],
                "tokens": self.tokens, "wall_s": self.wall_s,
                "steps": dict(Counter(f"{s.step or '-'} by {s.agent or '-'}"
                                      for s in self.members)),
                "families": dict(Counter(s.family or "-" for s in self.members)),
                "members": [s.key for s in self.members]}


def embed(signatures: Sequence[Signature], embedder: Any = None) -> np.ndarray:
    """Unit-length all-MiniLM-L6-v2 embeddings of the signatures' texts."""
    from pyagent.fleet.detector import Embedder

    return (embedder or Embedder()).sentences([s.text() for s in signatures])


def cluster(signatures: Sequence[Signature], embeddings: np.ndarray,
            min_size: int = 3) -> tuple[list[Cluster], list[Signature]]:
    """The clusters of `signatures` (largest first) and the signatures in none (noise).
    Fewer signatures than `min_size` make no cluster."""
    if len(signatures) < max(min_size, 2):
        return [], list(signatures)
    from sklearn.cluster import HDBSCAN

    labels = HDBSCAN(min_cluster_size=max(min_size, 2), allow_single_cluster=True,
                     copy=True).fit_predict(embeddings)
    groups = [np.flatnonzero(labels == label) for label in sorted(set(labels) - {-1})]
    groups.sort(key=lambda g: (-len(g), int(g[0])))
    clusters = [_describe(index, [signatures[i] for i in group], embeddings[group], signatures)
                for index, group in enumerate(groups)]
    noise = [signatures[i] for i in np.flatnonzero(labels == -1)]
    return clusters, noise


def _describe(index: int, members: list[Signature], vectors: np.ndarray,
              everyone: Sequence[Signature]) -> Cluster:
    centre = vectors.mean(axis=0)
    nearest = np.argsort(-(vectors @ centre), kind="stable")[:REPRESENTATIVES]
    symptoms = over_represented(members, everyone)
    label = "; ".join(s for s, _ in symptoms[:LABEL_SYMPTOMS]) or "no shared symptom"
    return Cluster(index, label, tuple(members), tuple(members[i].key for i in nearest),
                   tuple(symptoms))


def over_represented(members: Sequence[Signature],
                     everyone: Sequence[Signature]) -> list[tuple[str, float]]:
    """Symptoms of `members` held by at least half of them, most distinctive first: share in the
    cluster times the log of how much rarer they are overall (class-based TF-IDF)."""
    inside = Counter(s for m in members for s in set(m.symptoms))
    overall = Counter(s for m in everyone for s in set(m.symptoms))
    scored = []
    for symptom, count in inside.items():
        share = count / len(members)
        if share >= 0.5:
            rarity = math.log(1 + len(everyone) / overall[symptom])
            scored.append((share * rarity, symptom, share))
    scored.sort(key=lambda t: (-t[0], t[1]))
    return [(symptom, share) for _, symptom, share in scored]
