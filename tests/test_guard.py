"""The reward-hacking guard (raygrpo/guard/): its rules on hand-made histories, its diversity measures on hand-made
tensors, a gold reward that fails, its state across a resume, and the tiny JPEG task rolled back before collapse."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from raygrpo.actor_group import LocalRef
from raygrpo.config import ConfigError, GuardConfig, GuardRuleConfig, load_config
from raygrpo.controller import Controller
from raygrpo.guard.diversity import diversity, pairwise_distances, pixel_embedding
from raygrpo.guard.guard import Guard
from raygrpo.guard.rules import GuardRound, check_rule, decide
from raygrpo.guard.sampling import HeldOutSamples
from raygrpo.learner.learner import Learner
from raygrpo.reward import make_reward

from .conftest import ROOT

TINY_GUARD = ROOT / "cluster" / "tiny_guard.yaml"


def rounds(*values: tuple[float, float], signal: str = "gold/contrast", checkpoints: bool = False) -> list[GuardRound]:
    """A history of rounds 3, 6, 9, ... with (watched signal, reward/total) each."""
    steps = [3 * (i + 1) for i in range(len(values))]
    folders = [f"guard/checkpoints/step-{step:06d}" if checkpoints else None for step in steps]
    return [GuardRound(step, step, {signal: s, "reward/total": r}, folder) for step, (s, r), folder in zip(steps, values, folders)]


def rule(**fields) -> GuardRuleConfig:
    return GuardRuleConfig(**{"signal": "gold/contrast", "max_drop_fraction": 0.1, **fields})


def settings(*rules: GuardRuleConfig, **fields) -> GuardConfig:
    return GuardConfig(prompts=["a held-out prompt"], rules=list(rules), **fields)


# ----- rules -----


def test_a_rule_fires_when_the_gold_reward_falls_past_its_threshold_while_the_trained_reward_rises():
    history = rounds((0.08, -3.8), (0.10, -3.6), (0.085, -3.0))  # best 0.10 at step 6; now 0.085: a 15% drop
    event = check_rule(history, rule(), 0)
    assert event is not None
    assert (event.reference_step, event.reference_value, event.value) == (6, 0.10, 0.085)
    assert event.drop == pytest.approx(0.015) and event.threshold == pytest.approx(0.01)
    assert (event.rising_reference, event.rising_value) == (-3.6, -3.0)
    assert "fell from 0.1 (best round, step 6) to 0.085" in event.describe()


def test_a_rule_stays_quiet_below_its_threshold_or_when_the_trained_reward_did_not_rise():
    assert check_rule(rounds((0.10, -3.8), (0.095, -3.0)), rule(), 0) is None  # 5% < 10%
    assert check_rule(rounds((0.10, -3.8), (0.05, -3.9)), rule(), 0) is None  # halved, but the trained reward fell too
    assert check_rule(rounds((0.10, -3.8), (0.05, -3.8)), rule(), 0) is None  # ... or stayed: not hacking
    assert check_rule(rounds((0.10, -3.8)), rule(), 0) is None  # one round: nothing to compare


def test_absolute_thresholds_first_references_and_missing_values():
    history = rounds((0.10, -3.8), (0.20, -3.5), (0.12, -3.0))
    assert check_rule(history, rule(max_drop_fraction=None, max_drop=0.05), 0) is not None  # 0.20 -> 0.12 > 0.05
    assert check_rule(history, rule(reference="first"), 0) is None  # from the first round (0.10) it rose
    assert check_rule(rounds((0.10, -3.8), (math.nan, -3.0)), rule(), 0) is None  # no value now: never fires
    with pytest.raises(ValueError, match="exactly one of max_drop and max_drop_fraction"):
        GuardRuleConfig(signal="gold/contrast", max_drop=0.1, max_drop_fraction=0.1)


def test_the_most_severe_action_wins_and_a_rollback_goes_to_the_best_round_with_a_checkpoint():
    history = rounds((0.08, -3.8), (0.10, -3.6), (0.05, -3.0), checkpoints=True)
    both = settings(rule(action="warn"), rule(action="rollback", max_drop_fraction=0.3))
    verdict = decide(history, both, rollbacks=0)
    assert verdict.action == "rollback" and len(verdict.events) == 2
    assert verdict.rollback_to.step == 6  # the highest gold/contrast, not the first round
    assert decide(history, settings(rule(action="rollback"), rule(action="stop")), 0).action == "stop"
    spent = decide(history, settings(rule(action="rollback"), max_rollbacks=1), rollbacks=1)
    assert spent.action == "stop" and "max_rollbacks=1" in spent.message()
    no_checkpoint = decide(rounds((0.08, -3.8), (0.10, -3.6), (0.05, -3.0)), settings(rule(action="rollback")), 0)
    assert no_checkpoint.action == "stop" and "no earlier guard round with a checkpoint" in no_checkpoint.message()


def test_guard_config_names_unknown_signals_and_refuses_rollback_off_policy():
    base = ["run.in_process=true", "guard.rules.0.action=warn"]
    with pytest.raises(ConfigError, match=r"guard.rules.0.signal='gold/sharpness' is not a guard signal; known: .*gold/contrast"):
        load_config(TINY_GUARD, [*base, "guard.rules.0.signal=gold/sharpness"])
    with pytest.raises(ConfigError, match="rollback needs train.max_staleness=0"):
        load_config(TINY_GUARD, ["train.max_staleness=1"])
    assert load_config(TINY_GUARD, ["train.max_staleness=1", "guard.rules.0.action=stop"]).guard.rules[0].action == "stop"


# ----- diversity and the gold reward -----


def test_diversity_within_and_across_prompts_on_hand_made_features():
    # Prompt 0: samples at 0 and 2; prompt 1: samples at 10 and 10 (collapsed). D = 4, every coordinate equal.
    features = np.array([[[0.0] * 4, [2.0] * 4], [[10.0] * 4, [10.0] * 4]])  # [P=2, N=2, D=4]
    within, across = diversity(features)
    assert within == pytest.approx((2.0 + 0.0) / 2)  # RMS distance |a - b| per coordinate, averaged over prompts
    assert across == pytest.approx((10 + 10 + 8 + 8) / 4)
    assert diversity(np.ones((3, 4, 5))) == (0.0, 0.0)  # everything the same image: no diversity at all
    assert math.isnan(diversity(np.zeros((1, 3, 2)))[1])  # one prompt: no pair across prompts
    d = pairwise_distances(np.array([[0.0, 0.0], [3.0, 4.0]]))
    assert d[0, 1] == pytest.approx(5.0 / math.sqrt(2)) and d[0, 0] == 0.0


def test_the_pixel_embedding_is_a_downsampled_image():
    media = np.zeros((1, 2, 32, 32, 3), np.uint8)
    media[0, 1, :16] = 255  # top half white
    features = pixel_embedding(media, size=2)  # [1, 2, 2 * 2 * 3]
    assert features.shape == (1, 2, 12)
    assert np.all(features[0, 0] == 0.0)
    top = features[0, 1].reshape(3, 2, 2)[:, 0]  # channels x rows x cols: the top row of 2x2 cells
    assert np.all(top == 1.0) and np.all(features[0, 1].reshape(3, 2, 2)[:, 1] == 0.0)


def test_the_contrast_reward_dislikes_flat_images():
    reward = make_reward("contrast")
    flat = np.full((1, 8, 8, 3), 128, np.uint8)
    halves = np.zeros((1, 8, 8, 3), np.uint8)
    halves[0, :4] = 255
    scores = reward.score(np.concatenate([flat, halves]), ["a", "b"])
    assert scores[0] == 0.0 and scores[1] == pytest.approx(0.5)


# ----- a guard round without a model -----


class FakeRollout:
    """A rollout group of one worker that returns fixed held-out samples (no model)."""

    def __init__(self, media: np.ndarray):
        self.media = media

    def call(self, index: int, method: str, request) -> LocalRef:
        assert method == "sample_held_out"
        latents = self.media.astype(np.float32)[: len(request.prompts)]
        return LocalRef(HeldOutSamples(7, latents, self.media[: len(request.prompts)]))


def guard_config(tmp_path: Path, *overrides: str):
    return load_config(TINY_GUARD, ["run.in_process=true", f"run.output_root={tmp_path}", *overrides])


def test_a_gold_reward_that_never_scores_stops_the_guard_saying_so(tmp_path):
    # color from_prompt needs a colour word; the held-out prompts name none: no sample gets a score.
    config = guard_config(tmp_path, "guard.gold_rewards.0.kind=color", "guard.gold_rewards.0.params={from_prompt: true}")
    guard = Guard(config, tmp_path)
    media = np.random.default_rng(0).integers(0, 255, (4, 4, 8, 8, 3), dtype=np.uint8)
    verdict, metrics = guard.run_round(3, FakeRollout(media), [0], lambda folder: (folder / "state").mkdir())
    assert verdict.action == "stop"
    assert "guard: gold/contrast gave no score for any of the 16 held-out samples (prompt names no colour" in verdict.message()
    assert math.isnan(metrics["guard/gold/contrast"]) and metrics["guard/action"] == 3.0
    assert np.isfinite(metrics["guard/reward/jpeg"]) and metrics["guard/policy_version"] == 7.0


def test_a_round_logs_a_gallery_and_events_and_its_history_survives_a_resume(tmp_path):
    guard = Guard(guard_config(tmp_path), tmp_path)
    rng = np.random.default_rng(0)
    busy = rng.integers(0, 255, (4, 4, 8, 8, 3), dtype=np.uint8)
    flat = np.full_like(busy, 128)
    saved = []

    def write_state(folder: Path) -> None:
        saved.append(folder.name)
        (folder / "learner_state.json").write_text("{}")

    guard.run_round(3, FakeRollout(busy), [0], write_state)
    state_after_first = guard.state_dict()
    verdict, metrics = guard.run_round(6, FakeRollout(flat), [0], write_state)
    # Flat images: contrast and diversity fall to 0, the JPEG reward rises: rule 0 rolls back to step 3's checkpoint.
    assert verdict.action == "rollback" and verdict.rollback_to.step == 3
    assert metrics["guard/rule/0/fired"] == 1.0 and metrics["guard/rule/0/drop"] > metrics["guard/rule/0/threshold"]
    assert metrics["guard/diversity/pixels/within"] == 0.0 and metrics["guard/rollback_to_step"] == 3.0
    assert len(saved) == 1 and (tmp_path / verdict.rollback_to.checkpoint / "learner_state.json").is_file()
    events = [json.loads(line) for line in (tmp_path / "guard" / "events.jsonl").read_text().splitlines()]
    assert [e["action"] for e in events] == ["none", "rollback"] and events[1]["events"][0]["signal"] == "gold/contrast"
    index = json.loads((tmp_path / "guard" / "samples" / "step-000006" / "index.json").read_text())
    assert len(index["groups"]) == 4 and set(index["groups"][0]["samples"][0]["scores"]) == {"reward/jpeg", "gold/contrast"}
    # A resume from a checkpoint taken after step 3 knows that round (and its rollback target) and forgets step 6's.
    resumed = Guard(guard_config(tmp_path), tmp_path)
    resumed.load_state_dict(state_after_first)
    assert [r.step for r in resumed.history] == [3] and resumed.history[0].checkpoint is not None
    assert [json.loads(line)["step"] for line in (tmp_path / "guard" / "events.jsonl").read_text().splitlines()] == [3]


def tensor_bytes(state: Path) -> int:
    """Bytes of the tensors a training state's DCP folder holds (its metadata lists each with shape and dtype)."""
    metadata = dcp.FileSystemReader(str(state / "tensors")).read_metadata().state_dict_metadata
    return sum(math.prod(m.size) * m.properties.dtype.itemsize for m in metadata.values() if hasattr(m, "size"))


