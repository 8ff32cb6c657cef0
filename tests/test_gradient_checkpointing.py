"""learner.gradient_checkpointing: the blocks really recompute in the backward, and the update is the plain one.

(Under FSDP2 on 2 ranks, with LoRA and DGPO micro-batches: the ``dgpo_micro_checkpointed`` scenario of
tests/test_learner_group.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raygrpo.learner.learner import Learner
from raygrpo.learner.shard import RankBatch

from .test_learner_group import make_batch, make_config


@pytest.mark.parametrize(
    "preset, overrides",
    [("tiny.yaml", []), ("tiny_dgpo.yaml", ["model.lora={rank: 4, alpha: 8}", "algorithm.reference=frozen"])],
    ids=["dancegrpo-full", "dgpo-lora"],
)
def test_checkpointed_blocks_recompute_and_give_the_same_update(preset, overrides):
    batch = make_batch(make_config(preset, *overrides), 1)
    runs = {}
    for enabled in (False, True):
        learner = Learner(make_config(preset, *overrides, f"learner.gradient_checkpointing={str(enabled).lower()}"))
        network = learner.model.transformer
        # Calls of one block with gradients on: the training forward, plus its recomputation in the backward when
        # checkpointed (a pre-hook: torch stops a recomputation early, once it has what the backward needs).
        calls = []
        hook = network.transformer_blocks[0].register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
        try:
            metrics = learner.update(RankBatch.whole(batch))
        finally:
            hook.remove()
        flags = {m.gradient_checkpointing for m in network.modules() if hasattr(m, "gradient_checkpointing")}
        runs[enabled] = metrics, calls, flags, {k: v.detach().clone() for k, v in network.state_dict().items()}
    (plain, plain_calls, plain_flags, plain_state), (checkpointed, calls, flags, state) = runs[False], runs[True]
    assert plain_flags == {False} and flags == {True}
    assert sum(plain_calls) > 0 and sum(calls) == 2 * sum(plain_calls)
    assert calls.count(False) == plain_calls.count(False)  # no-gradient forwards (DGPO's reference) are not recomputed
    start = Learner(make_config(preset, *overrides)).model.transformer.state_dict()
    assert max(float((plain_state[k] - start[k]).abs().max()) for k in start) > 1e-4  # the update moved something
    for name in plain_state:
        torch.testing.assert_close(state[name], plain_state[name], rtol=0, atol=1e-7)
    assert np.isfinite(plain.loss) and checkpointed.loss == pytest.approx(plain.loss, rel=1e-6, abs=1e-9)
    assert checkpointed.grad_norm == pytest.approx(plain.grad_norm, rel=1e-6)
