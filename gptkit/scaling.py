"""Scaling laws: the fits behind scaling.py. Runs are (parameters N, training tokens D, training FLOPs C,
final validation bits per byte L); two fits of them:

- Approach 2 (isoFLOP): per budget, a parabola of L in log N; its vertex is that budget's optimal N;
  then N_opt = k C^a across budgets.
- Approach 3 (parametric): L(N, D) = E + A / N^alpha + B / D^beta, fitted on the relative error (exactly,
  over a grid of exponents: the law is linear in E, A, B once they are fixed), with bootstrap intervals
  (runs resampled). Chinchilla minimised a Huber loss of log L with L-BFGS from a grid of starts; on a
  sweep of tens of runs the exact grid solve finds the same minimum without its local ones. Minimising
  L at fixed C = kappa N D (kappa: the recipe's FLOPs per token per parameter, as the toolkit counts
  them, attention included) gives N_opt = G C^(beta / (alpha + beta)) and D_opt = C / (kappa N_opt).
- Kaplan et al.'s form L(N, D) = (P / N^a + Q / D)^alpha_D (its terms interact), fitted the same way;
  `loo_error` says which form predicts a left-out run better.

numpy only."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass
class Law:
    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def __call__(self, n: float, d: float) -> float:
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    def optimum(self, c: float, kappa: float) -> tuple[float, float]:
        """(N_opt, D_opt) at C FLOPs, C = kappa N D."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B * kappa ** b)) ** (1 / (a + b))
        n = g * c ** (b / (a + b))
        return n, c / (kappa * n)

    @property
    def exponents(self) -> tuple[float, float]:
        """(a, b): N_opt ~ C^a, D_opt ~ C^b."""
        return self.beta / (self.alpha + self.beta), self.alpha / (self.alpha + self.beta)


def fit_law(n: list[float], d: list[float], loss: list[float]) -> Law:
    """L(N, D) = E + A / N^alpha + B / D^beta by least squares on the relative error (what a fit of
    log L minimises, to first order): for fixed exponents the law is linear in E, A and B, so every
    (alpha, beta) of a grid is solved exactly at once (variable projection), then a finer grid around
    the best; solutions with a negative E, A or B are not laws and are skipped."""
    import numpy as np

    N, D, L = (np.asarray(v, dtype=np.float64) for v in (n, d, loss))
    best = _grid_fit(N, D, L, np.arange(0.02, 1.5, 0.01), np.arange(0.02, 1.5, 0.01))
    if best is None:
        raise ValueError("no exponents give a law with positive E, A and B")
    fine = lambda x: np.arange(max(0.005, x - 0.015), x + 0.015, 0.0005)  # noqa: E731
    return _grid_fit(N, D, L, fine(best.alpha), fine(best.beta)) or best


def _grid_fit(N, D, L, alphas, betas) -> Law | None:
    """The best law on a grid of exponents: for each (alpha, beta) the least-squares E, A, B (or, when
    E would be negative, E = 0 and A, B), A and B positive."""
    import numpy as np

    w = 1.0 / L
    P = N[None, :] ** -alphas[:, None] * w  # (a, k): the rows' A column, weighted
    Q = D[None, :] ** -betas[:, None] * w  # (b, k)
    one = np.broadcast_to(w, (len(alphas), len(betas), len(L)))
    X = np.stack([one, np.broadcast_to(P[:, None, :], one.shape), np.broadcast_to(Q[None, :, :], one.shape)], -1)
    best = None
    for cols in ((0, 1, 2), (1, 2)):  # with E, and with E = 0
        coef, sse = _solve(X[..., cols])
        if len(cols) == 2:
            coef = np.concatenate([np.zeros_like(coef[..., :1]), coef], -1)
        sse[(coef[..., 1:] <= 0).any(-1) | (coef[..., 0] < 0)] = np.inf
        i, j = np.unravel_index(np.argmin(sse), sse.shape)
        if np.isfinite(sse[i, j]) and (best is None or sse[i, j] < best[0]):
            E, A, B = coef[i, j]
            best = (sse[i, j], Law(float(E), float(A), float(alphas[i]), float(B), float(betas[j])))
    return best[1] if best else None


def _solve(X):
    """Least squares of X c = 1 for every grid cell at once: (coefficients, squared error)."""
    import numpy as np

    scale = np.sqrt((X ** 2).sum(axis=2, keepdims=True)) + 1e-300  # columns of unit norm: N^-alpha is tiny
    Xn = X / scale
    G = np.einsum("abki,abkj->abij", Xn, Xn)
    rhs = Xn.sum(axis=2)  # the target is 1 in every row (L / L)
    G = G + 1e-12 * np.eye(G.shape[-1])  # a singular cell solves to something finite, not an error
    coef = np.linalg.solve(G, rhs[..., None])[..., 0] / scale[:, :, 0, :]
    sse = ((np.einsum("abki,abi->abk", X, coef) - 1.0) ** 2).sum(-1)
    return coef, sse