def test_one_rollback_state_is_kept_and_with_lora_it_holds_the_adapter_and_its_adamw_moments_only(tmp_path):
    config = guard_config(tmp_path, "model.lora={rank: 4, alpha: 8}", "model.max_sequence_length=16")
    learner = Learner(config)
    guard = Guard(config, tmp_path)
    noise = np.random.default_rng(0).integers(-64, 64, (4, 4, 8, 8, 3))
    folders = tmp_path / "guard" / "checkpoints"
    for k, step in enumerate((3, 6, 9)):  # more contrast every round: every round is the new best
        media = (128 + noise * (k + 1) / 2).astype(np.uint8)
        learner.policy_version = step
        guard.run_round(step, FakeRollout(media), [0], lambda folder: learner.save_state(str(folder), rollback=True))
        assert [f.name for f in folders.iterdir()] == [f"step-{step:06d}"]  # the previous best went once this one was in
        assert [r.checkpoint for r in guard.history if r.checkpoint] == [f"guard/checkpoints/step-{step:06d}"]
    state = folders / "step-000009"
    adapter = sum(p.numel() * p.element_size() for p in learner.parameters)  # the trainable LoRA tensors only
    network = sum(p.numel() * p.element_size() for p in learner.model.transformer.parameters())
    # The adapter, its AdamW exp_avg and exp_avg_sq (plus AdamW's step count per tensor): no base weights, no generators.
    assert tensor_bytes(state) == 3 * adapter + 4 * len(learner.parameters) and 3 * adapter < network / 5
    assert sorted(f.name for f in state.iterdir()) == ["learner_state.json", "tensors"]
    # A rollback restores it: the adapter's weights and the policy version of that round.
    saved = [p.detach().clone() for p in learner.parameters]
    with torch.no_grad():
        for p in learner.parameters:
            p.add_(1.0)
    learner.policy_version = 12
    assert learner.load_state(str(state)) == 9
    assert all(torch.equal(p, q) for p, q in zip(learner.parameters, saved))


