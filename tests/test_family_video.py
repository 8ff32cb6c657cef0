"""Video families end to end on CPU through `python -m raygrpo.run` (HunyuanVideo text-to-video, Wan 2.1
image-to-video, each with both algorithms), SkyReels-V2 image-to-video in process, plus the image-to-video data
path: prompt files with conditioning images, their preflight, and the conditioning a rollout carries."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raygrpo.config import DataConfig, load_config
from raygrpo.data.prompts import PromptFileError, load_prompt_images, load_prompts
from raygrpo.errors import PreflightError
from raygrpo.run import preflight

from .conftest import ROOT, run_main
from .test_run_e2e import printed_run_dir

IN_PROCESS = "run.in_process=true"
DGPO = "algorithm={name: dgpo, group_size: 4, groups_per_step: 2, sampler: dpmpp_2m, trunc_steps: 6, num_train_timesteps: 2}"


def wan_rollout_bytes(group_size: int, num_steps: int, trajectory: bool) -> float:
    """Bytes per sample of a tiny Wan i2v rollout (32 px, 5 frames, 32 tokens): the latents of each sample, and
    once per group the sigma grid and the conditioning: UMT5 states [32, 32], CLIP image states [17, 16], and
    the 4 first-frame mask channels + the image's VAE latents [4 + 8, 2, 4, 4], all float32."""
    latent = 8 * 2 * 4 * 4 * 4  # [C, F_lat, h, w]
    per_sample = latent + ((num_steps + 1) * latent + num_steps * 4 if trajectory else 0)  # + trajectory and log-probs
    per_group = (num_steps + 1) * 4 + (32 * 32 + 17 * 16 + 12 * 2 * 4 * 4) * 4
    return per_sample + per_group / group_size


def _records(stdout: str) -> tuple[list[dict], object]:
    run_dir = printed_run_dir(stdout)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()], run_dir


def _png(color, size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------- prompt files with images


def test_jsonl_prompts_with_images_relative_to_the_file(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png((255, 0, 0)))
    Image.new("L", (8, 8), 200).save(tmp_path / "gray.png")  # not RGB: converted
    lines = [{"prompt": "a red square", "image": "img/a.png"}, {"prompt": "  "}, {"prompt": "gray", "image": str(tmp_path / "gray.png")}]
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        "\n".join(json.dumps(line) if line.get("prompt", "").strip() else json.dumps({"prompt": ""}) for line in lines) + "\n\n"
    )
    data = DataConfig(prompt_file=str(path))
    assert load_prompts(data) == ["a red square", "gray"]  # the empty prompt is skipped, with its record
    images = load_prompt_images(data)
    images.check()
    assert len(images) == 2
    assert images[0].shape == (16, 24, 3) and images[0].dtype == np.uint8 and tuple(images[0][0, 0]) == (255, 0, 0)
    assert images[1].shape == (8, 8, 3) and tuple(images[1][0, 0]) == (200, 200, 200)
    assert load_prompt_images(DataConfig(prompts=["x"])) is None
    (tmp_path / "text.jsonl").write_text(json.dumps({"prompt": "no image"}) + "\n")
    assert load_prompt_images(DataConfig(prompt_file=str(tmp_path / "text.jsonl"))) is None


def test_parquet_image_column_holds_paths_or_bytes(tmp_path):
    (tmp_path / "b.png").write_bytes(_png((0, 0, 255)))
    table = pa.table({"prompt": ["from bytes", "from a path", "hf style"],
                      "image": [_png((0, 255, 0)), "b.png", None]})  # fmt: skip
    pq.write_table(table, tmp_path / "p.parquet")
    with pytest.raises(PromptFileError, match="some prompts but not for 1"):
        load_prompt_images(DataConfig(prompt_file=str(tmp_path / "p.parquet")))
    structs = pa.array([{"bytes": _png((0, 255, 0)), "path": None}, {"bytes": None, "path": "b.png"}])
    pq.write_table(pa.table({"prompt": ["from bytes", "from a path"], "image": structs}), tmp_path / "hf.parquet")
    images = load_prompt_images(DataConfig(prompt_file=str(tmp_path / "hf.parquet")))
    assert tuple(images[0][0, 0]) == (0, 255, 0) and tuple(images[1][0, 0]) == (0, 0, 255)


