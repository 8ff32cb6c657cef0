"""Group-relative advantages, shared by every algorithm (reference doc §5).

DanceGRPO (``--use_group``): for each group of G samples of one prompt and each reward k,

    A_k,i = clip( (r_k,i - mean_g(r_k)) / (std_g(r_k) + 1e-8), -c, c )

with the unbiased std (torch's default) and c = adv_clip_max = 5. Each reward gets its own
normalised advantage so no reward's scale dominates; the loss weights them (§5.3). A group whose
rewards are all equal gets A = 0 (the numerator is 0), so it contributes no gradient (§5.5).

Best-of-N (§5.4): rank a group by the combined advantage sum_k w_k A_k, keep the top n/2 and the
bottom n/2, shuffle them, and train on those only; advantages are *not* renormalised afterwards.

:func:`build_batch` is the whole path from a step's scored groups to what the learner trains, as one
pure function: missing scores (``scoring.on_failure``), the combination of rewards, the advantages,
best-of-N, and the counts the metrics show.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from raygrpo.config import Config
from raygrpo.contracts import ScoredGroup, TrainGroup
from raygrpo.errors import RunAborted

logger = logging.getLogger(__name__)


def group_advantages(
    rewards: np.ndarray, adv_clip_max: float, eps: float = 1e-8, ddof: int = 1, std: np.ndarray | None = None
) -> np.ndarray:
    """Per-reward group-normalised, clipped advantages.

    Args:
        rewards: ``[K, G]`` raw scores, one row per reward, one column per group member.
        adv_clip_max: advantages are clamped to ``[-adv_clip_max, adv_clip_max]``.
        eps: added to the std: DanceGRPO 1e-8, Flow-GRPO/DGPO 1e-4.
        ddof: 1 for the unbiased std (DanceGRPO, torch's default), 0 for the population std (numpy, Flow-GRPO/DGPO).
        std: ``[K, 1]`` std to divide by instead of the group's own (Flow-GRPO's ``global_std``, :func:`global_std`).

    Returns:
        ``[K, G]`` float32 advantages.
    """
    rewards = np.asarray(rewards, dtype=np.float64)  # [K, G]
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [K, G] with G >= 2, got shape {rewards.shape}")
    mean = rewards.mean(axis=1, keepdims=True)  # [K, 1]
    if std is None:
        std = rewards.std(axis=1, ddof=ddof, keepdims=True)  # [K, 1]
    advantages = (rewards - mean) / (std + eps)  # [K, G]
    # The mean of equal floats can miss them by an ulp; an all-equal group must give exactly 0.
    advantages[np.ptp(rewards, axis=1) == 0] = 0.0
    return np.clip(advantages, -adv_clip_max, adv_clip_max).astype(np.float32)


def global_std(rewards: list[np.ndarray], ddof: int = 0) -> np.ndarray:
    """``[K, 1]`` std of each reward over every group of the step (list of ``[K, G]``)."""
    return np.concatenate(rewards, axis=1).std(axis=1, ddof=ddof, keepdims=True)


def best_of_n_members(advantages: np.ndarray, weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the top n/2 and bottom n/2 members by ``sum_k w_k A_k``, shuffled. Shape ``[n]``."""
    group_size = advantages.shape[1]
    if n % 2 or not 2 <= n <= group_size:
        raise ValueError(f"best-of-N needs an even n in [2, G={group_size}], got {n}")
    combined = (np.asarray(weights, dtype=np.float64)[:, None] * advantages).sum(axis=0)  # [G]
    order = np.argsort(combined, kind="stable")  # ascending
    chosen = np.concatenate([order[-(n // 2) :], order[: n // 2]])  # [n]: top then bottom
    return rng.permutation(chosen).astype(np.int64)


def advantage_statistics(advantages: list[np.ndarray], members: list[np.ndarray], names: list[str]) -> dict[str, float]:
    """``advantage/<name>/{mean,std,min,max}`` over the trained members of a step's groups.

    ``advantages``: per group ``[K, G]``; ``members``: per group the trained member indices; ``names``:
    the K rows' names. Without a trained member every value is NaN, so each step has the same keys.
    """
    trained = [a[:, m] for a, m in zip(advantages, members)]  # each [K, n]
    values = np.concatenate(trained, axis=1) if trained else np.zeros((len(names), 0))  # [K, N]
    stats = {}
    for name, row in zip(names, values.astype(np.float64)):
        for stat, fn in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max)):
            stats[f"advantage/{name}/{stat}"] = float(fn(row)) if row.size else float("nan")
    return stats


@dataclass
class StepBatch:
    """What one step trains, and what became of its groups' rewards."""

    groups: list[TrainGroup]  # whole groups to train, in the step's order
    rewards: np.ndarray  # [N, K] raw scores of the trained members' groups (every member), after on_failure
    stats: dict[str, float]  # rewards/<name>/{missing,retries,errors}, groups/{dropped,trained,zero_std}, advantage/...
    errors: dict[str, dict[str, int]] = field(default_factory=dict)  # reward name -> error message -> items this step


def build_batch(scored: list[ScoredGroup], config: Config, rng: np.random.Generator) -> StepBatch:
    """From scored groups to trained groups: ``scoring.on_failure``, advantages, best-of-N, and the counts.

    Raises :class:`RunAborted` when a reward reports a fatal error (a server that rejects the token) or
    when ``on_failure: abort`` meets a missing score.
    """
    rewards = config.rewards
    names = [r.name for r in rewards]
    weights = np.array([r.weight for r in rewards], np.float32)  # [K]
    stats = {f"rewards/{n}/{what}": 0.0 for n in names for what in ("missing", "retries", "errors")} | {"groups/dropped": 0.0}
    stats["groups/not_evaluated"] = 0.0
    errors: dict[str, dict[str, int]] = {}
    kept: list[tuple[ScoredGroup, np.ndarray]] = []
    for item in scored:
        if not item.evaluated:  # an offline pair trained without evaluation samples: nothing scored, nothing missing
            stats["groups/not_evaluated"] += 1
            kept.append((item, np.zeros((len(names), item.group.group_size), np.float32)))
            continue
        per_reward = [item.scores[n] for n in names]
        for s in per_reward:
            if s.fatal:
                raise RunAborted(s.fatal)  # names the reward already (Scores.fatal, from score_group)
            stats[f"rewards/{s.reward_name}/missing"] += float((~s.valid).sum())
            stats[f"rewards/{s.reward_name}/retries"] += float(s.retries)
            stats[f"rewards/{s.reward_name}/errors"] += float(s.failures)
            for e in s.errors:
                if e:
                    errors.setdefault(s.reward_name, {})[e] = errors.get(s.reward_name, {}).get(e, 0) + 1
        values = _apply_on_failure(item, per_reward, config.scoring.on_failure)
        if values is None:
            stats["groups/dropped"] += 1
            continue
        kept.append((item, values))
    groups = _advantages(kept, config, weights, rng)
    row_names = ["total"] if config.scoring.combine == "weighted_sum" else names
    stats.update(advantage_statistics([g.advantages for g in groups], [g.members for g in groups], row_names))
    stats["groups/trained"] = float(len(groups))
    evaluated = [(item, values) for item, values in kept if item.evaluated]
    stats["groups/zero_std"] = float(sum(int(np.all(values.std(axis=1) == 0)) for _, values in evaluated))
    raw = np.concatenate([values.T for _, values in evaluated]) if evaluated else np.zeros((0, len(names)), np.float32)  # [N, K]
    return StepBatch(groups, raw, stats, errors)


def _apply_on_failure(item: ScoredGroup, per_reward: list, policy: str) -> np.ndarray | None:
    """``[K, G]`` rewards of a group to train, or None when it is dropped."""
    if all(s.valid.all() for s in per_reward):
        return np.stack([s.values for s in per_reward]).astype(np.float32)
    group = item.group
    problems = {s.reward_name: sorted({e for e in s.errors if e}) for s in per_reward if not s.valid.all()}
    if policy == "abort":
        raise RunAborted(f"group {group.group_id} ({group.prompt[:80]!r}) has samples without a score: {problems} (scoring.on_failure=abort)")
    if policy == "group_min" and all(s.valid.any() for s in per_reward):
        # The lowest real score of the group: a failed sample can never get a positive advantage.
        logger.warning("group %d: samples without a score take their group's lowest score: %s", group.group_id, problems)
        return np.stack([np.where(s.valid, s.values, s.values[s.valid].min()) for s in per_reward]).astype(np.float32)
    logger.warning("dropping group %d: samples without a score %s", group.group_id, problems)
    return None


def _advantages(kept: list[tuple[ScoredGroup, np.ndarray]], config: Config, weights: np.ndarray, rng: np.random.Generator) -> list[TrainGroup]:
    """Group advantages in the configured combination; best-of-N picks the members to train."""
    algo = config.algorithm
    if config.scoring.combine == "weighted_sum":
        # Flow-GRPO: one reward, the weighted sum of the raw ones, normalised once.
        kept = [(item, (weights @ values)[None]) for item, values in kept]  # [1, G]
        weights = np.ones(1, np.float32)
    std = global_std([values for _, values in kept], algo.advantage_ddof) if algo.global_std and kept else None
    batch = []
    for item, values in kept:
        advantages = group_advantages(values, algo.adv_clip_max, algo.advantage_eps, algo.advantage_ddof, std)  # [K, G]
        if algo.best_of_n:
            members = best_of_n_members(advantages, weights, algo.best_of_n, rng)
        else:
            members = np.arange(algo.group_size, dtype=np.int64)
        batch.append(TrainGroup(item.rollout, item.group.group_id, advantages, weights, members))
    return batch
