"""The one classification rule of every suite: cosine similarity to frozen per-class head rows.

    logits = scale · normalize(features) @ normalize(head).T

`head` is [classes, dim]; `features` are the encoder's outputs [n, dim]. It is the rule of CLIP's
zero-shot heads, and every place that classifies uses this function: the suites' evaluation
(`tatr.suites.evaluation`, scale 1: the argmax does not depend on the scale), the builds' fine-tunes
and build-time accuracies, the exemplar gradients' loss (`tatr.core.gradients`) and AdaMerging's
entropy (`tatr.core.adamerging`). It lives in the core because the core's losses need it and the
core may not import the suites.

`unit_head=True` uses the head's rows as given, for a head that is already normalised (a saved head,
or one normalised once before a loop over batches): normalising a unit row again may change its last
bit, so the callers that never did it keep not doing it, and every built byte stays as it was.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def unit_rows(t: Tensor) -> Tensor:
    """Each row divided by its L2 norm (`F.normalize` over the last dimension)."""
    return F.normalize(t, dim=-1)


def cosine_logits(features: Tensor, head: Tensor, scale: float = 1.0, *, unit_head: bool = False) -> Tensor:
    """`scale · normalize(features) @ normalize(head).T` ([n, classes]); `unit_head`: the rows are used as given."""
    rows = head if unit_head else unit_rows(head)
    return scale * unit_rows(features) @ rows.T
