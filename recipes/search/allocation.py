"""Allocation under a bit budget, as pure functions: the exact multiple-choice knapsack over
per-layer sensitivities, and the choice between the allocations of two scores."""

from __future__ import annotations

import warnings
from collections.abc import Sequence


def average_bits(sizes: Sequence[int], bits: Sequence[float]) -> float:
    """Σ bits·weights / Σ weights."""
    total = sum(sizes)
    return sum(n * b for n, b in zip(sizes, bits)) / total


def allocate(scores: Sequence[dict[str, float]], sizes: Sequence[int],
             bits: dict[str, float] | Sequence[dict[str, float]], budget_bits: float,
             fixed: dict[int, str] | None = None) -> list[str]:
    """The format per layer minimising Σ scores[l][f] with average weight bits ≤ ``budget_bits``.

    ``scores[l]`` maps the formats allowed for layer l to its (additive) cost, ``sizes[l]`` is its
    weight count, ``bits[f]`` the bits per weight of format f (or ``bits[l][f]``: per layer, as
    block scales make it); ``fixed`` pins layers to a format. An exact integer program (pulp/CBC,
    integer budget arithmetic). Raises ValueError when no assignment fits the budget.
    """
    import pulp

    fixed = dict(fixed or {})
    if len(scores) != len(sizes):
        raise ValueError(f"{len(scores)} score rows for {len(sizes)} layers")
    bits = [bits] * len(scores) if isinstance(bits, dict) else list(bits)
    total = sum(sizes)
    # integer coefficients: bits in units of 1/den so fractional bit widths stay exact
    den = 1
    while any(abs(bits[l][f] * den - round(bits[l][f] * den)) > 1e-9 for l, row in enumerate(scores) for f in row) \
            and den < 10**6:
        den *= 10
    capacity = int(budget_bits * den * total + 1e-6)
    lowest = sum(n * min(round(bits[l][f] * den) for f in (scores[l] if l not in fixed else [fixed[l]]))
                 for l, n in enumerate(sizes))
    if lowest > capacity:
        raise ValueError(f"budget {budget_bits} bits per weight is below the smallest the menu allows "
                         f"({lowest / den / total:.3f})")
    prob = pulp.LpProblem("mixed_precision", pulp.LpMinimize)
    x = {(l, f): prob.add_variable(f"x_{l}_{k}", cat="Binary")
         for l, row in enumerate(scores) for k, f in enumerate(row)}
    prob += pulp.lpSum(scores[l][f] * v for (l, f), v in x.items())
    for l, row in enumerate(scores):
        prob += pulp.lpSum(x[l, f] for f in row) == 1
        if l in fixed:
            prob += x[l, fixed[l]] == 1
    prob += pulp.lpSum(sizes[l] * round(bits[l][f] * den) * v for (l, f), v in x.items()) <= capacity
    with warnings.catch_warnings():
        # Workaround: PuLP 3.3 deprecates its bundled CBC for PuLP 4's `pulp[cbc]` + COIN_CMD; ModelOpt 0.47
        # pins plain pulp, so the bundled one is what exists. Remove when pulp >= 4 is required.
        warnings.simplefilter("ignore", DeprecationWarning)
        status = prob.solve(pulp.PULP_CBC_CMD(msg=False))
    if pulp.LpStatus[status] != "Optimal":
        raise ValueError(f"no per-layer allocation fits {budget_bits} bits per weight ({pulp.LpStatus[status]})")
    choice = [max(row, key=lambda f: x[l, f].value()) for l, row in enumerate(scores)]
    used = sum(sizes[l] * round(bits[l][f] * den) for l, f in enumerate(choice))
    if used > capacity:  # the solver's tolerance must never buy bits beyond the budget
        raise ValueError(f"allocation uses {used / den / total:.4f} > {budget_bits} bits per weight")
    return choice


SCORES = ("kl", "ctc")  # per-layer sensitivity scores an allocation can minimise
SCORE_CHOICES = ("auto", *SCORES)


def choose_score(candidates: dict[str, dict]) -> tuple[str, str]:
    """The verified allocation to keep: the lower WER on the calibration utterances
    (``candidates[score]["calib_wer"]``), whose transcripts neither score saw; a tie, or no such
    WER, goes to ``kl``, the fidelity objective. Not the dev WER: the CTC allocation is fitted to
    the dev transcripts, so its dev WER is optimistic (demo, 6.4 bits: dev 14.31 vs KL's 15.46, yet
    20.32 vs 19.83 on 600 held-out utterances). Returns the score and a one-line reason."""
    if not candidates:
        raise ValueError("no candidate allocation to choose from")
    if len(candidates) == 1:
        (only,) = candidates
        return only, f"--mixed-score {only}: the only candidate"
    if any(v.get("calib_wer") is None for v in candidates.values()):
        if "kl" in candidates:
            return "kl", "no calibration transcripts to compare on (dev WER favours the dev-fitted ctc): kl"
        raise ValueError("candidates without a calibration WER and no kl candidate")
    ranked = sorted(candidates, key=lambda k: (candidates[k]["calib_wer"], SCORES.index(k)))
    best, other = ranked[0], ranked[1]
    a, b = candidates[best]["calib_wer"], candidates[other]["calib_wer"]
    if a == b:
        return best, f"calibration-set WER tie ({a:.2f}): {best}, the fidelity objective"
    return best, f"lower WER on the calibration utterances: {best} {a:.2f} < {other} {b:.2f}"


