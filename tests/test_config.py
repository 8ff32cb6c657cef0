"""The config tree: YAML + dotted overrides; every bad input fails before Ray starts, naming the field."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from raygrpo.config import ConfigError, load_config

from .conftest import run_main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "cluster" / "tiny.yaml"


def test_tiny_and_flux_presets_load():
    tiny = load_config(TINY)
    assert tiny.model.pretrained == "tiny-random" and tiny.algorithm.name == "dancegrpo"
    flux = load_config(ROOT / "cluster" / "flux.yaml")
    assert flux.model.pretrained == "black-forest-labs/FLUX.1-dev"


def test_flux_preset_is_the_danceGRPO_recipe():
    """Reference doc §4/§6: group 12, 16 steps, eta 0.3, shift 3, 720x720, fraction 0.6, clip 1e-4, lr 1e-5, HPS:CLIP 0.7:1.4."""
    c = load_config(ROOT / "cluster" / "flux.yaml")
    assert (c.algorithm.group_size, c.rollout.num_steps, c.algorithm.noise_level, c.rollout.shift) == (12, 16, 0.3, 3.0)
    assert (c.model.height, c.model.width, c.algorithm.timestep_fraction, c.algorithm.clip_range) == (720, 720, 0.6, 1e-4)
    assert c.optimizer.lr == 1e-5 and c.algorithm.sampler == "dance_sde" and c.algorithm.shared_noise
    assert {r.kind: r.weight for r in c.rewards} == {"hps_v2.1": 0.7, "clip_score": 1.4}
    assert c.trained_timesteps == 9  # 60% of the 15 usable transitions
    assert c.rollout.num_gpus >= 1 and c.learner.num_gpus >= 1


def test_dotted_overrides_parse_yaml_scalars():
    c = load_config(TINY, ["train.steps=3", "rollout.num_workers=2", "optimizer.lr=1e-3", "rewards.0.weight=0.5", "ray.address=null"])
    assert (c.train.steps, c.rollout.num_workers, c.optimizer.lr, c.rewards[0].weight, c.ray.address) == (3, 2, 1e-3, 0.5, None)
    c = load_config(TINY, ["data.prompts=[a cat, a dog]", "rewards.0.params.target=0.9"])
    assert c.data.prompts == ["a cat", "a dog"] and c.rewards[0].params == {"target": 0.9}


@pytest.mark.parametrize(
    "override, field, words",
    [
        ("train.stpes=3", "train.stpes", "unknown key"),
        ("trian.steps=3", "trian", "unknown key"),
        ("train.steps=many", "train.steps", "integer"),
        ("train.steps=0", "train.steps", "greater than or equal to 1"),
        ("rollout.num_workers=-1", "rollout.num_workers", "greater than or equal to 1"),
        ("model.height=100", "model.height", "multiple of 16"),
        ("algorithm.sampler=ddpm", "algorithm.sampler", "dance_sde"),
        ("algorithm.best_of_n=3", "algorithm", "even"),
        ("algorithm.best_of_n=16", "algorithm", "cannot exceed group_size"),
        ("algorithm.timestep_fraction=0.05", "(top level)", "trains no step"),
        ("algorithm.clip_range=0", "algorithm.clip_range", "greater than 0"),
        ("rewards.0.bogus=1", "rewards.0.bogus", "unknown key"),
        ("rewards.0.weight=0", "(top level)", "weight 0"),
        ("data.prompt_file=x.txt", "data", "exactly one"),
    ],
)
def test_bad_values_name_the_field(override, field, words):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [override])
    message = str(info.value)
    assert f"  {field}:" in message and words in message, message


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(TINY, ["train.steps"])
    with pytest.raises(ConfigError, match="not an index"):
        load_config(TINY, ["rewards.5.weight=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_errors_exit_before_ray_starts():
    """The entry point rejects a typo in ~a second and never imports/starts Ray."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, raygrpo.run as r; code = r.main(sys.argv[1:]); "
         "assert 'ray' not in sys.modules, 'ray was imported'; sys.exit(code)", str(TINY), "train.stpes=3"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "train.stpes: unknown key" in proc.stderr
    assert time.monotonic() - start < 30


def test_preflight_lists_every_problem(tmp_path):
    """Unknown reward kind, missing prompt file, missing model folder: one message with each field."""
    proc = run_main(str(TINY), "rewards.0.kind=aesthetics_v9", f"data.prompt_file={tmp_path}/p.txt", "data.prompts=null",
                    f"model.pretrained={tmp_path}/no-model", f"run.output_root={tmp_path}/out")  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    for words in ("model.pretrained", "rewards.0 (jpeg)", "aesthetics_v9", "data.prompt_file", "p.txt"):
        assert words in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists(), "nothing may be written when preflight fails"


@pytest.mark.parametrize("preset", ["sd3_dgpo.yaml", "flux_dgpo.yaml"])
def test_dgpo_presets_follow_the_reference_table(preset):
    c = load_config(ROOT / "cluster" / preset)
    a = c.algorithm
    assert a.name == "dgpo" and a.sampler == "dpmpp_2m" and not a.shared_noise and c.rollout.num_steps == 10
    assert (a.num_train_timesteps, a.trunc_steps, a.switch_ema_ref, a.reference) == (4, 6, 200, "frozen")
    assert c.model.lora is not None and (c.model.lora.rank, c.model.lora.alpha) == (64, 128) and c.optimizer.lr == 3e-4
    if preset == "sd3_dgpo.yaml":  # OCR recipe, CFG in rollout only
        assert (a.beta, a.kl_beta, a.clip_range, a.group_size, a.global_std) == (100, 0.02, 1e-2, 16, True)
        assert (c.model.family, c.model.guidance_scale, c.model.train_guidance_scale) == ("sd3", 4.5, 1.0)
    else:  # PickScore recipe, one guidance value for the distilled FLUX
        assert (a.beta, a.kl_beta, a.clip_range, a.group_size) == (10, 0.001, 5e-2, 24)
        assert c.model.train_guidance_scale is None and c.model.guidance_scale == 3.5


def test_algorithm_name_selects_the_algorithm():
    assert load_config(TINY, ["algorithm={name: dgpo}"]).algorithm.beta == 100
    with pytest.raises(ConfigError, match="algorithm: .*'ppo'"):
        load_config(TINY, ["algorithm.name=ppo"])
    with pytest.raises(ConfigError, match="algorithm.beta: unknown key"):
        load_config(TINY, ["algorithm.beta=10"])  # a DGPO knob on a DanceGRPO run
    with pytest.raises(ConfigError, match="trunc_steps=12 must be below"):
        load_config(TINY, ["algorithm={name: dgpo, trunc_steps: 12}", "rollout.num_steps=10"])
