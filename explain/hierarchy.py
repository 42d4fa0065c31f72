"""Owen values over modality → group: which image region, frequency band, or channel and time segment.

M modalities of a unit (the top-level players, ≤ 3) · G_m groups of modality m · k_m = |G_m| ·
R coalition rows evaluated · N tokens · D width

The game is the model's defect logit with some of the unit's tokens visible. Its players are nested: a
modality, and inside it groups of tokens (a block of the image's token grid, a run of spectrum or envelope band
tokens, a waveform time segment, a temperature channel's time segment). The Owen value of group g of modality m
is the expected marginal contribution of g when the modalities arrive in a random order and, when m arrives,
its groups arrive one by one in a random order::

    φ_g = Σ_{S ⊆ M∖{m}} |S|!(|M|−|S|−1)!/|M|! · Σ_{T ⊆ G_m∖{g}} |T|!(k_m−|T|−1)!/k_m! · (v(S ∪ T ∪ {g}) − v(S ∪ T))

where ``S ∪ T`` shows the modalities in S whole and, of m, only the groups in T. The groups of a modality add up
to that modality's Shapley value (the quotient game's), and all groups to ``v(all) − v(none)``.

The outer sum over S is always exact (at most 4 terms). The inner one is exact when the budget allows all
``2^k_m`` subsets; otherwise it is estimated from random orders of the groups (each order and its reverse,
which lowers the variance), walking each order's prefixes. Every order adds up to ``v(S ∪ G_m) − v(S)`` by
telescoping, so the groups of a modality still add up to its Shapley value exactly: only how the value is
shared between groups is estimated. Coalitions that repeat (the empty and the full one, shared prefixes) are
evaluated once; the budget counts distinct model evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

#: Method names of a modality's group values.
METHOD_OWEN_EXACT = "owen-exact"
METHOD_OWEN_PERMUTATION = "owen-permutation"

#: A coalition of the nested game: visible modality -> indices of its visible groups.
Coalition = Mapping[str, frozenset[int]]


@dataclass(frozen=True)
class Group:
    """One player inside a modality: a set of that modality's encoder tokens.

    Attributes:
        modality: the modality.
        name: human-readable, e.g. ``region rows 0-2, cols 3-5`` or ``spectrum 0-2500 Hz``.
        kind: the tokens' kind (``region``, ``spectrum``, ``envelope``, ``waveform``, ``series``).
        span: its extent: pixel box (y0, x0, y1, x1), frequency range (Hz), time range (s), or
            (channel, first sample, end sample).
        tokens: indices of its tokens within the modality's tokens.
    """

    modality: str
    name: str
    kind: str
    span: tuple[float, ...]
    tokens: tuple[int, ...]


def _runs(n: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into at most ``parts`` contiguous runs of near-equal length."""
    parts = max(1, min(parts, n))
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]


