"""Rewards of image-editing runs see the image that was edited: the ``edit_fidelity`` built-in, the optional
``reference`` of HTTP protocol v1 (a real loopback server scores with it; servers that predate it keep working), the
VLM judge's two-image chat, and a tiny FLUX.1 Kontext run that trains on it, is guarded and evaluated with it."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from fastapi import FastAPI, Request
from PIL import Image
from pydantic import BaseModel, ConfigDict

from raygrpo.contracts import GroupMedia, PromptGroup
from raygrpo.reward import Reward, make_reward, score_group
from raygrpo.reward.vlm_judge import DEFAULT_EDIT_QUESTION, REFERENCE_LABELS

from .conftest import ROOT, load_script, run_main, serve_in_thread, train_in_process

serve_builtin = load_script(ROOT / "reward_servers" / "serve_builtin.py", "reward_servers_serve_builtin")
template_server = load_script(ROOT / "reward_servers" / "template_server.py", "reward_servers_template_server")
FAST = {"backoff_s": 0.01, "timeout_s": 5.0, "max_attempts": 1}


def _images(n: int, side: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _media(images: np.ndarray, reference: np.ndarray | None) -> GroupMedia:
    group = PromptGroup(group_id=3, prompt_id=0, prompt="make it blue", group_size=len(images), seed=0, policy_version=1, image=reference)
    return GroupMedia(group=group, images=images)


def _recording(app: FastAPI) -> tuple[FastAPI, list[dict]]:
    """``app`` behind a middleware keeping the JSON body of every POST."""
    bodies: list[dict] = []

    @app.middleware("http")
    async def record(request: Request, call_next):
        if request.method == "POST":
            bodies.append(json.loads(await request.body()))
        return await call_next(request)

    return app, bodies


def _decode(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return np.asarray(image.convert("RGB"))


# ------------------------------------------------------------------------------------------------ the built-in


def test_edit_fidelity_is_the_mean_pixel_distance_to_the_resized_source():
    reward = make_reward("edit_fidelity")
    source = np.zeros((32, 32, 3), np.uint8)  # [32, 32, 3], half black, half white: outputs are 16x16, so it is resized
    source[:, 16:] = 255
    resized = np.asarray(Image.fromarray(source).resize((16, 16), Image.Resampling.LANCZOS), np.float64)
    outputs = np.stack([resized.astype(np.uint8), 255 - resized.astype(np.uint8), _images(1, seed=2)[0]])  # [3, 16, 16, 3]
    outcome = reward.score_outcome(outputs, ["p"] * 3, references=[source] * 3)
    expected = [-np.abs(o.astype(np.float64) - resized).mean() / 255 for o in outputs]
    np.testing.assert_allclose(outcome.values, expected, rtol=1e-6)
    assert outcome.values[0] == 0.0 and outcome.values[1] < outcome.values[2] < 0  # unchanged best, inverted worst
    # Image-to-video: a video's first frame is compared with the conditioning image.
    video = np.stack([np.stack([outputs[0], outputs[1]]), np.stack([outputs[1], outputs[0]])])  # [2, F=2, 16, 16, 3]
    np.testing.assert_allclose(reward.score_outcome(video, ["p", "p"], references=[source] * 2).values, expected[:2], rtol=1e-6)
    # No source: that item has no score (never a 0), saying why; the others are scored.
    partial = reward.score_outcome(outputs[:2], ["p", "p"], references=[source, None])
    assert partial.valid.tolist() == [True, False] and "needs the item's conditioning image" in partial.errors[1]


def test_score_group_hands_the_group_image_only_to_rewards_that_want_it():
    class Legacy(Reward):  # written before references existed: its score_outcome takes no such argument
        name = "legacy"

        def score(self, images, prompts):
            return np.ones(len(images), np.float32)

    images, source = _images(4), _images(1, seed=5)[0]
    assert score_group(Legacy(), _media(images, source)).valid.all()
    scores = score_group(make_reward("edit_fidelity"), _media(images, source), "fidelity")
    expected = make_reward("edit_fidelity").score_outcome(images, ["p"] * 4, references=[source] * 4).values
    np.testing.assert_array_equal(scores.values, expected)
    text_only = score_group(make_reward("edit_fidelity"), _media(images, None), "fidelity")  # a text-to-image group
    assert not text_only.valid.any() and "image-conditioned family" in text_only.errors[0]


# ------------------------------------------------------------------------------------------------ protocol v1


@pytest.fixture(scope="module")
def edit_server():
    app, bodies = _recording(serve_builtin.create_app(make_reward("edit_fidelity"), name="edit", max_batch=3))
    for url in serve_in_thread(app, "/v1/health"):
        yield url, bodies


def test_a_loopback_server_gets_the_reference_and_scores_with_it(edit_server):
    url, bodies = edit_server
    images, source = _images(4), _images(1, side=24, seed=7)[0]
    local = make_reward("edit_fidelity").score_outcome(images, ["p"] * 4, references=[source] * 4)
    bodies.clear()
    remote = score_group(make_reward("http", {"url": url, "send_reference": True, **FAST}), _media(images, source))
    np.testing.assert_allclose(remote.values, local.values, rtol=1e-6)  # PNG is lossless: the same pixels, the same score
    items = [item for body in bodies for item in body["items"]]
    assert len(items) == 4 and len(bodies) == 2  # two batches of max_batch 3
    assert all(np.array_equal(_decode(item["reference"]), source) for item in items)  # at its own size, not resized

    # Without send_reference nothing is added to the wire, and the server's reward says what it misses.
    bodies.clear()
    plain = score_group(make_reward("http", {"url": url, **FAST}), _media(images, source))
    assert all("reference" not in item for body in bodies for item in body["items"])
    assert not plain.valid.any() and "send_reference: true" in plain.errors[0]


def test_servers_that_predate_the_reference_keep_working():
    """The template's own v1 models ignore the unknown field; a server that forbids unknown fields never sees it
    unless the config asks for it."""

    class StrictItem(BaseModel):
        model_config = ConfigDict(extra="forbid")
        id: str
        prompt: str
        media_type: str
        data: str
        metadata: dict

    strict = FastAPI()

    @strict.get("/v1/health")
    async def health():
        return {"status": "ok"}

    @strict.get("/v1/info")
    async def info():
        return {"name": "strict", "media_types": ["image/png"], "max_batch": 8}

    @strict.post("/v1/score")
    async def score(request: Request):
        body = await request.json()
        items = [StrictItem(**item) for item in body["items"]]  # 500 on any field v1 did not have
        return {"request_id": body["request_id"], "results": [{"id": i.id, "score": 0.5} for i in items]}

    images, source = _images(2), _images(1, seed=9)[0]
    for url in serve_in_thread(template_server.create_app(), "/v1/health"):
        template = score_group(make_reward("http", {"url": url, "send_reference": True, **FAST}), _media(images, source))
        np.testing.assert_allclose(template.values, images.reshape(2, -1).mean(axis=1) / 255, rtol=1e-6)  # its brightness
    for url in serve_in_thread(strict, "/v1/health"):
        assert score_group(make_reward("http", {"url": url, **FAST}), _media(images, source)).values.tolist() == [0.5, 0.5]


# ------------------------------------------------------------------------------------------------ the VLM judge


def test_the_judge_sees_the_source_first_and_is_told_which_image_is_which():
    app, bodies = _recording(FastAPI())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-judge", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat():
        return {"choices": [{"message": {"content": "6"}, "finish_reason": "length"}]}

    images, source = _images(2), _images(1, side=20, seed=3)[0]
    for url in serve_in_thread(app, "/v1/models"):
        judge = make_reward("vlm_judge", {"url": url, "send_reference": True, "max_attempts": 1})
        scores = score_group(judge, _media(images, source))
        missing = score_group(judge, _media(images, None))
    np.testing.assert_allclose(scores.values, [6 / 9, 6 / 9])
    content = bodies[0]["messages"][0]["content"]
    assert [part["type"] for part in content] == ["text", "image_url", "text", "image_url", "text"]
    assert (content[0]["text"], content[2]["text"]) == REFERENCE_LABELS
    pixels = [_decode(content[i]["image_url"]["url"].removeprefix("data:image/png;base64,")) for i in (1, 3)]
    assert np.array_equal(pixels[0], source) and any(np.array_equal(pixels[1], image) for image in images)
    assert content[4]["text"] == DEFAULT_EDIT_QUESTION.replace("{prompt}", "make it blue")
    assert not missing.valid.any() and "no conditioning image" in missing.errors[0] and len(bodies) == 2  # none sent


# ------------------------------------------------------------------------------------------------ runs


def test_held_out_images_travel_with_their_prompts_to_each_worker():
    from raygrpo.guard.sampling import HeldOutRequest, split_request

    images = list(_images(3))
    request = HeldOutRequest(["a", "b", "c"], [0, 1, 2], 2, 0, "euler", 2, 3.0, 8, images)
    parts = split_request(request, 2)
    assert [p.prompts for p in parts] == [["a", "b"], ["c"]]
    assert [p.images for p in parts] == [images[:2], images[2:]]


def test_a_reference_reward_on_a_text_to_image_run_is_refused_before_any_worker(tmp_path):
    rewards = "rewards=[{name: f, kind: edit_fidelity}, {name: j, kind: vlm_judge, params: {url: 'http://127.0.0.1:9', send_reference: true}}]"
    proc = run_main("cluster/tiny.yaml", "run.in_process=true", "--skip-reward-check", rewards, f"run.output_root={tmp_path}")
    assert proc.returncode == 2
    assert "rewards.0 (f): 'edit_fidelity' compares each output with its conditioning image" in proc.stderr
    assert "rewards.1 (j): 'vlm_judge' compares" in proc.stderr and not list(tmp_path.iterdir())



@pytest.mark.slow
def test_a_tiny_kontext_run_trains_guards_and_evaluates_with_edit_fidelity(tmp_path):
    from raygrpo.eval import main as eval_main

    source = ROOT / "cluster" / "prompts" / "i2v" / "red_ball.png"
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(json.dumps({"prompt": "make the ball green", "image": str(source)}) + "\n")
    rewards = "rewards=[{name: fidelity, kind: edit_fidelity, num_cpus: 0.25}]"
    gold = "gold_rewards: [{name: jpeg, kind: jpeg_compressibility}]"
    guard = f"guard={{every: 1, prompt_file: {held_out}, samples_per_prompt: 2, num_steps: 2, {gold}}}"
    small = ["train.steps=2", "rollout.num_steps=4", "train.checkpoint_every=0", "algorithm.group_size=4", "algorithm.grad_accum_samples=8"]
    run_dir, rows = train_in_process(ROOT / "cluster" / "tiny_flux_kontext.yaml", tmp_path / "runs", *small, rewards, guard)
    assert [r["groups/trained"] for r in rows] == [2.0, 2.0]
    assert all(-1 < r["reward/fidelity/mean"] < 0 for r in rows)  # scored against each group's source image
    assert all(-1 < r["guard/reward/fidelity"] < 0 for r in rows)  # the guard's held-out edits too

    out = tmp_path / "eval"
    args = [rewards, "--checkpoint", str(run_dir / "checkpoint-final"), "--prompts", str(held_out), "--num-steps", "2", "--out", str(out)]
    assert eval_main([str(ROOT / "cluster" / "tiny_flux_kontext.yaml"), *args]) == 0
    results = json.loads((out / "eval.json").read_text())["results"]
    for model in ("base", "checkpoint"):
        assert results[model]["summary"]["missing"] == 0 and -1 < results[model]["summary"]["fidelity/mean"] < 0