def test_missing_or_unreadable_images_are_listed(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    lines = [{"prompt": "a", "image": "missing.png"}, {"prompt": "b", "image": "bad.png"}]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    images = load_prompt_images(DataConfig(prompt_file=str(path)))
    with pytest.raises(
        PromptFileError, match=r"(?s)2 of 2 .*line 1: conditioning image .*missing.png' does not exist.*line 2: .*cannot be read"
    ):
        images.check()
    path.write_text('{"prompt": "a", "image": 3}\n')
    with pytest.raises(PromptFileError, match='line 1: "image" must be a path'):
        load_prompts(DataConfig(prompt_file=str(path)))
    path.write_text('{"text": "a"}\n')
    with pytest.raises(PromptFileError, match='line 1: each line must be an object with a "prompt"'):
        load_prompts(DataConfig(prompt_file=str(path)))


def test_preflight_checks_images_against_the_family(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a ball", "image": "nowhere.png"}) + "\n")
    config = load_config(ROOT / "cluster" / "tiny_wan_i2v.yaml", [f"data.prompt_file={path}", f"run.output_root={tmp_path}"])
    with pytest.raises(PreflightError, match="nowhere.png' does not exist"):
        preflight(config)
    config = load_config(
        ROOT / "cluster" / "tiny_wan_i2v.yaml", ["data.prompt_file=null", "data.prompts=[a ball]", f"run.output_root={tmp_path}"]
    )
    with pytest.raises(PreflightError, match="image-to-video and needs a conditioning image per prompt"):
        preflight(config)
    config = load_config(
        ROOT / "cluster" / "tiny_hunyuan.yaml", ["rewards.0.kind=brightness", "rewards.0.params={}", f"run.output_root={tmp_path}"]
    )
    with pytest.raises(PreflightError, match="makes videos and 'brightness' scores images.*frame_average"):
        preflight(config)
    assert len(preflight(load_config(ROOT / "cluster" / "tiny_wan_i2v.yaml", [f"run.output_root={tmp_path}"]))) == 4


def test_num_frames_is_checked_in_the_config():
    from raygrpo.config import ConfigError

    assert load_config(ROOT / "cluster" / "tiny_hunyuan.yaml", ["model.num_frames=9"]).model.num_frames == 9
    with pytest.raises(ConfigError, match="4k\\+1.*5 or 9"):
        load_config(ROOT / "cluster" / "tiny_hunyuan.yaml", ["model.num_frames=6"])
    with pytest.raises(ConfigError, match="video families.*not 'flux'"):
        load_config(ROOT / "cluster" / "tiny.yaml", ["model.num_frames=5"])


def test_a_wan_rollout_carries_its_image_conditioning_once_per_group():
    """In process: the group's first frame rides in the rollout as CLIP states and mask + VAE latents, and steers the samples."""
    import torch

    from raygrpo.contracts import PromptGroup
    from raygrpo.rollout.worker import RolloutWorker

    torch.set_num_threads(1)
    dgpo = DGPO.replace("group_size: 4", "group_size: 2")
    config = load_config(ROOT / "cluster" / "tiny_wan_i2v.yaml", [dgpo, "rollout.micro_batch_size=2"])
    prompts, images = load_prompts(config.data), load_prompt_images(config.data)
    worker = RolloutWorker(config)
    rollout, media, info = worker.generate(PromptGroup(0, 0, prompts[0], 2, seed=5, policy_version=0, image=images[0]))
    cond = rollout.conditioning
    assert cond.prompt_embeds.shape == (32, 32) and cond.image_embeds.shape == (17, 16)
    assert cond.image_latents.shape == (4 + 8, 2, 4, 4) and rollout.final_latents.shape == (2, 8, 2, 4, 4)
    assert (cond.image_latents[:4, 0] == 1).all() and (cond.image_latents[:4, 1:] == 0).all()  # the mask marks frame 0
    expected = worker.model.encode_prompt(prompts[0], images[0])
    np.testing.assert_array_equal(cond.image_latents, expected.image_latents)
    np.testing.assert_array_equal(cond.image_embeds, expected.image_embeds)
    assert info.rollout_bytes == rollout.nbytes == wan_rollout_bytes(2, config.rollout.num_steps, trajectory=False) * 2
    assert media.images.shape == (2, 5, 32, 32, 3)
    # Another first frame, same prompt and noise seed: other videos.
    other = next(image for image in images if not np.array_equal(image, images[0]))
    moved, _, _ = worker.generate(PromptGroup(1, 0, prompts[0], 2, seed=5, policy_version=0, image=other))
    assert np.abs(moved.final_latents - rollout.final_latents).max() > 1e-3


def test_a_dgpo_step_on_tiny_skyreels_v2_i2v(tmp_path):
    """SkyReels-V2 I2V through the wan_i2v family in process: rollout, DGPO update, weight sync, checkpoint in its own class."""
    import torch
    from diffusers import SkyReelsV2Transformer3DModel

    from raygrpo.algorithms.advantages import group_advantages
    from raygrpo.contracts import PromptGroup, TrainGroup
    from raygrpo.learner.learner import Learner
    from raygrpo.learner.shard import RankBatch
    from raygrpo.models import tiny_model_folder
    from raygrpo.rollout.worker import RolloutWorker
    from raygrpo.weights import load_weights

    torch.set_num_threads(1)
    folder = tiny_model_folder("skyreels_v2_i2v")
    dgpo = DGPO.replace("group_size: 4", "group_size: 2").replace("num_train_timesteps: 2}", "num_train_timesteps: 2, micro_batch_size: 1}")
    config = load_config(ROOT / "cluster" / "tiny_wan_i2v.yaml", [f"model.pretrained={folder}", dgpo, "rollout.micro_batch_size=2"])
    worker, learner = RolloutWorker(config), Learner(config)
    assert type(worker.model.transformer) is SkyReelsV2Transformer3DModel and worker.model.variant.name == "SkyReels-V2"
    prompts, images = load_prompts(config.data), load_prompt_images(config.data)
    rollout, media, _ = worker.generate(PromptGroup(0, 0, prompts[0], 2, seed=0, policy_version=0, image=images[0]))
    assert media.images.shape == (2, 5, 32, 32, 3) and rollout.conditioning.image_latents.shape == (12, 2, 4, 4)
    advantages = group_advantages(np.array([[0.2, 0.8]]), 5.0, 1e-4, 0).astype(np.float32)
    start = [p.detach().clone() for p in learner.parameters]
    metrics = learner.update(RankBatch.whole([TrainGroup(rollout, 0, advantages, np.ones(1, np.float32), np.arange(2))]))
    assert np.isfinite(metrics.loss) and metrics.samples == 2
    assert max(float((p.detach() - p0).abs().max()) for p, p0 in zip(learner.parameters, start)) > 1e-4
    load_weights(worker.model.transformer, learner.export_weights())
    for (name, mine), theirs in zip(learner.model.transformer.state_dict().items(), worker.model.transformer.state_dict().values()):
        torch.testing.assert_close(theirs, mine, msg=name)
    learner.save(str(tmp_path / "checkpoint"))
    saved = SkyReelsV2Transformer3DModel.from_pretrained(tmp_path / "checkpoint" / "transformer")
    assert saved.config.image_dim == 16 and not saved.config.inject_sample_info


def test_image_rewards_refuse_videos_with_a_pointer_to_frame_average():
    from raygrpo.contracts import GroupMedia, PromptGroup
    from raygrpo.reward import accepts_video, make_reward, score_group

    videos = np.zeros((2, 5, 16, 16, 3), np.uint8)
    media = GroupMedia(PromptGroup(0, 0, "a red ball", 2, 0, 0), videos)
    with pytest.raises(ValueError, match="got videos .*frame_average"):
        score_group(make_reward("jpeg_compressibility"), media)
    scores = score_group(make_reward("frame_average", {"reward": {"kind": "jpeg_compressibility"}}), media)
    assert scores.valid.all() and scores.values.shape == (2,)
    assert accepts_video("frame_average") and accepts_video("http", {"media_type": "video/mp4"})
    assert not accepts_video("http", {}) and not accepts_video("clip_score")


# ----------------------------------- end to end: Wan's DanceGRPO through the session's Ray cluster, the others in process


@pytest.mark.slow
def test_dancegrpo_on_tiny_hunyuan_video(tmp_path):
    """cluster/tiny_hunyuan.yaml for 2 steps: video latents through Dance-SDE rollouts, best-of-N, exact first ratio. In
    process (run.in_process=true): test_dancegrpo_on_tiny_wan_i2v sends video trajectories (and an image) through Ray."""
    proc = run_main("cluster/tiny_hunyuan.yaml", IN_PROCESS, "train.steps=2", f"run.output_root={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    records, run_dir = _records(proc.stdout)
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["reward/jpeg/mean"]) and np.isfinite(r["learner/loss"]) for r in records)
    assert all(r["learner/first_ratio_max_abs_dev"] == 0.0 for r in records), "on-policy ratio must be exactly 1"
    assert all(r["learner/samples"] == 2 * 4 for r in records)  # best-of-4 of each group of 8
    assert records[0]["rollout/bytes_per_sample"] > 9 * 4 * 2 * 4 * 4 * 4  # trajectory of T+1 = 9 latents [4, 2, 4, 4] float32
    assert (run_dir / "samples.png").is_file()
    from diffusers import HunyuanVideoTransformer3DModel

    trained = HunyuanVideoTransformer3DModel.from_pretrained(run_dir / "checkpoint-final" / "transformer")
    assert trained.config.guidance_embeds


@pytest.mark.slow
def test_dgpo_on_tiny_hunyuan_video(tmp_path):
    """DGPO on the same tiny HunyuanVideo: deterministic DPM-Solver++(2M) rollouts, final video latents only. In process
    (run.in_process=true): its data through Ray is a subset of DanceGRPO's (final latents, the same conditioning), which
    test_dancegrpo_on_tiny_hunyuan_video sends through the session cluster."""
    proc = run_main("cluster/tiny_hunyuan.yaml", IN_PROCESS, "train.steps=2", DGPO, "rollout.micro_batch_size=4",
                    f"run.output_root={tmp_path}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    records, _ = _records(proc.stdout)
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["reward/jpeg/mean"]) and np.isfinite(r["learner/loss"]) for r in records)
    assert all(0 <= r["learner/gate_mean"] <= 1 for r in records)