# ----- the tiny task, end to end -----


@pytest.mark.slow
def test_the_tiny_jpeg_task_is_rolled_back_to_its_best_round_before_collapse(tmp_path, monkeypatch):
    """cluster/tiny_guard.yaml in process: the JPEG reward flattens the images, the gold contrast reward falls, and
    the guard rolls the learner and the rollout worker back to the weights of the round with the best contrast."""
    overrides = ["run.in_process=true", "train.steps=9", "train.checkpoint_every=0", "guard.rules.0.max_drop_fraction=0.1"]
    config = load_config(TINY_GUARD, overrides)
    weights_at_round: dict[int, dict[str, torch.Tensor]] = {}
    after_rollback: list[tuple[dict, dict]] = []

    def network_state(controller: Controller) -> tuple[dict, dict]:
        """Copies of the learner's and the rollout worker's network weights (in process: plain objects)."""
        networks = (controller.learner.ranks.actors[0].model.transformer, controller.rollout.actors[0].model.transformer)
        return tuple({k: v.detach().clone() for k, v in network.state_dict().items()} for network in networks)

    original_round, original_act = Controller._guard_round, Controller._guard_act

    def guard_round(self, step):
        if self.guard.due(step):
            weights_at_round[step] = network_state(self)[0]
        return original_round(self, step)

    def guard_act(self, verdict):
        original_act(self, verdict)
        if verdict.action == "rollback":
            after_rollback.append((verdict.rollback_to.step, *network_state(self)))

    monkeypatch.setattr(Controller, "_guard_round", guard_round)
    monkeypatch.setattr(Controller, "_guard_act", guard_act)
    run_dir = tmp_path / "run"
    Controller(config, run_dir, list(config.data.prompts)).run()

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds_ = [r for r in records if "guard/action" in r]
    assert [r["step"] for r in rounds_] == [3, 6, 9]
    fired = [r for r in rounds_ if r["guard/action"] == 2.0]  # rollback
    assert fired, f"the guard never fired: {[(r['step'], r['guard/gold/contrast'], r['guard/reward/total']) for r in rounds_]}"
    first = fired[0]
    target = int(first["guard/rollback_to_step"])
    best = next(r for r in rounds_ if r["step"] == target)
    # The evidence, in the metrics: contrast fell past the threshold from the best round while the JPEG reward rose.
    assert first["guard/rule/0/fired"] == 1.0 and first["guard/rule/0/drop"] > first["guard/rule/0/threshold"]
    assert best["guard/gold/contrast"] - first["guard/gold/contrast"] == pytest.approx(first["guard/rule/0/drop"])
    assert first["guard/reward/total"] > best["guard/reward/total"]
    assert best["guard/gold/contrast"] == max(r["guard/gold/contrast"] for r in rounds_ if r["step"] <= first["step"])
    # The learner and the rollout worker hold exactly the weights of that round again.
    step, learner, rollout = after_rollback[0]
    assert step == target
    for name, value in weights_at_round[target].items():
        assert torch.equal(learner[name], value), name
        assert torch.equal(rollout[name], value), name
    assert any(not torch.equal(weights_at_round[first["step"]][k], v) for k, v in weights_at_round[target].items())
    events = [json.loads(line) for line in (run_dir / "guard" / "events.jsonl").read_text().splitlines()]
    assert any(e["action"] == "rollback" for e in events)
    assert (run_dir / "guard" / "samples" / f"step-{first['step']:06d}" / "index.json").is_file()


