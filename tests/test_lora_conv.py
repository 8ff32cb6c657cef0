"""A LoRA adapter (conv layers included) under FSDP2 with bf16 compute keeps float32 gradients when the network's
first forward runs with the adapter switched off (RG-LCD's teacher, Diff-Instruct*'s / DGPO's / Diffusion-DPO's
reference: raygrpo/algorithms/forward_process.py ``adapters_disabled``).

peft clears the adapter's requires_grad while it is disabled, and FSDP2 reads the trained parameters (and from them
the gradients' dtypes) at its lazy init; before raygrpo/learner/fsdp.py initialised FSDP at sharding time, that first
forward left FSDP with nothing trained: one rank raised "attempting to assign a gradient with dtype BFloat16 to a
tensor with grad_dtype Float" at the window's syncing backward, as 2 gloo ranks did in the learner (and the planner
under fake tensors, on 1 and 2 ranks, for cluster/sd21_rg_lcd.yaml).
"""

from __future__ import annotations

import torch

from raygrpo.algorithms.forward_process import adapters_disabled
from raygrpo.config import load_config
from raygrpo.learner.fsdp import join_single_rank_group
from raygrpo.learner.learner import prepare_network
from raygrpo.models import load_model

from .conftest import ROOT


def test_a_conv_lora_window_after_an_adapter_off_forward_sums_float32_gradients():
    config = load_config(
        ROOT / "cluster" / "tiny_sd.yaml",
        ["model.dtype=bfloat16", "model.lora={rank: 4, alpha: 4, target_modules: [conv1, conv2, conv_shortcut, to_q]}"],
    )
    join_single_rank_group(use_cuda=False)  # as a one-rank bf16 learner does
    unet = load_model("sd", "tiny-random", load_text_encoders=False, load_vae=False, guidance_scale=1.0).transformer
    prepare_network(unet, config, shard=True)
    convs = [n for n, m in unet.named_modules() if n.endswith("lora_A.default") and isinstance(m, torch.nn.Conv2d)]
    assert convs, "the adapter should hold peft's Conv2d LoRA layers"
    generator = torch.Generator().manual_seed(0)
    x = [torch.randn(2, unet.config.in_channels, 8, 8, generator=generator) for _ in range(2)]  # [2, C, h, w] each
    t = torch.tensor([10, 500])
    text = torch.randn(2, 7, unet.config.cross_attention_dim, generator=generator)  # [2, L, D]
    with torch.no_grad(), adapters_disabled(unet):  # the teacher / reference: the network's first forward
        unet(x[0], t, text)
    trained = [p for p in unet.parameters() if p.requires_grad]

    def window(terms: list[int]) -> torch.Tensor:
        """The learner's window: a backward per term, FSDP's gradient sync on the last only; the flat gradient."""
        for p in trained:
            p.grad = None
        for k in terms:
            unet.set_requires_gradient_sync(k == terms[-1])
            unet(x[k], t, text).sample.float().pow(2).mean().backward()
        assert {p.grad.to_local().dtype for p in trained} == {torch.float32}
        return torch.cat([p.grad.to_local().flatten() for p in trained])

    first, second, both = window([0]), window([1]), window([0, 1])
    assert first.norm() > 0 and second.norm() > 0
    # FSDP keeps the unsynced term's gradient in float32 and adds the synced one: the sum of the two windows' own
    torch.testing.assert_close(both, first + second, rtol=1e-6, atol=1e-9)
