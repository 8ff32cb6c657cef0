"""Group-relative advantages, shared by every algorithm (reference doc §5).

DanceGRPO (``--use_group``): for each group of G samples of one prompt and each reward k,

    A_k,i = clip( (r_k,i - mean_g(r_k)) / (std_g(r_k) + 1e-8), -c, c )

with the unbiased std (torch's default) and c = adv_clip_max = 5. Each reward gets its own
normalised advantage so no reward's scale dominates; the loss weights them (§5.3). A group whose
rewards are all equal gets A = 0 (the numerator is 0), so it contributes no gradient (§5.5).

Best-of-N (§5.4): rank a group by the combined advantage sum_k w_k A_k, keep the top n/2 and the
bottom n/2, shuffle them, and train on those only; advantages are *not* renormalised afterwards.
"""

from __future__ import annotations

import numpy as np


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
