"""Typed, frozen settings passed as objects (never read from globals). One line of documentation per default."""

from __future__ import annotations

import os
from dataclasses import dataclass


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class SolverSettings:
    backend: str = "cpsat"          # cpsat | scip | highs | cbc | checked
    encoding: str = "range"         # range (compact integer) | onehot (QVIP's per-value binaries)
    time_limit: float = 60.0        # seconds for one solve
    threads: int = 0                # 0 = all cores
    seed: int = 0                   # solver random seed (determinism)
    watchdog: bool = True           # run back ends that overrun their limit (HiGHS, SCIP) in a child killed at it
    confirm: str = "auto"           # exact back ends that must confirm a floating-point solver's "infeasible":
    #                                 auto (CP-SAT for a third of the time, then checked; checked alone for
    #                                 programs with continuous variables) | checked | cpsat | none (then such a
    #                                 claim stays unknown / unconfirmed)

    @property
    def num_threads(self) -> int:
        return self.threads or default_threads()


@dataclass(frozen=True)
class VerifySettings:
    method: str = "portfolio"       # portfolio | attack | interval | symbolic | milp | bab
    timeout: float = 60.0           # seconds for one property, all stages together
    solver: SolverSettings = SolverSettings()  # the exact stage's back end
    attack_restarts: int = 8        # PGD restarts in the attack stage
    attack_steps: int = 40          # PGD steps per restart
    seed: int = 0                   # seed of attacks and random search
    fallback: str = "highs"         # back end that gets the rest of the exact stage when the first one times out
    #                                 ('' or the same back end: none; HiGHS proves near-tie robust instances CP-SAT
    #                                 does not: 6 gained, 2 lost over 21 benchmark rows, RESULTS.md)
    fallback_share: float = 0.7     # the fallback's share of the exact stage's time
    relax: str = "scip"             # MIP back end of the relaxed-input program tried first in the exact stage
    #                                 ('' : none; robust near-ties the full programs leave open, RESULTS.md)
    relax_share: float = 0.3        # the relaxed-input program's share of the exact stage's time
    reseed_rounds: int = 3          # extra attack rounds before the exact stage (seeds seed + 1000 + k, restarts
    #                                 targeting every disjunct; 0: none; 6 of 87 QVIP Table 3 unknowns refuted)
    reseed_share: float = 0.05      # the reseeded rounds' share of the property's budget, all rounds together
    optimize_share: float = 0.1     # share of the time left that the optimized (alpha-CROWN style) bounds may take
    #                                 before the exact stage (0: skip; chains of dense layers only)
    split_share: float = 0.2        # share of the time left that neuron-split branch and bound (qverify.neuron_bab)
    #                                 may take before the exact stage (0: skip; dense chains only; at 0.5 it took
    #                                 time the relaxed program needed on 2 of 100 QVIP P2-6 r = 4 instances, and
    #                                 its own proofs there took at most 8 s: RESULTS.md, issue 20 step 3)