def test_the_dashboard_serves_the_guard_rounds_events_and_held_out_gallery(tmp_path):
    from fastapi.testclient import TestClient

    from services.dashboard.app import create_app

    run_dir = tmp_path / "tiny-guard-20261203-120000"
    run_dir.mkdir()
    config = guard_config(tmp_path)
    (run_dir / "config.yaml").write_text(config.to_yaml())
    guard = Guard(config, run_dir)
    rng = np.random.default_rng(0)
    busy = rng.integers(0, 255, (4, 4, 8, 8, 3), dtype=np.uint8)
    lines = []
    for step, media in ((3, busy), (6, np.full_like(busy, 128))):
        _, metrics = guard.run_round(step, FakeRollout(media), [0], lambda folder: (folder / "learner_state.json").write_text("{}"))
        finite = {k: v if math.isfinite(v) else None for k, v in metrics.items()}
        lines.append(json.dumps({"step": step, "reward/total/mean": -3.0} | finite))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    client = TestClient(create_app(tmp_path))
    guard_info = client.get(f"/api/runs/{run_dir.name}/guard").json()
    assert guard_info["steps"] == [3, 6]
    assert [e["action"] for e in guard_info["events"]] == ["rollback"] and "gold/contrast fell" in guard_info["events"][0]["message"]
    gallery = client.get(f"/api/runs/{run_dir.name}/guard/samples/6").json()
    assert len(gallery["groups"]) == 4 and gallery["groups"][0]["samples"][0]["scores"]["gold/contrast"] == 0.0
    image = client.get(gallery["groups"][0]["samples"][0]["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert client.get(f"/api/runs/{run_dir.name}/guard/samples/9").status_code == 404
    series = client.get(f"/api/runs/{run_dir.name}/metrics").json()["series"]
    assert series["guard/gold/contrast"][1] == 0.0 and series["guard/action"] == [0.0, 2.0]
    assert "guard-panel" in client.get(f"/runs/{run_dir.name}").text


def test_the_preflight_names_a_bad_gold_reward_before_anything_starts(tmp_path):
    from raygrpo.errors import PreflightError
    from raygrpo.run import preflight

    config = guard_config(tmp_path, "guard.gold_rewards.0.kind=sharpness")
    with pytest.raises(PreflightError, match=r"guard.gold_rewards.0 \(contrast\): unknown reward kind 'sharpness'"):
        preflight(config, check_rewards=False, gpu_memory_bytes=None)
