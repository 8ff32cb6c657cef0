"""The reward-hacking guard: a round of held-out evaluation every ``guard.every`` steps, and what its rules decide.

One round, after step ``t``'s update and weight sync (raygrpo/controller.py calls :meth:`Guard.run_round`):

1. sample the held-out prompts (``guard.prompts``, a set of their own; for image editing and image-to-video a
   ``guard.prompt_file`` with an image per prompt, which each round encodes with its prompt) on the rollout workers,
   which hold the current policy: deterministic ODE, fixed noise per prompt (raygrpo/guard/sampling.py), so rounds
   compare;
2. score every sample in this (the driver) process, as raygrpo.eval does (``make_reward``; HTTP and VLM-judge
   rewards call their servers from here): the trained rewards (raw scores, no ``threshold``) and the gold
   rewards (``guard.gold_rewards``, never trained on). Signals: ``reward/<name>`` and ``gold/<name>`` (means
   over the samples with a score), ``reward/total`` (mean of ``sum_k weight_k * score_k``);
3. measure diversity within prompts and across prompts, of latents and of a downsampled-pixel embedding
   (raygrpo/guard/diversity.py);
4. when a rule can roll back: save a rollback checkpoint if this round is the best so far by ``guard.rollback_score``,
   into ``<run>/guard/checkpoints/step-NNNNNN/``: the learner's rollback state (raygrpo/learner/state.py: the
   trainable parameters, the adapter only with LoRA, their AdamW moments, the moving shadows, the counters; no
   generators, no frozen copy). Only one is kept: the new one is written and synced into a hidden folder and renamed
   into place, and only then does the previous best go. A periodic checkpoint whose best round was replaced since
   resumes without that target (bit-exact resume reruns the rounds after it, so the same later best is saved again);
5. apply the rules (raygrpo/guard/rules.py); log each event with its evidence (the log, ``<run>/guard/events.jsonl``,
   the metrics ``guard/...``); write a gallery of held-out samples (``<run>/guard/samples/step-NNNNNN/``, the
   format of raygrpo/gallery.py).

A gold (or trained) reward that gives no score for any held-out sample makes the round's verdict ``stop``: a guard
that cannot see its signal says so and ends the run (exit 3, resumable), never passes silently.

The guard's history (rounds, events, rollbacks) is part of every checkpoint (``ControllerState.extra["guard"]``),
so a resumed run measures falls from the same best round and counts the same rollbacks.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from raygrpo.actor_group import get
from raygrpo.checkpoint import save_weights
from raygrpo.config import Config
from raygrpo.data.prompts import load_prompts
from raygrpo.eval import build_rewards, conditioning_images, score_with
from raygrpo.gallery import GalleryEntry, write_step_gallery
from raygrpo.guard.diversity import diversity_signals
from raygrpo.guard.layout import EVENTS, GUARD_DIR
from raygrpo.guard.rules import SEVERITY, GuardEvent, GuardRound, Verdict, decide, rollback_signal, rollback_target, rule_evidence
from raygrpo.guard.sampling import HeldOutRequest, HeldOutSamples, split_request
from raygrpo.reward import make_reward
from raygrpo.sampling import ODE_SOLVERS

logger = logging.getLogger(__name__)


class Guard:
    """The guard of one run: its held-out prompts, its rewards (built here), and its history."""

    def __init__(self, config: Config, run_dir: Path):
        settings = config.guard
        if settings is None:
            raise ValueError("Guard needs a config with a guard section")
        self.config, self.settings, self.folder = config, settings, Path(run_dir) / GUARD_DIR
        self.run_dir = Path(run_dir)
        self.prompts = load_prompts(settings.data)
        images = conditioning_images(config, settings.data, "guard")  # decoded once: held-out sets are small
        self.images = None if images is None else [images[i] for i in range(len(images))]
        algorithm_sampler = getattr(config.algorithm, "sampler", None)
        sampler = settings.sampler or (algorithm_sampler if algorithm_sampler in ODE_SOLVERS else "euler")
        self.request = HeldOutRequest(
            self.prompts, list(range(len(self.prompts))), settings.samples_per_prompt,
            config.run.seed if settings.seed is None else settings.seed, sampler,
            settings.num_steps or config.rollout.num_steps, config.rollout.shift, settings.batch_size, self.images,
        )  # fmt: skip
        # (signal name, reward) for every reward the guard scores; the trained ones first, in config order.
        self.rewards = [(f"reward/{r.name}", reward) for r, reward in zip(config.rewards, build_rewards(config))]
        self.rewards += [(f"gold/{g.name}", make_reward(g.kind, g.params)) for g in settings.gold_rewards]
        self.weights = np.array([r.weight for r in config.rewards], np.float64)  # [K] of the trained rewards
        self.rollback_signal = rollback_signal(settings)
        self.history: list[GuardRound] = []
        self.events: list[GuardEvent] = []
        self.rollbacks = 0

    def due(self, step: int) -> bool:
        return step % self.settings.every == 0

    # ----- one round -----

    def run_round(self, step: int, rollout, workers: list[int], write_state: Callable[[Path], None]) -> tuple[Verdict, dict[str, float]]:
        """Sample, score, measure, save a rollback checkpoint when due, judge, log. ``rollout``: the rollout group;
        ``workers``: those taking work; ``write_state(folder)``: writes the learner's training state there.
        Returns the verdict and the round's metrics (``guard/...`` keys) for the step's record."""
        start = time.perf_counter()
        samples = self._sample(rollout, workers)
        scores, failed = self._score(samples)
        signals = self._signals(scores) | diversity_signals(samples.latents, samples.media)
        now = GuardRound(step, samples.policy_version, signals)
        self.history.append(now)
        if self.rollback_signal is not None:
            self._save_if_best(now, write_state)
        verdict = decide(self.history, self.settings, self.rollbacks)
        if failed:  # a guard that cannot see a signal stops rather than pass silently (or roll back on half of them)
            verdict.action, verdict.rollback_to, verdict.note = "stop", None, "; ".join(failed)
        self.events += verdict.events
        self._log(verdict, samples, scores)
        metrics = {f"guard/{k}": v for k, v in signals.items()} | self._evidence(verdict)
        metrics["guard/policy_version"] = float(samples.policy_version)
        metrics["time/guard"] = time.perf_counter() - start
        return verdict, metrics

    def _sample(self, rollout, workers: list[int]) -> HeldOutSamples:
        parts = split_request(self.request, len(workers))
        results = get([rollout.call(worker, "sample_held_out", part) for worker, part in zip(workers, parts)])
        versions = {r.policy_version for r in results}
        if len(versions) != 1:
            logger.warning("guard: the rollout workers sampled with different policy versions %s", sorted(versions))
        latents = np.concatenate([r.latents for r in results])  # [P, N, ...]
        media = np.concatenate([r.media for r in results])  # [P, N, H, W, 3]
        return HeldOutSamples(max(versions), latents, media)

    def _score(self, samples: HeldOutSamples) -> tuple[dict[str, np.ndarray], list[str]]:
        """``{signal: [P, N]}`` raw scores (NaN: missing) and, for each reward without any score, why."""
        scores, errors = {}, {}
        for name, reward in self.rewards:
            references = self.images or [None] * len(self.prompts)
            rows = [score_with(reward, name, images, prompt, ref) for images, prompt, ref in zip(samples.media, self.prompts, references)]
            scores[name] = np.stack([values for values, _ in rows])  # [P, N]
            errors[name] = sorted({e for _, errs in rows for e in errs})
        failed = [
            f"guard: {name} gave no score for any of the {values.size} held-out samples "
            f"({'; '.join(errors[name])[:500] or 'no error given'}): "
            f"the guard cannot watch it; fix the reward (or remove it from the guard), then the same command resumes the run"
            for name, values in scores.items() if not np.isfinite(values).any()
        ]  # fmt: skip
        return scores, failed

    def _signals(self, scores: dict[str, np.ndarray]) -> dict[str, float]:
        def mean(values: np.ndarray) -> float:
            return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")

        trained = np.stack([scores[f"reward/{r.name}"] for r in self.config.rewards])  # [K, P, N]
        signals = {name: mean(values) for name, values in scores.items()}
        signals["reward/total"] = mean(np.einsum("k,kpn->pn", self.weights, trained))  # NaN where any reward is missing
        return signals

    # ----- rollback checkpoints -----

    def _save_if_best(self, now: GuardRound, write_state: Callable[[Path], None]) -> None:
        """Save the learner's state at ``now`` when it is the best round so far by the rollback score, then prune."""
        value = now.signals.get(self.rollback_signal)
        best = rollback_target(self.history[:-1], self.rollback_signal)
        if value is None or not np.isfinite(value) or (best is not None and value <= best.signals[self.rollback_signal]):
            return
        # Written into a hidden sibling, synced, renamed into place: the previous best stays until this one is complete.
        folder = save_weights(self.folder / "checkpoints", f"step-{now.step:06d}", write_state, replace=True)
        now.checkpoint = str(folder.relative_to(self.run_dir))
        logger.info("guard: step %d is the best round by %s (%.4g): rollback checkpoint %s", now.step, self.rollback_signal, value, folder)
        self._keep_only(now, folder)

    def _keep_only(self, best: GuardRound, folder: Path) -> None:
        """Remove every rollback checkpoint but ``folder`` (``best``'s): the previous best, and what a crash while
        writing one left behind. The rounds that named them are no rollback target any more."""
        for other in (self.folder / "checkpoints").iterdir():
            if other != folder:
                shutil.rmtree(other, ignore_errors=True)
        for r in self.history:
            if r is not best:
                r.checkpoint = None

    def rolled_back(self) -> None:
        self.rollbacks += 1

    # ----- logging -----

    def _evidence(self, verdict: Verdict) -> dict[str, float]:
        metrics = {f"guard/{k}": v for k, v in rule_evidence(self.history, self.settings.rules).items()}
        metrics["guard/action"] = float(SEVERITY[verdict.action])
        metrics["guard/rollbacks"] = float(self.rollbacks + (verdict.action == "rollback"))
        metrics["guard/rollback_to_step"] = float(verdict.rollback_to.step) if verdict.rollback_to else float("nan")
        return metrics

    def _log(self, verdict: Verdict, samples: HeldOutSamples, scores: dict[str, np.ndarray]) -> None:
        now = self.history[-1]
        shown = ", ".join(f"{k}={v:.4g}" for k, v in now.signals.items())
        logger.info("guard round after step %d (policy version %d): %s", now.step, now.policy_version, shown)
        if verdict.action != "none":
            log = logger.warning if verdict.action == "warn" else logger.error
            log("guard: %s: %s", verdict.action, verdict.message())
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / EVENTS).open("a") as f:
            signals = {k: (v if np.isfinite(v) else None) for k, v in now.signals.items()}  # JSON has no NaN
            record = {"step": now.step, "action": verdict.action, "message": verdict.message()}
            f.write(json.dumps(record | {"events": [asdict(e) for e in verdict.events], "signals": signals}) + "\n")
        count = min(self.settings.gallery_prompts, len(self.prompts))
        if count:
            totals = np.einsum("k,kpn->pn", self.weights, np.stack([scores[f"reward/{r.name}"] for r in self.config.rewards]))
            version = samples.policy_version
            entries = [
                GalleryEntry(p, prompt, version, samples.media[p], {k: v[p].astype(np.float32) for k, v in scores.items()}, totals[p])
                for p, prompt in enumerate(self.prompts[:count])
            ]
            write_step_gallery(self.folder, now.step, entries)

    # ----- checkpoint state -----

    def state_dict(self) -> dict[str, Any]:
        return {"history": [asdict(r) for r in self.history], "events": [asdict(e) for e in self.events], "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore the history a checkpoint holds (none: a checkpoint from before the guard was on) and rewrite
        ``events.jsonl`` to match it (rounds after the checkpoint are run again)."""
        state = state or {"history": [], "events": [], "rollbacks": 0}
        self.history = [GuardRound(**r) for r in state["history"]]
        self.events = [GuardEvent(**e) for e in state["events"]]
        self.rollbacks = int(state["rollbacks"])
        for r in self.history:
            if r.checkpoint is not None and not (self.run_dir / r.checkpoint).is_dir():
                logger.warning("guard: the rollback checkpoint of step %d (%s) is gone; it is no rollback target", r.step, r.checkpoint)
                r.checkpoint = None
        self.folder.mkdir(parents=True, exist_ok=True)
        steps = {r.step for r in self.history}
        path = self.folder / EVENTS
        kept = [line for line in (path.read_text().splitlines() if path.is_file() else []) if _step_of(line) in steps]
        path.write_text("".join(line + "\n" for line in kept))


def _step_of(line: str) -> int | None:
    """The step of an events.jsonl line; None for a line cut short when a run died while writing it."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
