"""What the judge reads of one model: its links and its features' stored documents."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from torch import Tensor

from hsae.explore.contexts import ContextStore, Example, check_store_matches
from hsae.explore.judge_prompts import numbered
from hsae.trained import TrainedHSAE


@dataclass
class Forest:
    name: str
    parents: list[Tensor]
    """parents[l - 1][j]: the parent in level l - 1 of feature j of level l, or -1."""
    store: ContextStore
    n_top: int
    """Top documents shown per feature (appendix C: 10)."""
    n_sampled: int
    """Documents sampled in proportion to activation shown per feature (appendix C: 5)."""

    @classmethod
    def load(cls, name: str, model_dir: str, contexts: str, n_top: int, n_sampled: int) -> Forest:
        """A trained directory (or a run directory with model/) and its context store."""
        trained = TrainedHSAE.load(model_dir)
        store = ContextStore.load(contexts)
        check_store_matches(store, trained, contexts)
        return cls(name, trained.parents, store, n_top, n_sampled)

    @cached_property
    def live(self) -> list[Tensor]:
        """Per level, whether each feature has at least one stored context."""
        return [(lv.top_ids >= 0).flatten(1).any(1) for lv in self.store.levels]

    def edges(self) -> list[tuple[int, int, int]]:
        """(child level, child, parent) for every link whose two ends have contexts."""
        out = []
        for level, parent in enumerate(self.parents, start=1):
            ok = (parent >= 0) & self.live[level]
            ok &= self.live[level - 1][parent.clamp(min=0)]
            out += [(level, int(c), int(parent[c])) for c in ok.nonzero().flatten()]
        return out

    def documents(self, level: int, feature: int) -> tuple[list[Example], list[Example]]:
        """The feature's top and sampled documents, as many of each as a prompt shows."""
        top = self.store.examples(level, feature, "top")[: self.n_top]
        return top, self.store.examples(level, feature, "sample")[: self.n_sampled]

    def marked(self, level: int, feature: int) -> str:
        """All its shown documents, numbered, activating tokens as <<token>>."""
        top, sampled = self.documents(level, feature)
        return numbered([ex.marked() for ex in top + sampled])