def groups_from_tokens(modality: str, infos: Sequence, *, max_regions: int = 16,
                       max_bands: int | Mapping[str, int] = 8, max_segments: int = 4) -> list[Group]:
    """Group a modality's tokens for attribution, from the encoder's token descriptions (``token_info()``).

    Image regions: the token grid in at most ``max_regions`` blocks (a square-ish grid of blocks). Spectrum and
    envelope bands: contiguous runs of band tokens, at most ``max_bands`` per kind. Waveform tokens: at most
    ``max_segments`` time segments. Series tokens: per channel, at most ``max_segments`` time segments.

    Args:
        modality: the modality the tokens belong to.
        infos: its tokens' :class:`~inspection.encoders.TokenInfo`, in token order.
        max_regions, max_segments: see above.
        max_bands: one limit for both band kinds, or per kind (``{"spectrum": 8, "envelope": 32}``; a kind left
            out keeps 8), e.g. to read the envelope spectrum at the model's own token resolution.

    Returns:
        Groups in token order; every token is in exactly one group.

    Raises:
        ValueError: a token kind this function does not know, or no tokens.
    """
    if not infos:
        raise ValueError(f"modality {modality} has no tokens to group")
    by_kind: dict[str, list[int]] = {}
    for i, info in enumerate(infos):
        by_kind.setdefault(info.kind, []).append(i)
    out: list[Group] = []
    for kind, idx in by_kind.items():
        spans = [tuple(float(x) for x in infos[i].span) for i in idx]
        if kind == "region":
            ys = sorted({s[0] for s in spans})
            xs = sorted({s[1] for s in spans})
            side = max(1, int(math.isqrt(max_regions)))
            for r0, r1 in _runs(len(ys), side):
                for c0, c1 in _runs(len(xs), side):
                    members = [i for i, s in zip(idx, spans, strict=True)
                               if ys.index(s[0]) in range(r0, r1) and xs.index(s[1]) in range(c0, c1)]
                    box = [spans[idx.index(i)] for i in members]
                    span = (min(b[0] for b in box), min(b[1] for b in box), max(b[2] for b in box),
                            max(b[3] for b in box))
                    name = (f"region rows {r0}-{r1 - 1}, cols {c0}-{c1 - 1} "
                            f"(y {span[0]:.0f}-{span[2]:.0f} px, x {span[1]:.0f}-{span[3]:.0f} px)")
                    out.append(Group(modality, name, kind, span, tuple(members)))
        elif kind in ("spectrum", "envelope", "waveform"):
            if kind == "waveform":
                limit = max_segments
            else:
                limit = max_bands.get(kind, 8) if isinstance(max_bands, Mapping) else max_bands
            unit = "s" if kind == "waveform" else "Hz"
            fmt = "{:.3f}" if kind == "waveform" else "{:.0f}"
            for a, b in _runs(len(idx), limit):
                lo, hi = spans[a][0], spans[b - 1][1]
                out.append(Group(modality, f"{kind} {fmt.format(lo)}-{fmt.format(hi)} {unit}", kind, (lo, hi),
                                 tuple(idx[a:b])))
        elif kind == "series":
            channels: dict[float, list[int]] = {}
            for j, s in enumerate(spans):
                channels.setdefault(s[0], []).append(j)
            for ch, js in channels.items():
                label = infos[idx[js[0]]].label.split(",")[0]
                for a, b in _runs(len(js), max_segments):
                    t0, t1 = spans[js[a]][1], spans[js[b - 1]][2]
                    out.append(Group(modality, f"{label}, samples {t0:.0f}-{t1:.0f}", kind, (ch, t0, t1),
                                     tuple(idx[j] for j in js[a:b])))
        else:
            raise ValueError(f"cannot group tokens of kind {kind!r} (modality {modality})")
    out.sort(key=lambda g: g.tokens[0])
    return out


# ------------------------------------------------------------------------------------------- the game
@dataclass(frozen=True)
class GroupValues:
    """Owen values of one modality's groups.

    Attributes:
        modality: the modality.
        phi: one value per group, in the groups' order (logit scale).
        shapley: the modality's Shapley value in the quotient game; ``sum(phi)`` equals it up to rounding.
        method: :data:`METHOD_OWEN_EXACT` or :data:`METHOD_OWEN_PERMUTATION`.
        orders: random orders of the groups used per outer coalition (0 when exact).
    """

    modality: str
    phi: tuple[float, ...]
    shapley: float
    method: str
    orders: int


def _weight(size: int, n: int) -> float:
    return math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)


def _key(coalition: Coalition) -> tuple:
    return tuple(sorted((m, tuple(sorted(g))) for m, g in coalition.items() if g))


def minimum_budget(sizes: Mapping[str, int]) -> int:
    """The smallest budget :func:`owen_values` takes for these group counts: one order of each modality's groups
    per coalition of the other modalities."""
    return sum(2 ** (len(sizes) - 1) * (k + 1) for k in sizes.values())


