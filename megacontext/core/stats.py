"""Bootstrap confidence intervals over evaluation units (windows), for statistics of column means.

Every statistic in our benchmarks is a function of per-unit means (mean NLL of a variant, a difference
of two such means, or a ratio of differences such as gap recovered). So the bootstrap here resamples
*units jointly*: one index draw per replicate is applied to all columns, which keeps the pairing
between variants measured on the same window (a paired design: window difficulty cancels in
differences and ratios). Intervals are percentile intervals of the replicated statistic.

Windows cut from the same document are correlated (they may even overlap), so a unit-level bootstrap
understates uncertainty when a domain has few documents. Pass ``groups`` (one label per unit, e.g. the
document) to resample whole groups instead: a replicate draws groups with replacement and its mean is
the pooled mean of all units in the drawn groups (a cluster bootstrap).

Invariants
- Deterministic given ``seed``; the same seed resamples the same units for every column.
- Constant columns give degenerate intervals (``lo == value == hi``).
- A statistic that is undefined on a replicate (division by zero) yields NaN there; NaN replicates are
  dropped and counted in ``Estimate.n_invalid`` instead of silently widening or narrowing the interval.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

_CHUNK_ELEMS = 8_000_000  # bound on replicate x unit x column elements held at once


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a (1 - alpha) bootstrap interval over ``n`` units."""

    value: float
    lo: float
    hi: float
    n: int
    n_invalid: int = 0

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def format(self, digits: int = 3) -> str:
        if not np.isfinite(self.value):
            return "n/a"
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


def _as_matrix(columns: Mapping[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    if not columns:
        raise ValueError("bootstrap needs at least one column, got none")
    names = list(columns)
    arrays = [np.asarray(columns[k], dtype=np.float64).reshape(-1) for k in names]
    sizes = {k: a.shape[0] for k, a in zip(names, arrays, strict=True)}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"bootstrap columns must have one value per unit each; got sizes {sizes}")
    if arrays[0].shape[0] == 0:
        raise ValueError("bootstrap needs at least one unit, got 0")
    return names, np.stack(arrays, axis=1)  # [N, C]


def _group_sums(x: np.ndarray, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-group column sums [G, C] and unit counts [G] (each unit its own group when groups is None)."""
    if groups is None:
        return x, np.ones(x.shape[0])
    groups = np.asarray(groups).reshape(-1)
    if groups.shape[0] != x.shape[0]:
        raise ValueError(f"groups has {groups.shape[0]} labels, expected one per unit ({x.shape[0]})")
    _, inv = np.unique(groups, return_inverse=True)
    sums = np.zeros((int(inv.max()) + 1, x.shape[1]))
    np.add.at(sums, inv, x)
    return sums, np.bincount(inv).astype(np.float64)


def resampled_means(columns: Mapping[str, np.ndarray], n_boot: int = 2000, seed: int = 0,
                    groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Column means over ``n_boot`` joint resamples of the units (or of whole groups): {name: [n_boot]}."""
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot} must be >= 1")
    names, x = _as_matrix(columns)
    sums, counts = _group_sums(x, groups)  # [G, C], [G]
    g, c = sums.shape
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMS // (g * c))
    out = np.empty((n_boot, c))
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, g, size=(stop - start, g))  # [b, G]: one draw shared by all columns
        out[start:stop] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)[:, None]  # [b, C]
    return {k: out[:, i] for i, k in enumerate(names)}


def bootstrap(columns: Mapping[str, np.ndarray], statistic: Callable[[Mapping[str, np.ndarray]], np.ndarray],
              n_boot: int = 2000, alpha: float = 0.05, seed: int = 0, groups: np.ndarray | None = None) -> Estimate:
    """Estimate ``statistic(means)`` with a percentile interval.

    ``statistic`` receives a mapping name -> mean and must work elementwise on numpy arrays, because it
    is called once on the full-sample means (0-d) and once, vectorised, on all replicates ([n_boot])."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha} must lie in (0, 1)")
    names, x = _as_matrix(columns)
    full = {k: x[:, i].mean() for i, k in enumerate(names)}
    with np.errstate(divide="ignore", invalid="ignore"):
        value = float(statistic(full))
        reps = np.asarray(statistic(resampled_means(columns, n_boot, seed, groups)), dtype=np.float64).reshape(-1)
    finite = reps[np.isfinite(reps)]
    n_invalid = int(reps.size - finite.size)
    if finite.size == 0:
        return Estimate(value, float("nan"), float("nan"), x.shape[0], n_invalid)
    lo, hi = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return Estimate(value, float(lo), float(hi), x.shape[0], n_invalid)


def mean_ci(x: np.ndarray, **kw) -> Estimate:
    """Mean of one column with its interval."""
    return bootstrap({"x": x}, lambda m: m["x"], **kw)


def diff_ci(a: np.ndarray, b: np.ndarray, **kw) -> Estimate:
    """Paired difference of means, mean(a) - mean(b), units resampled jointly."""
    return bootstrap({"a": a, "b": b}, lambda m: m["a"] - m["b"], **kw)


def gap_recovered(lower: np.ndarray, candidate: np.ndarray, upper: np.ndarray, **kw) -> Estimate:
    """Share of the gap between a lower and an upper reference that ``candidate`` closes, as a ratio of
    means: (mean(lower) - mean(candidate)) / (mean(lower) - mean(upper)).

    For losses: ``lower`` is the worse reference (e.g. NLL with the context dropped) and ``upper`` the
    better one (full raw context); 1 means the candidate matches the upper reference, 0 the lower."""
    return bootstrap({"lo": lower, "c": candidate, "up": upper},
                     lambda m: (m["lo"] - m["c"]) / (m["lo"] - m["up"]), **kw)
