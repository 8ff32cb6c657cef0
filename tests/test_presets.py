"""Every shipped preset (cluster/*.yaml) validates: the config loads, and every reward it names builds.

Building a reward checks its kind and every parameter without contacting a server. The presets of
real models name reward weights this machine does not have (HF_HUB_OFFLINE, see conftest): for those
the one error accepted is that the weights are not in the cache, which a reward raises only after
its parameters have passed validation.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from raygrpo.config import Config, load_config
from raygrpo.data.prompts import load_prompts
from raygrpo.models import VIDEO_FAMILIES
from raygrpo.reward import accepts_video, make_reward
from raygrpo.reward.models import RewardModelError

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "cluster").glob("*.yaml"))
WEIGHTS_NOT_HERE = "is not in the Hugging Face cache and HF_HUB_OFFLINE is set"


def validate_preset(path: Path) -> Config:
    """Load ``path`` and build each of its rewards; raise what is wrong (ValueError naming the reward)."""
    config = load_config(path)
    for i, reward in enumerate(config.rewards):
        where = f"{path.name}: rewards.{i} ({reward.name}, kind {reward.kind!r})"
        try:
            make_reward(reward.kind, reward.params)
        except RewardModelError as exc:
            if WEIGHTS_NOT_HERE not in str(exc):
                raise ValueError(f"{where}: {exc}") from None
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        if config.model.family in VIDEO_FAMILIES and not accepts_video(reward.kind, reward.params):
            raise ValueError(f"{where}: model.family {config.model.family!r} makes videos and this reward scores images")
    return config


def test_there_are_presets():
    assert len(PRESETS) >= 10 and ROOT / "cluster" / "sd3_dgpo.yaml" in PRESETS


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_preset_validates(path):
    config = validate_preset(path)
    assert config.rewards, f"{path.name} names no reward"
    assert load_prompts(config.data), f"{path.name}: no prompts in {config.data}"


def test_sd3_dgpo_scores_through_the_ocr_server():
    reward = load_config(ROOT / "cluster" / "sd3_dgpo.yaml").rewards[0]
    assert reward.kind == "http" and reward.params["url"].endswith(":8010")
    assert (ROOT / "reward_servers" / "ocr_server.py").is_file()


@pytest.mark.parametrize(
    "old, new, problem",
    [
        ("kind: http", "kind: ocr", "unknown reward kind 'ocr'"),
        ("timeout_s: 120", "timeout: 120", "unknown parameter 'timeout'"),
        ('url: "http://127.0.0.1:8010"', 'url: "127.0.0.1:8010"', "parameter 'url'"),
    ],
)
def test_a_preset_with_a_bad_reward_fails(tmp_path, old, new, problem):
    text = (ROOT / "cluster" / "sd3_dgpo.yaml").read_text()
    assert old in text
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace(old, new, 1))
    with pytest.raises(ValueError, match=problem):
        validate_preset(broken)