def owen_values(evaluate: Callable[[list[Coalition]], Sequence[float]], sizes: Mapping[str, int], *,
                budget: int, seed: int = 0, enumerate_when_possible: bool = True) -> tuple[dict[str, GroupValues], int]:
    """Owen values of every group of every modality of one unit.

    Args:
        evaluate: coalitions -> their values (one model call for the whole list). A coalition maps each visible
            modality to the indices of its visible groups; a modality not in it is hidden.
        sizes: modality -> number of its groups (the top-level players, in a fixed order).
        budget: most distinct coalitions to evaluate (at least enough for one order of each modality's groups:
            ``Σ_m 2^(|M|−1) · (k_m + 1)``); a modality whose every subset fits in its share is enumerated.
        seed: seeds the random orders (same seed, same values).
        enumerate_when_possible: enumerate a modality's subsets when they fit its share of the budget (False
            samples orders even then: for checking the estimator against enumeration).

    Returns:
        Per modality its :class:`GroupValues`, and the number of distinct coalitions evaluated.

    Raises:
        ValueError: no modality, a modality without groups, or a budget below the minimum.
    """
    players = list(sizes)
    if not players or any(k < 1 for k in sizes.values()):
        raise ValueError(f"need at least one modality, each with at least one group; got {dict(sizes)}")
    n = len(players)
    outer = 2 ** (n - 1)
    minimum = minimum_budget(sizes)
    if budget < minimum:
        raise ValueError(f"budget must be at least {minimum} evaluations for groups {dict(sizes)} "
                         f"(one order of each modality's groups per coalition of the other modalities); got {budget}")
    rng = np.random.default_rng(seed)
    share = budget // n
    plans: dict[str, tuple[str, int]] = {}
    for m in players:
        k = sizes[m]
        if enumerate_when_possible and outer * 2 ** k <= share:
            plans[m] = (METHOD_OWEN_EXACT, 0)
        else:
            orders = max(1, share // (outer * (k + 1)))
            plans[m] = (METHOD_OWEN_PERMUTATION, orders + (orders % 2) if orders > 1 else 1)

    full = {p: frozenset(range(sizes[p])) for p in players}
    wanted: dict[tuple, Coalition] = {}

    def want(coalition: Coalition) -> tuple:
        key = _key(coalition)
        wanted.setdefault(key, coalition)
        return key

    # the terms of every φ, as (weight, key with g, key without g)
    terms: dict[str, list[list[tuple[float, tuple, tuple]]]] = {}
    for m in players:
        k = sizes[m]
        others = [p for p in players if p != m]
        method, orders = plans[m]
        per_group: list[list[tuple[float, tuple, tuple]]] = [[] for _ in range(k)]
        for size in range(len(others) + 1):
            for s in combinations(others, size):
                w_outer = _weight(size, n)
                base = {p: full[p] for p in s}
                if method == METHOD_OWEN_EXACT:
                    for g in range(k):
                        rest = [x for x in range(k) if x != g]
                        for t_size in range(k):
                            w = w_outer * _weight(t_size, k)
                            for t in combinations(rest, t_size):
                                without = {**base, m: frozenset(t)}
                                with_g = {**base, m: frozenset(t) | {g}}
                                per_group[g].append((w, want(with_g), want(without)))
                else:
                    perms = []
                    for _ in range(max(1, orders // 2) if orders > 1 else 1):
                        order = rng.permutation(k).tolist()
                        perms.append(order)
                        if orders > 1:
                            perms.append(order[::-1])
                    for order in perms:
                        seen: frozenset[int] = frozenset()
                        for g in order:
                            without = {**base, m: seen}
                            seen = seen | {g}
                            per_group[g].append((w_outer / len(perms), want({**base, m: seen}), want(without)))
        terms[m] = per_group

    keys = list(wanted)
    values = dict(zip(keys, (float(v) for v in evaluate([wanted[k] for k in keys])), strict=True))
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"coalition values must be finite; {len(bad)} of {len(values)} are not")
    out: dict[str, GroupValues] = {}
    for m in players:
        phi = tuple(math.fsum(w * (values[a] - values[b]) for w, a, b in group) for group in terms[m])
        others = [p for p in players if p != m]
        shapley = math.fsum(
            _weight(size, n) * (values[_key({**{p: full[p] for p in s}, m: full[m]})]
                                - values[_key({p: full[p] for p in s})])
            for size in range(len(others) + 1) for s in combinations(others, size))
        method, orders = plans[m]
        out[m] = GroupValues(m, phi, shapley, method, orders)
    return out, len(values)
