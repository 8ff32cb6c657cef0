"""The neural rewards' torch forms (raygrpo/reward/differentiable.py) on the tiny random reward models: the pools'
scores within a stated tolerance, gradients to the pixels, frozen networks placed on the learner's device and
dtype, prompts encoded once, frame averaging, the kinds refused; and a short Diff-Instruct* run that
backpropagates a tiny CLIP score into the generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from raygrpo.config import RewardConfig, load_config
from raygrpo.reward import make_reward
from raygrpo.reward.differentiable import DIFFERENTIABLE_KINDS, NEURAL_KINDS, differentiable_reward
from raygrpo.reward.models.clip import ClipEncoder, clip_processor_class
from raygrpo.reward.models.pixels import TorchImageProcessor

from .conftest import ROOT, train_in_process
from .test_reward_models import folders, params_for  # noqa: F401 - folders: the tiny reward models (module fixture)

PROMPTS = ["a red cat", "a photo of a blue dog near the sea", "a red cat", "sunset"]


def smooth_images(n: int, shape: tuple[int, int], seed: int) -> np.ndarray:
    """uint8 ``[n, H, W, 3]`` random walks along the rows: image-like (not white noise), not the models' 32 px."""
    steps = np.random.default_rng(seed).normal(0, 12, (n, *shape, 3))
    return np.clip(np.cumsum(steps, axis=2) + 128, 0, 255).astype(np.uint8)


def as_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)  # [n, 3, H, W] in [0, 1]


