"""Schedules: a QAT warm-up, then linear ramps of epsilon, lambda, rho (and kappa), and step-decayed learning rates.

Time is counted in optimizer steps ``t = epoch * steps_per_epoch + step``. With ``W = warmup_epochs *
steps_per_epoch`` and ``R = ramp_epochs * steps_per_epoch`` the ramp fraction is
``f(t) = clip((t - W) / R, 0, 1)`` (``f = 1`` after the warm-up when ``R = 0``); then

* ``eps(t) = f * eps``, ``lambda(t) = f * lam``, ``rho(t) = f * rho``,
* ``kappa(t) = 1 + f * (kappa_end - 1)`` (classic IBP: ``lambda(t) = 1 - kappa(t)``),
* ``beta(t) = 1 + f * (beta_end - 1)``, CROWN-IBP's weight of its linear bound against the interval bound,
* ``lr(epoch) = lr * gamma^(number of milestones <= epoch)`` (step decay).

Every value is a pure function of ``(epoch, step)``: nothing to save, so a resumed run sees the same values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ScheduleValues:
    eps: float
    kappa: float
    lam: float
    rho: float
    lr: float
    fraction: float
    beta: float = 1.0


def ramp_fraction(t: int, warmup_steps: int, ramp_steps: int) -> float:
    """``clip((t - warmup_steps) / ramp_steps, 0, 1)``; a step function at ``warmup_steps`` when ``ramp_steps = 0``."""
    if t < warmup_steps:
        return 0.0
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (t - warmup_steps) / ramp_steps)


def step_decay(lr: float, epoch: int, milestones: Sequence[int], gamma: float) -> float:
    """``lr * gamma^k`` with ``k`` the number of milestones ``<= epoch``."""
    return lr * gamma ** sum(1 for m in milestones if epoch >= m)


def schedule_values(epoch: int, step: int, steps_per_epoch: int, *, warmup_epochs: float, ramp_epochs: float,
                    eps: float, lam: float, rho: float, kappa_end: float, lr: float,
                    milestones: Sequence[int] = (), gamma: float = 0.1, ibp_mixing: bool = False,
                    start_epoch: float = 0.0, beta_end: float = 1.0) -> ScheduleValues:
    """The schedule at ``(epoch, step)``; ``start_epoch`` shifts the warm-up start (e.g. after float pre-training).

    ``ibp_mixing``: ``lambda = 1 - kappa`` (classic IBP) instead of ``f * lam``.
    """
    t = epoch * steps_per_epoch + step
    w = int(round((start_epoch + warmup_epochs) * steps_per_epoch))
    r = int(round(ramp_epochs * steps_per_epoch))
    f = ramp_fraction(t, w, r)
    kappa = 1.0 + f * (kappa_end - 1.0)
    lam_t = (1.0 - kappa) if ibp_mixing else f * lam
    return ScheduleValues(eps=f * eps, kappa=kappa, lam=lam_t, rho=f * rho,
                          lr=step_decay(lr, epoch, milestones, gamma), fraction=f, beta=1.0 + f * (beta_end - 1.0))