@dataclass
class KaplanLaw:
    """Kaplan et al. (2020), eq. 1.5: L(N, D) = (P / N^a + Q / D)^alpha_d, with P = Nc^a, Q = Dc and
    a = alpha_N / alpha_D. Unlike E + A/N^alpha + B/D^beta its terms interact: the data a model can use
    grows with its size, so a small model stops gaining from more tokens sooner."""
    P: float
    a: float
    Q: float
    alpha_d: float

    def __call__(self, n: float, d: float) -> float:
        return (self.P / n ** self.a + self.Q / d) ** self.alpha_d

    def optimum(self, c: float, kappa: float) -> tuple[float, float]:
        """(N_opt, D_opt) at C = kappa N D: the minimum of P N^-a + Q kappa N / C."""
        n = (self.a * self.P * c / (self.Q * kappa)) ** (1 / (1 + self.a))
        return n, c / (kappa * n)

    @property
    def exponents(self) -> tuple[float, float]:
        return 1 / (1 + self.a), self.a / (1 + self.a)


def fit_kaplan(n: list[float], d: list[float], loss: list[float]) -> KaplanLaw:
    """Kaplan's law by least squares on the relative error: for fixed (a, alpha_d), L^(1/alpha_d) is linear
    in P and Q, solved exactly for every cell of a grid of exponents (weighted so that its error is
    L's relative error to first order), then finer grids around the best."""
    import numpy as np

    N, D, L = (np.asarray(v, dtype=np.float64) for v in (n, d, loss))
    best = _kaplan_grid(N, D, L, np.arange(0.05, 3.0, 0.02), np.arange(0.02, 1.5, 0.01))
    if best is None:
        raise ValueError("no exponents give a Kaplan law with positive P and Q")
    for step in (0.002, 0.0005):  # a and alpha_d trade off along a ridge: finer grids, each re-centred
        best = _kaplan_grid(N, D, L, np.arange(max(0.01, best.a - 30 * step), best.a + 30 * step, step),
                            np.arange(max(0.005, best.alpha_d - 8 * step), best.alpha_d + 8 * step, step / 4)) or best
    return best


def _kaplan_grid(N, D, L, As, alphas) -> KaplanLaw | None:
    import numpy as np

    Y = L[None, :] ** (1 / alphas[:, None])  # (g, k): L^(1/alpha_d)
    P = N[None, :] ** -As[:, None]  # (h, k)
    shape = (len(alphas), len(As), len(L))
    X = np.stack([np.broadcast_to(P[None] / Y[:, None], shape), np.broadcast_to((1 / D)[None, None] / Y[:, None], shape)], -1)
    coef, _ = _solve(X)
    pred = np.einsum("abki,abi->abk", X * Y[:, None, :, None], coef).clip(min=1e-12) ** alphas[:, None, None]
    sse = (((pred - L) / L) ** 2).sum(-1)
    sse[(coef <= 0).any(-1)] = np.inf
    i, j = np.unravel_index(np.argmin(sse), sse.shape)
    if not np.isfinite(sse[i, j]):
        return None
    return KaplanLaw(float(coef[i, j, 0]), float(As[j]), float(coef[i, j, 1]), float(alphas[i]))


FORMS = {"chinchilla": fit_law, "kaplan": fit_kaplan}  # L(N, D) = E + A/N^alpha + B/D^beta; Kaplan's eq. 1.5


def loo_error(fit, n: list[float], d: list[float], loss: list[float]) -> float:
    """Leave-one-out: the mean |relative error| of each run's loss predicted by the law fitted on the others
    (how well a form predicts a run it has not seen; inf when a fit fails)."""
    errors = []
    for i in range(len(n)):
        keep = [j for j in range(len(n)) if j != i]
        try:
            law = fit([n[j] for j in keep], [d[j] for j in keep], [loss[j] for j in keep])
        except ValueError:
            return math.inf
        errors.append(abs(law(n[i], d[i]) - loss[i]) / loss[i])
    return sum(errors) / len(errors)


def bootstrap(n: list[float], d: list[float], loss: list[float], rounds: int = 100, seed: int = 0,
              fit=None) -> list:
    """Fits of the runs resampled with replacement (a sample with fewer than 5 distinct runs is drawn again)."""
    rng, laws, k = random.Random(seed), [], len(n)
    while len(laws) < rounds:
        idx = [rng.randrange(k) for _ in range(k)]
        if len(set(idx)) < min(5, k):
            continue
        try:
            laws.append((fit or fit_law)([n[i] for i in idx], [d[i] for i in idx], [loss[i] for i in idx]))
        except ValueError:
            continue
    return laws


def interval(values: list[float], lo: float = 0.05, hi: float = 0.95) -> tuple[float, float]:
    v = sorted(values)
    return v[int(lo * (len(v) - 1))], v[int(hi * (len(v) - 1))]


def isoflop(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(N_opt, L_opt) of one budget's (N, L) points: the vertex of the parabola in log N through them
    (least squares), or None when it opens downwards or lies outside the points' range."""
    import numpy as np

    if len(points) < 3:
        return None
    x = np.log([p[0] for p in points])
    a, b, c = np.polyfit(x, [p[1] for p in points], 2)
    if a <= 0:
        return None
    v = -b / (2 * a)
    if not x.min() <= v <= x.max():
        return None
    return float(math.exp(v)), float(c - b * b / (4 * a))


def power_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(k, a) of y = k x^a, a least-squares line in log-log."""
    import numpy as np

    a, logk = np.polyfit(np.log(xs), np.log(ys), 1)
    return float(math.exp(logk)), float(a)
