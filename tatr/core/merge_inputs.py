"""The merge's numbers and λ_neg, checked at every door (API, `tatr merge`, configs) before any work.

Why a module of its own: the API, the CLI and the config models all refuse the same values with the
same one line, and none of them should need the streaming merge to do it.
"""

from __future__ import annotations

import math
import numbers

from tatr.core.components import check_lam_neg
from tatr.core.errors import TatrError
from tatr.core.methods import MergeMethod
from tatr.core.options import get_option
from tatr.core.trust_region import check_q


def check_lam_neg_method(method: MergeMethod, components: object) -> None:
    """λ_neg needs components with negative and another part, and a method that sums the parts:
    with a sign election the negative part's own scale would change the elected signs."""
    check_lam_neg(components)  # type: ignore[arg-type]
    if method.weights is not None:
        raise TatrError("lam_neg's two-part merge sums the parts unweighted; it does not take per-task weights")
    if method.elect_sign:
        raise TatrError(
            f"lam_neg needs a method that sums the task vectors without a sign election (e.g. ta, dare, breadcrumbs); "
            f"{method.name} elects signs over the parts together"
        )


def check_numbers(
    q: float | None = None, lam: float | None = None, ties_k: float | None = None, lam_neg: float | None = None
) -> None:
    """Refuse a bad q, λ, λ_neg or TIES k at the door, with one line naming the value (q's range is
    `tatr.core.trust_region.check_q`'s, k's its declaration's: `tatr.core.options.Option.check`)."""
    if q is not None:
        check_q(q)
    if lam is not None and not (_real(lam) and math.isfinite(float(lam))):
        raise TatrError(f"λ (lam) must be a finite number (negative is allowed), got {lam!r}")
    if lam_neg is not None and not (_real(lam_neg) and math.isfinite(float(lam_neg))):
        raise TatrError(f"λ_neg (lam_neg) must be a finite number (negative is allowed), got {lam_neg!r}")
    if ties_k is not None:
        get_option("ties_k").check(ties_k)


def _real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