@pytest.mark.parametrize("shape, size", [((40, 56), 32), ((24, 20), 32), ((96, 80), 64), ((64, 64), 64)])
def test_torch_preprocessing_is_the_pil_processors_within_one_level(shape, size):
    """Down- and upsampling, portrait and landscape: sizes exact, values within ~1 uint8 level (PIL's rounding)."""
    processor = clip_processor_class()(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    images = np.random.default_rng(0).integers(0, 256, (3, *shape, 3), dtype=np.uint8)  # noise: the worst case
    reference = processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
    ours = TorchImageProcessor.from_processor(processor)(as_pixels(images))
    assert ours.shape == reference.shape
    levels = (ours - reference).abs() * torch.tensor(processor.image_std).reshape(1, 3, 1, 1) * 255
    assert levels.max() < 1.25 and levels.mean() < 0.4  # measured: max 0.94-1.09, mean 0.28-0.32


@pytest.mark.parametrize("kind", NEURAL_KINDS)
def test_torch_scores_match_the_pools_within_a_one_level_dither(kind, folders):  # noqa: F811
    """Tolerance: the torch score's RMS difference from the pool's is below the RMS change of the pool's own score
    when the image is dithered by +-1 uint8 level (measured 0.26-0.90 of it over 4 seeds, 0.31-0.46 for this one)."""
    params, prompts = params_for(kind, folders), PROMPTS + PROMPTS[:2]
    rng = np.random.default_rng(3)
    images = smooth_images(6, (40, 56), seed=3)
    pool = make_reward(kind, params)
    expected = pool.score(images, prompts)
    dithers = [np.clip(images.astype(int) + rng.integers(-1, 2, images.shape), 0, 255).astype(np.uint8) for _ in range(3)]
    dither_rms = np.sqrt(np.mean([np.square(pool.score(d, prompts) - expected) for d in dithers]))
    got = DIFFERENTIABLE_KINDS[kind](params)(as_pixels(images), prompts).detach().numpy()
    assert got.shape == (6,) and np.all(np.isfinite(got))
    assert np.sqrt(np.mean(np.square(got - expected))) < dither_rms


@pytest.mark.parametrize("kind", NEURAL_KINDS)
def test_gradients_reach_the_pixels_and_ascent_raises_the_score(kind, folders):  # noqa: F811
    torch.manual_seed(0)
    score = DIFFERENTIABLE_KINDS[kind](params_for(kind, folders))
    logits = torch.randn(2, 3, 40, 48, requires_grad=True)  # pixels = sigmoid(logits), always in (0, 1)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    values = []
    for _ in range(4):
        value = score(torch.sigmoid(logits), PROMPTS[:2])  # [2]
        values.append(value.detach())
        optimizer.zero_grad()
        (-value.sum()).backward()
        assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
        optimizer.step()
    assert (values[-1] > values[0]).all()
    modules = networks(score.reward.load())
    assert modules and all(not m.training and not any(p.requires_grad or p.grad is not None for p in m.parameters()) for m in modules)


def networks(nets) -> list[torch.nn.Module]:
    """The modules inside a reward's loaded nets (a ClipEncoder, (ClipEncoder, head), ImageRewardNets)."""
    parts = nets if isinstance(nets, tuple) else (nets,)
    found = [m for part in parts for m in ([part] if isinstance(part, torch.nn.Module) else vars(part).values())]
    return [m for m in found if isinstance(m, torch.nn.Module)]


def test_learner_placement_overrides_the_pools_device_and_dtype(folders):  # noqa: F811
    """The pool's entry names its GPU; the learner loads on the pixels' device (or ``device``) in its ``dtype``."""
    entry = RewardConfig(name="clip", kind="clip_score", params={**params_for("clip_score", folders), "device": "cuda:3"})
    total = differentiable_reward([entry], dtype="bfloat16")
    value = total(torch.rand(2, 3, 32, 32, requires_grad=True), PROMPTS[:2])
    assert value.dtype == torch.float32 and value.shape == (2,)  # embeddings compared in float32
    ((weight, term),) = total.terms
    clip = term.reward.load()
    assert weight == 1.0 and clip.model.dtype == torch.bfloat16 and next(clip.model.parameters()).device.type == "cpu"


def test_each_prompt_is_encoded_once(folders, monkeypatch):  # noqa: F811
    encoded = []
    original = ClipEncoder._encode_texts
    monkeypatch.setattr(ClipEncoder, "_encode_texts", lambda self, prompts: encoded.extend(prompts) or original(self, prompts))
    score = DIFFERENTIABLE_KINDS["clip_score"](params_for("clip_score", folders))
    first = score(torch.rand(4, 3, 32, 32), PROMPTS)
    again = score(torch.rand(4, 3, 32, 32), PROMPTS[::-1])
    assert sorted(encoded) == sorted(set(PROMPTS)) and first.shape == again.shape == (4,)


def test_frame_average_scores_the_pools_frames(folders):  # noqa: F811
    params = {"reward": {"kind": "clip_score", "params": params_for("clip_score", folders)}, "max_frames": 3}
    videos = np.stack([smooth_images(5, (40, 56), seed=s) for s in (4, 5)])  # [2, F=5, H, W, 3]
    expected = make_reward("frame_average", params).score(videos, PROMPTS[:2])
    pixels = torch.from_numpy(videos).permute(0, 4, 1, 2, 3).float().div(255)  # [2, 3, F, H, W]
    score = DIFFERENTIABLE_KINDS["frame_average"](params)
    got = score(pixels, PROMPTS[:2]).detach().numpy()
    per_frame = DIFFERENTIABLE_KINDS["clip_score"](params["reward"]["params"])
    frames = [per_frame(pixels[:, :, f], PROMPTS[:2]).detach().numpy() for f in (0, 2, 4)]  # frames 0, 2, 4 of 5
    assert np.allclose(got, np.mean(frames, axis=0), atol=1e-6)
    assert np.abs(got - expected).max() < 2e-3  # the per-image tolerance above, averaged


def test_rewards_without_gradient_are_refused_by_name():
    rewards = [
        RewardConfig(name="jpeg", kind="jpeg_compressibility"),
        RewardConfig(name="video", kind="frame_average", params={"reward": {"kind": "jpeg_compressibility"}}),
        RewardConfig(name="judge", kind="http", params={"url": "http://127.0.0.1:9/v1"}),
    ]
    with pytest.raises(ValueError) as err:
        differentiable_reward(rewards)
    message = str(err.value)
    assert "jpeg (jpeg_compressibility) is not differentiable" in message
    assert "video (frame_average) averages jpeg_compressibility, which is not differentiable" in message
    assert "judge (http) is not differentiable" in message and "reward_source: latent" in message


@pytest.mark.slow
def test_di_star_backpropagates_a_tiny_clip_score_into_the_generator(folders, tmp_path, monkeypatch):  # noqa: F811
    """Two in-process Diff-Instruct* steps with ``reward_source: pixel`` on a tiny CLIP score: the reward's gradient
    reaches the decoded pixels (non-zero) and the run ends without error."""
    import raygrpo.algorithms.distill as distill

    grads: list[torch.Tensor] = []
    build = distill.differentiable_reward

    def spy(rewards, *args, **kwargs):
        total = build(rewards, *args, **kwargs)

        def scored(pixels, prompts):
            if pixels.requires_grad:
                pixels.register_hook(lambda g: grads.append(g.detach().abs().sum()))
            return total(pixels, prompts)

        return scored

    monkeypatch.setattr(distill, "differentiable_reward", spy)
    model = folders["clip"]
    reward = f"rewards=[{{name: clip, kind: clip_score, weight: 1.0, num_cpus: 0.25, params: {{model: '{model}'}}}}]"
    preset = ROOT / "cluster" / "tiny_di_star.yaml"
    assert load_config(preset, [reward]).rewards[0].kind == "clip_score"
    _, rows = train_in_process(preset, tmp_path, reward, "train.steps=2", "algorithm.group_size=4", "algorithm.groups_per_step=1")
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert grads and all(torch.isfinite(g) and g > 0 for g in grads)
    assert all(np.isfinite(r["learner/reward_grad_source"]) for r in rows)
