"""Attribution: modality Shapley values, within-modality Owen values, reports.

``explain(model, units, level=1|2, budget=..., masking="tokens", seed=...)`` is the one entry point; it returns
one :class:`Attribution` per unit.
"""

from explain.api import DEFAULT_BUDGET, LEVELS, MASKINGS, Attribution, GroupAttribution, explain

__all__ = ["DEFAULT_BUDGET", "LEVELS", "MASKINGS", "Attribution", "GroupAttribution", "explain"]
