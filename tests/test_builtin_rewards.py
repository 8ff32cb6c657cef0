"""Built-in pixel rewards: known optima, per-item errors, parameter validation, registry."""

from __future__ import annotations

import numpy as np
import pytest

from raygrpo.contracts import GroupMedia, PromptGroup, Scores
from raygrpo.reward import BUILTIN_REWARDS, NON_FINITE_ERROR, Reward, find_color_name, make_reward, score_group


def flat(rgb: tuple[int, int, int], n: int = 1, size: int = 64) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (n, size, size, 3)).copy()


def noise(n: int = 2, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_jpeg_flat_image_compresses_better_than_noise():
    images = np.concatenate([flat((120, 60, 30)), noise(1)])
    compress = make_reward("jpeg_compressibility", {}).score(images, ["p", "p"])
    incompress = make_reward("jpeg_incompressibility", {}).score(images, ["p", "p"])
    assert compress.dtype == np.float32 and compress.shape == (2,)
    assert compress[0] > compress[1]
    assert incompress[1] > incompress[0]
    np.testing.assert_array_equal(compress, -incompress)
    assert np.all(compress < 0)  # a JPEG is never empty


def test_jpeg_quality_changes_size_and_is_validated():
    images = noise(1)
    low = make_reward("jpeg_incompressibility", {"quality": 10}).score(images, ["p"])
    high = make_reward("jpeg_incompressibility", {}).score(images, ["p"])
    assert high[0] > low[0]
    with pytest.raises(ValueError, match="quality"):
        make_reward("jpeg_compressibility", {"quality": 0})


def test_brightness_of_white_and_black():
    images = np.concatenate([flat((255, 255, 255)), flat((0, 0, 0)), flat((51, 51, 51))])
    values = make_reward("brightness", {}).score(images, ["a", "b", "c"])
    np.testing.assert_allclose(values, [1.0, 0.0, 0.2], atol=1e-6)


def test_brightness_with_target():
    images = np.concatenate([flat((255, 255, 255)), flat((0, 0, 0))])
    values = make_reward("brightness", {"target": 0.25}).score(images, ["a", "b"])
    np.testing.assert_allclose(values, [-0.75, -0.25], atol=1e-6)


@pytest.mark.parametrize("target", [-0.1, 1.5])
def test_brightness_target_out_of_range(target):
    with pytest.raises(ValueError, match=r"'brightness'.*'target'"):
        make_reward("brightness", {"target": target})


def test_color_pure_red():
    red = flat((255, 0, 0))
    assert make_reward("color", {"target": "red"}).score(red, ["x"])[0] == pytest.approx(1.0)
    assert make_reward("color", {"target": [1.0, 0.0, 0.0]}).score(red, ["x"])[0] == pytest.approx(1.0)
    blue = make_reward("color", {"target": "blue"}).score(red, ["x"])[0]
    assert blue == pytest.approx(1.0 - np.sqrt(2.0) / np.sqrt(3.0), abs=1e-6)
    white_on_black = make_reward("color", {"target": "white"}).score(flat((0, 0, 0)), ["x"])[0]
    assert white_on_black == pytest.approx(0.0, abs=1e-6)


def test_color_name_is_case_insensitive():
    assert make_reward("color", {"target": "RED"}).score(flat((255, 0, 0)), ["x"])[0] == pytest.approx(1.0)


@pytest.mark.parametrize("target", ["teal", [1.2, 0.0, 0.0], [1.0, 0.0], ["a", "b", "c"]])
def test_color_bad_target(target):
    with pytest.raises(ValueError, match=r"'color'.*'target'"):
        make_reward("color", {"target": target})


def test_color_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one"):
        make_reward("color", {})
    with pytest.raises(ValueError, match="exactly one"):
        make_reward("color", {"target": "red", "from_prompt": True})


def test_find_color_name():
    assert find_color_name("A Blue car next to a red house") == "blue"
    assert find_color_name("a reddish bluetooth speaker") is None
    assert find_color_name("grey cat") == "grey"


def test_color_from_prompt():
    reward = make_reward("color", {"from_prompt": True})
    images = np.concatenate([flat((255, 0, 0)), flat((255, 0, 0))])
    values = reward.score(images, ["a red apple", "a blue whale"])
    assert values[0] == pytest.approx(1.0)
    assert values[1] < 0.5


def test_color_from_prompt_without_colour_is_invalid():
    reward = make_reward("color", {"from_prompt": True})
    images = flat((0, 0, 255), n=2)
    outcome = reward.score_outcome(images, ["a blue whale", "a whale"])
    values, valid, errors = outcome.values, outcome.valid, outcome.errors
    assert values.dtype == np.float32 and valid.dtype == bool
    assert valid.tolist() == [True, False]
    assert values[0] == pytest.approx(1.0)
    assert errors[0] is None
    assert errors[1].startswith("prompt names no colour") and "a whale" in errors[1]
    with pytest.raises(ValueError, match="names no colour"):
        reward.score(images, ["a blue whale", "a whale"])


def test_default_score_outcome_marks_non_finite():
    class Flaky(Reward):
        name = "flaky"

        def score(self, images, prompts):
            return np.array([1.0, np.nan, np.inf], dtype=np.float32)

    outcome = Flaky().score_outcome(noise(3), ["a", "b", "c"])
    assert outcome.valid.tolist() == [True, False, False]
    assert outcome.errors == [None, NON_FINITE_ERROR, NON_FINITE_ERROR]
    assert outcome.values[0] == 1.0


def test_score_group():
    group = PromptGroup(group_id=7, prompt_id=3, prompt="a green field", group_size=2, seed=0, policy_version=0)
    media = GroupMedia(group=group, images=np.concatenate([flat((0, 255, 0)), flat((0, 0, 0))]))
    scores = score_group(make_reward("color", {"from_prompt": True}), media)
    assert isinstance(scores, Scores)
    assert scores.group_id == 7 and scores.reward_name == "color"
    assert scores.valid.all() and scores.errors == [None, None]
    assert scores.values[0] == pytest.approx(1.0) and scores.values[0] > scores.values[1]


def test_unknown_kind_lists_known_ones():
    with pytest.raises(ValueError, match="'no_such_reward'") as info:
        make_reward("no_such_reward", {})
    for kind in BUILTIN_REWARDS:
        assert kind in str(info.value)


def test_unknown_param_names_param_and_reward():
    with pytest.raises(ValueError, match=r"'brightness'.*unknown parameter 'targt'"):
        make_reward("brightness", {"targt": 0.5})
    with pytest.raises(ValueError, match=r"'jpeg_compressibility'.*unknown parameter 'qualty'"):
        make_reward("jpeg_compressibility", {"qualty": 80})


def test_bad_batches_are_rejected():
    reward = make_reward("brightness", {})
    with pytest.raises(ValueError, match="uint8"):
        reward.score(noise(2).astype(np.float32), ["a", "b"])
    with pytest.raises(ValueError, match="prompts"):
        reward.score(noise(2), ["a"])


@pytest.mark.parametrize(
    "kind, params",
    [("jpeg_compressibility", {}), ("jpeg_incompressibility", {}), ("brightness", {}), ("color", {"from_prompt": True})],
)
def test_deterministic(kind, params):
    images = noise(4, seed=1)
    prompts = ["a red car", "a blue sky", "yellow sun", "black cat"]
    first = make_reward(kind, params).score(images, prompts)
    second = make_reward(kind, params).score(images.copy(), prompts)
    assert first.shape == (4,) and first.dtype == np.float32
    np.testing.assert_array_equal(first, second)


def test_read_only_images():
    # Arrays fetched from Ray's object store are read-only views.
    images = noise(2)
    images.setflags(write=False)
    for kind in ("jpeg_compressibility", "brightness"):
        assert np.isfinite(make_reward(kind, {}).score(images, ["a", "b"])).all()
