"""The guard's rules: pure functions of the history of guard rounds (no I/O), so they are tested on hand-made histories.

A rule (``guard.rules[i]``, raygrpo/config.py GuardRuleConfig) watches one signal ``s`` and names a trained signal
``r`` (``rising``, default ``reward/total``). At round ``n`` its reference round ``k`` is the round ``<= n`` where
``s`` was highest (``reference: best``; the earliest on ties) or the first round (``reference: first``). It fires when

    drop = s_k - s_n  >  threshold   and   r_n > r_k

with ``threshold = max_drop``, or ``max_drop_fraction * |s_k|``: the watched signal fell by more than the
threshold while the trained reward rose (reward hacking), both measured on the same held-out prompts and noise.
A signal that is NaN in either round (a reward without any score, a diversity without pairs) never fires.

Of the rules that fire at a round the most severe action is taken: stop > rollback > warn. A rollback goes to the
best round by ``guard.rollback_score`` that has a checkpoint; with none, or after ``guard.max_rollbacks``, it stops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from raygrpo.config import GuardConfig, GuardRuleConfig

SEVERITY = {"none": 0, "warn": 1, "rollback": 2, "stop": 3}


@dataclass
class GuardRound:
    """One guard round: the step it followed, the policy version it sampled, every signal's value."""

    step: int
    policy_version: int
    signals: dict[str, float]
    checkpoint: str | None = None  # the rollback checkpoint saved at this round (relative to the run folder), if any


@dataclass(frozen=True)
class GuardEvent:
    """A rule that fired, with its evidence."""

    step: int
    rule: int  # index in guard.rules
    action: str  # the rule's action
    signal: str
    reference: str  # best | first
    reference_step: int
    reference_value: float
    value: float
    drop: float
    threshold: float
    rising: str
    rising_reference: float
    rising_value: float

    def describe(self) -> str:
        return (
            f"guard rule {self.rule} ({self.action}) at step {self.step}: {self.signal} fell from {self.reference_value:.4g} "
            f"({self.reference} round, step {self.reference_step}) to {self.value:.4g}, a drop of {self.drop:.4g} > "
            f"threshold {self.threshold:.4g}, while {self.rising} rose from {self.rising_reference:.4g} to {self.rising_value:.4g}"
        )


@dataclass
class Verdict:
    """What the guard decided at one round: the action, the rules that fired, and (rollback) where to."""

    action: str = "none"  # none | warn | rollback | stop
    events: list[GuardEvent] = field(default_factory=list)
    rollback_to: GuardRound | None = None
    note: str = ""  # why a rollback became a stop

    def message(self) -> str:
        lines = [e.describe() for e in self.events]
        if self.rollback_to is not None:
            target = self.rollback_to
            lines.append(f"rolling back to the guard round of step {target.step} (policy version {target.policy_version})")
        return "; ".join(lines + ([self.note] if self.note else []))


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def reference_round(history: list[GuardRound], signal: str, reference: str) -> GuardRound | None:
    """The round the fall of ``signal`` is measured from (see the module docstring); None without a finite value."""
    rounds = [r for r in history if _finite(r.signals.get(signal))]
    if not rounds:
        return None
    if reference == "first":
        return rounds[0]
    return max(rounds, key=lambda r: (r.signals[signal], -r.step))  # highest, the earliest on ties


def threshold(rule: GuardRuleConfig, reference_value: float) -> float:
    """The largest fall of the watched signal that ``rule`` tolerates from ``reference_value``."""
    return rule.max_drop if rule.max_drop is not None else rule.max_drop_fraction * abs(reference_value)


def check_rule(history: list[GuardRound], rule: GuardRuleConfig, index: int) -> GuardEvent | None:
    """The event of ``rule`` at the last round of ``history``, or None when it does not fire."""
    now = history[-1]
    ref = reference_round(history, rule.signal, rule.reference)
    if ref is None or ref is now:
        return None
    value, ref_value = now.signals.get(rule.signal), ref.signals[rule.signal]
    rising, rising_ref = now.signals.get(rule.rising), ref.signals.get(rule.rising)
    if not (_finite(value) and _finite(rising) and _finite(rising_ref)):
        return None
    drop, limit = ref_value - value, threshold(rule, ref_value)
    if drop <= limit or rising <= rising_ref:
        return None
    return GuardEvent(
        now.step, index, rule.action, rule.signal, rule.reference, ref.step, ref_value, value, drop, limit,
        rule.rising, rising_ref, rising,
    )  # fmt: skip


def rule_evidence(history: list[GuardRound], rules: list[GuardRuleConfig]) -> dict[str, float]:
    """Per rule, at the last round: its drop, threshold and whether it fired (metrics ``rule/<i>/...``), NaN when
    it cannot be measured yet."""
    out: dict[str, float] = {}
    now = history[-1]
    for i, rule in enumerate(rules):
        ref = reference_round(history, rule.signal, rule.reference)
        value = now.signals.get(rule.signal)
        measurable = ref is not None and _finite(value)
        out[f"rule/{i}/drop"] = ref.signals[rule.signal] - value if measurable else float("nan")
        out[f"rule/{i}/threshold"] = threshold(rule, ref.signals[rule.signal]) if measurable else float("nan")
        out[f"rule/{i}/fired"] = float(check_rule(history, rule, i) is not None)
    return out


def rollback_signal(settings: GuardConfig) -> str | None:
    """The signal whose best round is the rollback target (``guard.rollback_score``, else the first rollback rule's)."""
    if settings.rollback_score:
        return settings.rollback_score
    return next((r.signal for r in settings.rules if r.action == "rollback"), None)


def rollback_target(history: list[GuardRound], signal: str) -> GuardRound | None:
    """The best round by ``signal`` among those with a checkpoint (the earliest on ties), or None."""
    return reference_round([r for r in history if r.checkpoint], signal, "best")


def decide(history: list[GuardRound], settings: GuardConfig, rollbacks: int) -> Verdict:
    """The guard's verdict at the last round of ``history``, given the rollbacks done so far."""
    events = [e for i, rule in enumerate(settings.rules) if (e := check_rule(history, rule, i)) is not None]
    if not events:
        return Verdict()
    action = max((e.action for e in events), key=SEVERITY.__getitem__)
    verdict = Verdict(action, events)
    if action == "rollback":
        target = rollback_target(history, rollback_signal(settings))
        if rollbacks >= settings.max_rollbacks:
            verdict.action = "stop"
            verdict.note = f"stopping instead: guard.max_rollbacks={settings.max_rollbacks} rollback(s) already done"
        elif target is None or target is history[-1]:
            verdict.action = "stop"
            verdict.note = "stopping instead: no earlier guard round with a checkpoint is better by the rollback score"
        else:
            verdict.rollback_to = target
    return verdict
