"""The learner's training state: save after one update, restore into a NEW learner, and the next update is bit-exact.

A does update(b1), update(b2) without stopping; B does update(b1) and save_state; C is built from
the config alone, load_state, update(b2). A and C must hold identical parameters, AdamW state,
algorithm shadows (DGPO's EMAs) and counters, and generators (torch.equal, not allclose).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from raygrpo.learner.learner import Learner
from raygrpo.learner.shard import RankBatch
from raygrpo.learner.state import STATE_FILE, TrainingStateError

from .test_learner_group import make_batch, make_config

PRESETS = {
    "dancegrpo": ("tiny.yaml", ["algorithm.grad_accum_samples=4"]),  # 2 optimizer steps per update
    "dgpo": ("tiny_dgpo.yaml", ["algorithm.slow_ema_every=1", "algorithm.switch_ema_ref=1"]),  # every shadow moves
}


def _optimizer_tensors(learner: Learner) -> list[torch.Tensor]:
    return [value for p in learner.parameters for _, value in sorted(learner.optimizer.state[p].items())]


@pytest.fixture(scope="module", params=sorted(PRESETS))
def three_learners(request, tmp_path_factory):
    torch.set_num_threads(1)
    preset, overrides = PRESETS[request.param]
    config = make_config(preset, *overrides)
    batches = make_batch(config, 4)
    b1, b2 = batches[:2], batches[2:]
    a = Learner(config)
    a.update(RankBatch.whole(b1))
    a.update(RankBatch.whole(b2))
    b = Learner(config)
    b.update(RankBatch.whole(b1))
    folder = tmp_path_factory.mktemp(f"state-{request.param}")
    b.save_state(str(folder))
    c = Learner(config)
    version = c.load_state(str(folder))
    assert version == 1
    c.update(RankBatch.whole(b2))
    return a, c, folder


def test_resumed_learner_continues_bit_exactly(three_learners):
    a, c, _ = three_learners
    assert a.policy_version == c.policy_version == 2
    assert all(torch.equal(pa, pc) for pa, pc in zip(a.parameters, c.parameters))
    opt_a, opt_c = _optimizer_tensors(a), _optimizer_tensors(c)
    assert len(opt_a) == len(opt_c) > 0 and all(torch.equal(x, y) for x, y in zip(opt_a, opt_c))
    assert a.rng.bit_generator.state == c.rng.bit_generator.state


def test_algorithm_shadows_and_counters_are_restored(three_learners):
    a, c, _ = three_learners
    if a.config.algorithm.name != "dgpo":
        pytest.skip("DanceGRPO keeps no shadows or counters")
    assert a.algorithm.optimizer_steps == c.algorithm.optimizer_steps == 2
    for shadow in ("fast_ema", "slow_ema", "frozen"):
        values_a, values_c = getattr(a.algorithm, shadow).values, getattr(c.algorithm, shadow).values
        assert all(torch.equal(x, y) for x, y in zip(values_a, values_c)), shadow
    # the fast EMA and the slow EMA really moved away from the live weights, so the check could fail
    assert any(not torch.equal(s, p) for s, p in zip(a.algorithm.slow_ema.values, a.parameters))


def test_a_state_that_does_not_fit_fails_clearly(three_learners, tmp_path):
    a, _, folder = three_learners
    other = "dgpo" if a.config.algorithm.name == "dancegrpo" else "dancegrpo"
    wrong = Learner(make_config(PRESETS[other][0], *PRESETS[other][1]))
    with pytest.raises(TrainingStateError, match="algorithm: saved"):
        wrong.load_state(str(folder))
    with pytest.raises(TrainingStateError, match="not a complete checkpoint"):
        a.load_state(str(tmp_path))
    state = json.loads((folder / STATE_FILE).read_text())
    assert state["policy_version"] == 1 and state["world_size"] == 1
    assert np.isfinite(a.update(RankBatch.whole(make_batch(a.config, 1))).loss)  # a failed load leaves the learner usable


def test_tensors_that_do_not_load_say_so_in_one_line(three_learners, tmp_path):
    """DCP's own error is a page of per-rank tracebacks; the learner reports the first cause as a TrainingStateError."""
    a, _, folder = three_learners
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    for shard in (broken / "tensors").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # cut short, as by a full disk
    with pytest.raises(TrainingStateError, match=r"^the tensors in .*broken/tensors do not load into this learner: [^\n]+$"):
        Learner(a.config).load_state(str(broken))
