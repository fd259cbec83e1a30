"""A copy: one feature learned twice, at two levels (design §5).

A link c -> p is a copy when the decoder rows point the same way, cos(d_c, d_p) >=
COPY_COSINE, *and* the two fire on nearly the same tokens, Jaccard = #(c and p) /
#(c or p) >= COPY_JACCARD. Both are needed: a child whose direction is its parent's plus a
small offset has a high cosine but fires on a subset (low Jaccard); two features that
always fire together with unrelated directions are not one feature. The measures
(hsae.evaluation.metrics) count copies with this rule and the conditional link rule
(hsae.method.hierarchy) refuses them with it.
"""

from __future__ import annotations

from torch import Tensor

COPY_COSINE = 0.9
COPY_JACCARD = 0.8


def jaccard(both: Tensor, n_child: Tensor, n_parent: Tensor) -> Tensor:
    """#(c and p) / #(c or p) from counts (broadcasting), 0 where neither fires."""
    either = n_child + n_parent - both
    return both / either.clamp(min=1e-12) * (either > 0)


def is_copy(cosine: Tensor, both: Tensor, n_child: Tensor, n_parent: Tensor) -> Tensor:
    """The copy rule on decoder cosines and firing counts (any broadcastable shapes)."""
    return (cosine >= COPY_COSINE) & (jaccard(both, n_child, n_parent) >= COPY_JACCARD)
