"""Neural rewards on tiny random models of the real architectures, loaded through the real code paths.

Each reward is pointed at a folder written by ``raygrpo.reward.tiny`` and its scores are compared
with a computation that does not go through ``raygrpo.reward.models``: the transformers model called
directly, or, for the converted checkpoints (HPS v2.1, ImageReward), a forward pass written here from
the original layout (``nn.MultiheadAttention`` as open_clip uses it, a timm-style ViT as BLIP's).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raygrpo.reward import BUILTIN_REWARDS, make_reward
from raygrpo.reward.models import RewardModelError
from raygrpo.reward.tiny import (
    build_tiny_aesthetic,
    build_tiny_clip,
    build_tiny_hps,
    build_tiny_imagereward,
    tiny_openclip_config,
)

PROMPTS = ["a red cat", "a photo of a blue dog near the sea", "a red cat", "a small wooden house in the forest", "sunset"]
NEURAL_KINDS = ["clip_score", "pickscore", "aesthetic", "hps_v2.1", "imagereward"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-rewards")
    return {
        "clip": build_tiny_clip(root / "clip"),
        "aesthetic": build_tiny_aesthetic(root / "aesthetic"),
        "hps": build_tiny_hps(root / "hps"),
        "imagereward": build_tiny_imagereward(root / "imagereward"),
    }


def params_for(kind: str, folders, **extra):
    clip, aes, hps, ir = folders["clip"], folders["aesthetic"], folders["hps"], folders["imagereward"]
    params = {
        "clip_score": {"model": str(clip)},
        "pickscore": {"model": str(clip), "processor": str(clip)},
        "aesthetic": {"clip_model": str(aes / "clip"), "head": str(aes / "aesthetic.pth")},
        "hps_v2.1": {
            "checkpoint": str(hps / "HPS_v2.1_compressed.pt"),
            "openclip_config": str(hps / "open_clip_config.json"),
            "processor": str(hps / "processor"),
        },
        "imagereward": {
            "checkpoint": str(ir / "ImageReward.pt"),
            "tokenizer": str(ir / "tokenizer"),
            "architecture": str(ir / "architecture.json"),
        },
    }[kind]
    return {**params, **extra}


def images(n: int = 5, seed: int = 0, shape=(40, 56)) -> np.ndarray:
    # Not square and not the model's 32 px, so resize and centre crop both run.
    return np.random.default_rng(seed).integers(0, 256, (n, *shape, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------
# Properties every neural reward must have


@pytest.mark.parametrize("kind", NEURAL_KINDS)
def test_registered_and_scores_are_finite_deterministic_and_batch_invariant(kind, folders):
    assert kind in BUILTIN_REWARDS
    reward = make_reward(kind, params_for(kind, folders))
    batch = images()
    values = reward.score(batch, PROMPTS)
    assert values.shape == (len(batch),) and values.dtype == np.float32
    assert np.all(np.isfinite(values))
    np.testing.assert_array_equal(reward.score(batch, PROMPTS), values)  # same object, same input
    one_by_one = make_reward(kind, params_for(kind, folders, batch_size=1)).score(batch, PROMPTS)
    np.testing.assert_allclose(one_by_one, values, atol=1e-5, rtol=0)
    by_two = make_reward(kind, params_for(kind, folders, batch_size=2)).score(batch, PROMPTS)
    np.testing.assert_allclose(by_two, values, atol=1e-5, rtol=0)
    # An item's score depends on nothing else in the batch.
    np.testing.assert_allclose(reward.score(batch[2:3], PROMPTS[2:3]), values[2:3], atol=1e-5, rtol=0)
    assert reward.score(batch[:0], []).shape == (0,)
    outcome = reward.score_outcome(batch, PROMPTS)
    assert outcome.valid.all() and outcome.errors == [None] * len(batch)
    np.testing.assert_array_equal(outcome.values, values)


@pytest.mark.parametrize("kind", ["clip_score", "pickscore", "hps_v2.1", "imagereward"])
def test_text_conditioned_rewards_depend_on_the_prompt(kind, folders):
    reward = make_reward(kind, params_for(kind, folders))
    same = np.repeat(images(1), 3, axis=0)
    values = reward.score(same, ["a red cat", "a blue car on the road", "a red cat"])
    assert values[0] == pytest.approx(values[2], abs=1e-6)
    assert abs(values[0] - values[1]) > 1e-6


def test_aesthetic_ignores_the_prompt_and_depends_on_the_image(folders):
    reward = make_reward("aesthetic", params_for("aesthetic", folders))
    same = np.repeat(images(1), 2, axis=0)
    a, b = reward.score(same, ["a red cat", "anything else entirely"])
    assert a == pytest.approx(b, abs=1e-7)
    different = reward.score(images(2, seed=1), ["x", "x"])
    assert abs(different[0] - different[1]) > 1e-7


@pytest.mark.parametrize("kind", NEURAL_KINDS)
def test_pickles_without_weights_and_reloads(kind, folders):
    reward = make_reward(kind, params_for(kind, folders))
    assert reward._nets is None  # construction only checks the paths; weights load on first use
    batch = images(3)
    values = reward.score(batch, PROMPTS[:3])  # loads the networks
    assert reward._nets is not None
    blob = pickle.dumps(reward)
    assert len(blob) < 20_000  # parameters only, not the networks
    np.testing.assert_allclose(pickle.loads(blob).score(batch, PROMPTS[:3]), values, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# Each score equals an independent computation


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projected features.
    return out.pooler_output if hasattr(out, "pooler_output") else out


def _clip_cosines(folder, batch, prompts):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        pixels = processor(images=list(batch), return_tensors="pt", input_data_format="channels_last")["pixel_values"]
        text = processor.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        img = _features(model.get_image_features(pixel_values=pixels))
        txt = _features(model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"]))
    cos = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
    return cos, model


def test_clip_score_is_the_cosine_of_clip_embeddings(folders):
    batch = images()
    cos, _ = _clip_cosines(folders["clip"], batch, PROMPTS)
    values = make_reward("clip_score", {"model": str(folders["clip"])}).score(batch, PROMPTS)
    np.testing.assert_allclose(values, cos.numpy(), atol=1e-5, rtol=0)
    scaled = make_reward("clip_score", {"model": str(folders["clip"]), "scale": 100.0}).score(batch, PROMPTS)
    np.testing.assert_allclose(scaled, 100 * cos.numpy(), atol=1e-3, rtol=0)


def test_pickscore_is_temperature_times_cosine_over_26(folders):
    batch = images()
    cos, model = _clip_cosines(folders["clip"], batch, PROMPTS)
    expected = model.logit_scale.exp().item() * cos.numpy()
    reward = make_reward("pickscore", {"model": str(folders["clip"]), "processor": str(folders["clip"])})
    assert reward.params.scale == pytest.approx(1 / 26)
    np.testing.assert_allclose(reward.score(batch, PROMPTS), expected / 26, atol=1e-5, rtol=0)
    raw = make_reward("pickscore", {"model": str(folders["clip"]), "processor": str(folders["clip"]), "scale": 1.0})
    np.testing.assert_allclose(raw.score(batch, PROMPTS), expected, atol=1e-4, rtol=0)


def test_aesthetic_is_the_mlp_of_the_normalised_clip_image_embedding(folders):
    from transformers import CLIPModel, CLIPProcessor

    folder = folders["aesthetic"]
    state = torch.load(folder / "aesthetic.pth", weights_only=True)
    # The published sac+logos+ava1-l14-linearMSE.pth layout: Linear layers at indices 0, 2, 4, 6, 7.
    assert sorted(state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    assert tuple(state["layers.0.weight"].shape) == (1024, 768)
    mlp = nn.Sequential(
        nn.Linear(768, 1024), nn.Identity(), nn.Linear(1024, 128), nn.Identity(), nn.Linear(128, 64), nn.Identity(),
        nn.Linear(64, 16), nn.Linear(16, 1),
    )  # fmt: skip
    mlp.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    model = CLIPModel.from_pretrained(folder / "clip").eval()
    processor = CLIPProcessor.from_pretrained(folder / "clip")
    batch = images()
    with torch.no_grad():
        pixels = processor(images=list(batch), return_tensors="pt", input_data_format="channels_last")["pixel_values"]
        emb = _features(model.get_image_features(pixel_values=pixels))
        expected = mlp(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1).numpy()
    values = make_reward("aesthetic", params_for("aesthetic", folders)).score(batch, PROMPTS)
    np.testing.assert_allclose(values, expected, atol=1e-5, rtol=0)


def _openclip_reference(state: dict[str, torch.Tensor], cfg: dict, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cosines of open_clip's CLIP, written from its layout: pre-LN residual blocks with
    nn.MultiheadAttention, class-token / argmax-token pooling, ``x @ proj``."""
    state = {k: v.float() for k, v in state.items()}

    def blocks(x, prefix, layers, heads, causal):
        width = x.shape[-1]
        mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1) if causal else None
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}"
            attn = nn.MultiheadAttention(width, heads, batch_first=True)
            attn.load_state_dict({k.removeprefix(f"{p}.attn."): v for k, v in state.items() if k.startswith(f"{p}.attn.")})
            h = F.layer_norm(x, (width,), state[f"{p}.ln_1.weight"], state[f"{p}.ln_1.bias"])
            x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
            h = F.layer_norm(x, (width,), state[f"{p}.ln_2.weight"], state[f"{p}.ln_2.bias"])
            h = F.gelu(F.linear(h, state[f"{p}.mlp.c_fc.weight"], state[f"{p}.mlp.c_fc.bias"]))
            x = x + F.linear(h, state[f"{p}.mlp.c_proj.weight"], state[f"{p}.mlp.c_proj.bias"])
        return x

    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=v["patch_size"]).flatten(2).transpose(1, 2)
    cls = state["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + state["visual.positional_embedding"]
    x = F.layer_norm(x, (v["width"],), state["visual.ln_pre.weight"], state["visual.ln_pre.bias"])
    x = blocks(x, "visual.transformer", v["layers"], v["width"] // v["head_width"], causal=False)
    x = F.layer_norm(x[:, 0], (v["width"],), state["visual.ln_post.weight"], state["visual.ln_post.bias"])
    img = x @ state["visual.proj"]

    y = state["token_embedding.weight"][ids] + state["positional_embedding"]
    y = blocks(y, "transformer", t["layers"], t["heads"], causal=True)
    y = F.layer_norm(y, (t["width"],), state["ln_final.weight"], state["ln_final.bias"])
    txt = y[torch.arange(len(ids)), ids.argmax(dim=-1)] @ state["text_projection"]
    return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)


def test_hps_is_the_cosine_of_the_open_clip_checkpoint(folders):
    from transformers import AutoTokenizer, CLIPImageProcessor

    folder = folders["hps"]
    state = torch.load(folder / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    tokenizer = AutoTokenizer.from_pretrained(folder / "processor")
    processor = CLIPImageProcessor.from_pretrained(folder / "processor")
    batch = images()
    pixels = processor(images=list(batch), return_tensors="pt", input_data_format="channels_last")["pixel_values"]
    # open_clip's tokenizer: 77 ids, end-of-text is the largest id, so argmax finds it.
    ids = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")["input_ids"]
    assert int(ids.max()) == tokenizer.eos_token_id
    with torch.no_grad():
        expected = _openclip_reference(state, tiny_openclip_config(), pixels, ids).numpy()
    values = make_reward("hps_v2.1", params_for("hps_v2.1", folders)).score(batch, PROMPTS)
    np.testing.assert_allclose(values, expected, atol=1e-5, rtol=0)


def _blip_vit_reference(state: dict[str, torch.Tensor], arch: dict, pixels: torch.Tensor) -> torch.Tensor:
    """BLIP's timm-style ViT from its own keys: fused qkv split per head as (3, heads, head_dim)."""
    cfg = arch["vision_config"]
    width, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    s = {k.removeprefix("blip.visual_encoder."): v for k, v in state.items() if k.startswith("blip.visual_encoder.")}
    x = F.conv2d(pixels, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=cfg["patch_size"]).flatten(2).transpose(1, 2)
    x = torch.cat([s["cls_token"].expand(len(x), -1, -1), x], dim=1) + s["pos_embed"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"blocks.{i}"
        h = F.layer_norm(x, (width,), s[f"{p}.norm1.weight"], s[f"{p}.norm1.bias"], eps)
        qkv = F.linear(h, s[f"{p}.attn.qkv.weight"], s[f"{p}.attn.qkv.bias"]).reshape(len(x), x.shape[1], 3, heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v
        x = x + F.linear(a.transpose(1, 2).reshape(x.shape), s[f"{p}.attn.proj.weight"], s[f"{p}.attn.proj.bias"])
        h = F.layer_norm(x, (width,), s[f"{p}.norm2.weight"], s[f"{p}.norm2.bias"], eps)
        h = F.linear(
            F.gelu(F.linear(h, s[f"{p}.mlp.fc1.weight"], s[f"{p}.mlp.fc1.bias"])), s[f"{p}.mlp.fc2.weight"], s[f"{p}.mlp.fc2.bias"]
        )
        x = x + h
    return F.layer_norm(x, (width,), s["norm.weight"], s["norm.bias"], eps)


def test_imagereward_matches_blip_computed_from_the_checkpoint(folders):
    import json

    from transformers import AutoTokenizer, BlipTextConfig, BlipTextModel, CLIPImageProcessor

    folder = folders["imagereward"]
    state = torch.load(folder / "ImageReward.pt", weights_only=True)
    arch = json.loads((folder / "architecture.json").read_text())
    text = BlipTextModel(BlipTextConfig(**arch["text_config"]), add_pooling_layer=False).eval()
    text_state = {k.removeprefix("blip.text_encoder."): v for k, v in state.items() if k.startswith("blip.text_encoder.")}
    text_state.pop("embeddings.position_ids")
    text.load_state_dict(text_state)  # BLIP's med.py names are BlipTextModel's names
    mlp = nn.Sequential(
        *[
            nn.Linear(32, 1024),
            nn.Identity(),
            nn.Linear(1024, 128),
            nn.Identity(),
            nn.Linear(128, 64),
            nn.Identity(),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        ]
    )
    mlp.load_state_dict({k.removeprefix("mlp.layers."): v for k, v in state.items() if k.startswith("mlp.")})
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    # ImageReward's preprocessing: short side -> 224 (here 32) bicubic, centre crop, CLIP mean/std.
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    batch = images()
    with torch.no_grad():
        pixels = processor(images=list(batch), return_tensors="pt", input_data_format="channels_last")["pixel_values"]
        image_embeds = _blip_vit_reference(state, arch, pixels)
        tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        cls = text(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
        ).last_hidden_state[:, 0]  # fmt: skip
        expected = ((mlp(cls).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072).numpy()
    values = make_reward("imagereward", params_for("imagereward", folders)).score(batch, PROMPTS)
    np.testing.assert_allclose(values, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_weights_stay_close_and_keep_the_temperature_exact(dtype, folders):
    batch = images()
    for kind, atol in (("clip_score", 0.01), ("pickscore", 0.01)):
        full = make_reward(kind, params_for(kind, folders)).score(batch, PROMPTS)
        low = make_reward(kind, params_for(kind, folders, dtype=dtype)).score(batch, PROMPTS)
        assert low.dtype == np.float32
        np.testing.assert_allclose(low, full, atol=atol, rtol=0)
    full_precision = make_reward("pickscore", params_for("pickscore", folders)).load().temperature
    low_precision = make_reward("pickscore", params_for("pickscore", folders, dtype=dtype)).load().temperature
    assert low_precision == full_precision  # read before the cast, so no bf16/fp16 rounding of the scale


# ------------------------------------------------------------------------------------------------
# Video: frame averaging


def test_frame_average_scores_the_mean_over_uniformly_spaced_frames(folders):
    inner = {"kind": "clip_score", "params": {"model": str(folders["clip"])}}
    reward = make_reward("frame_average", {"reward": inner, "max_frames": 3})
    videos = np.random.default_rng(3).integers(0, 256, (2, 5, 40, 40, 3), dtype=np.uint8)
    prompts = ["a red cat", "a blue dog"]
    np.testing.assert_array_equal(reward.frame_indices(5), [0, 2, 4])
    clip = make_reward("clip_score", {"model": str(folders["clip"])})
    per_frame = np.stack([clip.score(videos[:, f], prompts) for f in (0, 2, 4)], axis=1)
    values = reward.score(videos, prompts)
    assert values.shape == (2,) and values.dtype == np.float32
    np.testing.assert_allclose(values, per_frame.mean(axis=1), atol=1e-6, rtol=0)
    # Images [N, H, W, 3] are scored by the inner reward unchanged.
    np.testing.assert_allclose(reward.score(videos[:, 0], prompts), clip.score(videos[:, 0], prompts), atol=1e-6, rtol=0)
    # max_frames above the frame count scores every frame once.
    everything = make_reward("frame_average", {"reward": inner, "max_frames": 50})
    np.testing.assert_array_equal(everything.frame_indices(5), np.arange(5))
    all_frames = np.stack([clip.score(videos[:, f], prompts) for f in range(5)], axis=1).mean(axis=1)
    np.testing.assert_allclose(everything.score(videos, prompts), all_frames, atol=1e-6, rtol=0)


def test_frame_average_with_a_pixel_reward_and_per_video_errors():
    reward = make_reward("frame_average", {"reward": {"kind": "brightness"}, "max_frames": 2})
    videos = np.zeros((2, 4, 8, 8, 3), np.uint8)
    videos[0, 0] = 255  # first frame white: mean over frames 0 and 3 is 0.5
    videos[1, 1] = 255  # frame 1 is skipped (frames 0 and 3 are scored)
    np.testing.assert_allclose(reward.score(videos, ["a", "b"]), [0.5, 0.0], atol=1e-7)
    by_colour = make_reward("frame_average", {"reward": {"kind": "color", "params": {"from_prompt": True}}})
    outcome = by_colour.score_outcome(videos, ["a red thing", "no colour here"])
    assert outcome.valid.tolist() == [True, False] and np.isnan(outcome.values[1]) and outcome.errors[0] is None
    assert outcome.errors[1].startswith("frame 0: prompt names no colour")
    with pytest.raises(ValueError, match=r"\[N, F, H, W, 3\]"):
        reward.score(np.zeros((2, 4, 8, 8), np.uint8), ["a", "b"])


def test_frame_average_rejects_a_bad_inner_reward():
    with pytest.raises(ValueError, match="frame_average.*unknown reward kind 'nope'"):
        make_reward("frame_average", {"reward": {"kind": "nope"}})
    with pytest.raises(ValueError, match="frame_average.*unknown parameter 'tagret'"):
        make_reward("frame_average", {"reward": {"kind": "brightness", "params": {"tagret": 0.5}}})
    with pytest.raises(ValueError, match="max_frames"):
        make_reward("frame_average", {"reward": {"kind": "brightness"}, "max_frames": 0})


# ------------------------------------------------------------------------------------------------
# Configuration errors are clear and fail at construction, without network


@pytest.mark.parametrize("kind", NEURAL_KINDS)
def test_unknown_parameters_are_rejected(kind, folders):
    with pytest.raises(ValueError, match=f"reward '{kind}': unknown parameter 'modle'"):
        make_reward(kind, {**params_for(kind, folders), "modle": "x"})


def test_bad_device_dtype_and_batch_size_are_rejected(folders):
    base = params_for("clip_score", folders)
    with pytest.raises(ValueError, match="parameter 'device'"):
        make_reward("clip_score", {**base, "device": "gpu0"})
    with pytest.raises(ValueError, match="parameter 'dtype'"):
        make_reward("clip_score", {**base, "dtype": "int8"})
    with pytest.raises(ValueError, match="parameter 'batch_size'"):
        make_reward("clip_score", {**base, "batch_size": 0})


def test_missing_local_weights_name_the_parameter(tmp_path, folders):
    with pytest.raises(RewardModelError, match=r"reward 'clip_score': parameter 'model': .*not a folder"):
        make_reward("clip_score", {"model": str(tmp_path / "nowhere")})
    with pytest.raises(RewardModelError, match=r"parameter 'model': .*holds none of config.json"):
        make_reward("clip_score", {"model": str(tmp_path)})
    with pytest.raises(RewardModelError, match=r"reward 'aesthetic': parameter 'head': .*does not exist"):
        make_reward("aesthetic", {**params_for("aesthetic", folders), "head": str(tmp_path / "head.pth")})
    with pytest.raises(RewardModelError, match=r"parameter 'checkpoint': .*hf://<owner>/<repo>/<file>"):
        make_reward("hps_v2.1", {**params_for("hps_v2.1", folders), "checkpoint": "hf://just-a-name"})
    assert issubclass(RewardModelError, ValueError)  # so the run's preflight lists it with other config errors


@pytest.mark.parametrize(
    ("kind", "param", "repo"),
    [
        ("clip_score", "model", "openai/clip-vit-large-patch14"),
        ("pickscore", "model", "yuvalkirstain/PickScore_v1"),
        ("aesthetic", "clip_model", "openai/clip-vit-large-patch14"),
        ("hps_v2.1", "checkpoint", "xswu/HPSv2"),
        ("imagereward", "checkpoint", "THUDM/ImageReward"),
    ],
)
def test_default_hub_weights_offline_fail_fast_with_a_fix(kind, param, repo, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever this machine holds
    with pytest.raises(RewardModelError) as info:
        make_reward(kind, {})
    message = str(info.value)
    assert f"reward '{kind}': parameter '{param}'" in message
    assert "HF_HUB_OFFLINE" in message and f"hf download {repo}" in message


def test_a_head_that_does_not_fit_the_clip_fails_on_load_with_the_parameter(folders):
    # The tiny CLIP projects to 24 dims; the aesthetic head takes 768.
    reward = make_reward("aesthetic", {"clip_model": str(folders["clip"]), "head": str(folders["aesthetic"] / "aesthetic.pth")})
    with pytest.raises(RewardModelError, match=r"parameter 'head': the head takes 768-d embeddings but .* projects to 24-d"):
        reward.score(images(1), ["x"])