@pytest.mark.slow
def test_dancegrpo_on_tiny_wan_i2v(ray_cluster, tmp_path):
    """cluster/tiny_wan_i2v.yaml for 2 steps: each group carries its conditioning image; CFG in rollout and training.
    4 denoising steps instead of the preset's 8: what is checked (the conditioning sent once per group, the trajectory's
    bytes, the first ratio) does not depend on the count, and each step costs a CFG forward per member and a trained one.
    The driver is this process (the actors are what is on Ray; a new interpreter would import torch and diffusers again)."""
    proc = run_main(
        "cluster/tiny_wan_i2v.yaml", "train.steps=2", "algorithm.group_size=4", "algorithm.grad_accum_samples=8", "rollout.num_steps=4",
        f"run.output_root={tmp_path}", env={"RAY_ADDRESS": ray_cluster.address},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    records, run_dir = _records(proc.stdout)
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["reward/jpeg/mean"]) and np.isfinite(r["learner/loss"]) for r in records)
    assert all(r["learner/first_ratio_max_abs_dev"] == 0.0 for r in records), "on-policy ratio must be exactly 1"
    # Exactly the trajectories plus, once per group, the text and the image conditioning (the image alone: 656 bytes a sample).
    assert records[0]["rollout/bytes_per_sample"] == wan_rollout_bytes(4, 4, trajectory=True)
    from diffusers import WanTransformer3DModel

    assert WanTransformer3DModel.from_pretrained(run_dir / "checkpoint-final" / "transformer").config.image_dim == 16


@pytest.mark.slow
def test_dgpo_on_tiny_wan_i2v(tmp_path):
    """DGPO on the same tiny Wan 2.1 I2V: ODE rollouts of image-conditioned groups, CFG in rollout and training, the
    learner in micro-batches of 2 of each group's 4 members with activation checkpointing (the video presets' knobs).
    In process, as test_dgpo_on_tiny_hunyuan_video: test_dancegrpo_on_tiny_wan_i2v sends the image conditioning through Ray."""
    dgpo = DGPO.replace("num_train_timesteps: 2}", "num_train_timesteps: 2, micro_batch_size: 2}")
    proc = run_main(
        "cluster/tiny_wan_i2v.yaml", IN_PROCESS, "train.steps=2", dgpo, "rollout.micro_batch_size=4", "learner.gradient_checkpointing=true",
        f"run.output_root={tmp_path}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    records, run_dir = _records(proc.stdout)
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["reward/jpeg/mean"]) and np.isfinite(r["learner/loss"]) for r in records)
    assert all(0 <= r["learner/gate_mean"] <= 1 and r["learner/samples"] == 2 * 4 for r in records)
    # Final latents only, and the conditioning once per group: about 2.7 kB a sample (without the image, 2.1 kB).
    assert records[0]["rollout/bytes_per_sample"] == wan_rollout_bytes(4, 8, trajectory=False)
    from diffusers import WanTransformer3DModel

    assert WanTransformer3DModel.from_pretrained(run_dir / "checkpoint-final" / "transformer").config.image_dim == 16
