"""The DCPO captioner (raygrpo/data/caption.py) against a real loopback HTTP server that speaks OpenAI's chat API.

Behind the server is a tiny deterministic "model": an image is described by its grain (the synthetic set's preferred
images are smooth, the rejected ones grainy), a text request is answered with a perturbation of the quoted text. A
request whose text names a marked prompt fails with a 400, or with a 503 for a while (retried). Real vLLM is not
used here: its start alone (about 40 s on these CPUs, tests/test_vlm_judge.py) is past this file's budget.
"""

from __future__ import annotations

import base64
import io
import json
import math
import socket

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from raygrpo.data.caption import CaptionError, CaptionOptions, caption_file, main
from raygrpo.data.preferences import CAPTION_FIELDS, load_preferences, write_synthetic_preferences
from raygrpo.reward.vlm_judge import VlmJudgeReward

from .conftest import ROOT, serve_in_thread, train_in_process

PROMPTS = ["a cat on a mat", "a red car on a road", "BROKEN a bowl of fruit", "a house by a lake"]


def _describe(data_url: str) -> str:
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("L"), np.float32)
    grain = float(np.abs(np.diff(pixels, axis=1)).mean())  # mean horizontal step: large for noisy images
    return "a grainy noisy picture" if grain > 30 else "a smooth clean picture"


def _fake_chat_app() -> tuple[FastAPI, list[dict]]:
    app, seen = FastAPI(), []

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "tiny-captioner", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append(body)
        content = body["messages"][0]["content"]
        if isinstance(content, list):  # a captioning request: image + question
            text = next(part["text"] for part in content if part["type"] == "text")
            answer = _describe(next(part["image_url"]["url"] for part in content if part["type"] == "image_url"))
        else:
            text = content
            answer = '"' + " ".join(reversed(text.rsplit('"', 2)[1].split())) + '"'  # quoted, on purpose
        if "BROKEN" in text:
            return JSONResponse({"error": "the model refuses this prompt"}, status_code=400)
        if "FLAKY" in text and sum("FLAKY" in json.dumps(b) for b in seen) % 2:
            return JSONResponse({"error": "busy"}, status_code=503)
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer + "\n"}, "finish_reason": "stop"}]}

    return app, seen


@pytest.fixture(scope="module")
def server():
    app, seen = _fake_chat_app()
    for url in serve_in_thread(app, "/v1/models"):
        yield url, seen


def _bare_pairs(folder, prompts=PROMPTS):
    """The synthetic set without its caption fields, as a pairs file straight from Pick-a-Pic would be."""
    path = write_synthetic_preferences(folder, prompts, size=16, seed=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    bare = folder / "bare.jsonl"
    bare.write_text("".join(json.dumps({k: v for k, v in row.items() if k not in CAPTION_FIELDS} | {"extra": i}) + "\n" for i, row in enumerate(rows)))
    return bare


def _endpoint(url: str) -> VlmJudgeReward:
    return VlmJudgeReward(url=url, max_attempts=3, backoff_s=0.01, concurrency=3)


def test_fills_every_field_keeps_the_rest_and_resumes_after_a_failure(server, tmp_path):
    url, seen = server
    bare = _bare_pairs(tmp_path / "in")
    out = tmp_path / "elsewhere" / "captioned.jsonl"
    before = len(seen)
    with pytest.raises(CaptionError, match=r"1 of 4 records could not be captioned.*\n.*line 3: preferred_caption: .*HTTP 400.*refuses"):
        caption_file(bare, out, _endpoint(url), CaptionOptions())
    assert not out.exists() and (progress := tmp_path / "elsewhere" / "captioned.jsonl.progress.jsonl").exists()
    assert len(seen) - before == 3 * 4 + 1  # three whole records, the failed one stopped at its first field
    other = tmp_path / "in" / "other.jsonl"  # progress is tied to its pairs file: another file's is refused
    other.write_text(bare.read_text().replace("a cat on", "a dog on"))
    with pytest.raises(ValueError, match=r"line \d+ belongs to another pairs file \(record 0 differs\)"):
        caption_file(other, out, _endpoint(url), CaptionOptions())
    # The prompt is fixed; the same command again asks only for what is missing.
    bare.write_text(bare.read_text().replace("BROKEN a bowl", "FLAKY a bowl"))
    before = len(seen)
    report = caption_file(bare, out, _endpoint(url), CaptionOptions())
    assert (report.asked, report.resumed, report.kept, report.failures) == (4, 12, 0, {})
    assert len(seen) - before == 4 + 3  # record 3's four fields; the three that quote its prompt got a 503 first
    assert not progress.exists()
    records = load_preferences(out)  # image paths still resolve from the new folder
    assert [r.prompt for r in records] == [p.replace("BROKEN", "FLAKY") for p in PROMPTS]
    for r in records:
        assert (r.preferred_caption, r.rejected_caption) == ("a smooth clean picture", "a grainy noisy picture")
        assert r.perturbed_prompt == " ".join(reversed(r.prompt.split()))  # quotes and the newline dropped
        assert r.perturbed_rejected_caption == "picture noisy grainy a"  # perturbed after it was captioned
        assert r.preferred.load().shape == (16, 16, 3)
    assert [json.loads(line)["extra"] for line in out.read_text().splitlines()] == [0, 1, 2, 3]
    # Records are captioned concurrently, so which request came first varies: check every captioning request.
    bodies = [b for b in seen if isinstance(b["messages"][0]["content"], list)]
    assert bodies and all(b["model"] == "tiny-captioner" and b["temperature"] == 0.0 for b in bodies)
    assert any("a cat on a mat" in json.dumps(b) for b in bodies)


def test_keeps_present_captions_unless_overwrite_and_never_writes_the_input(server, tmp_path):
    url, seen = server
    pairs = write_synthetic_preferences(tmp_path, PROMPTS[:2], size=16)
    original = pairs.read_text()
    before = len(seen)
    report = caption_file(pairs, tmp_path / "same.jsonl", _endpoint(url), CaptionOptions())
    assert (report.asked, report.kept, len(seen) - before) == (0, 8, 0)
    assert load_preferences(tmp_path / "same.jsonl")[0].preferred_caption.endswith("smooth and clean")  # the input's
    report = caption_file(pairs, tmp_path / "new.parquet", _endpoint(url), CaptionOptions(fields=("rejected_caption",), overwrite=True))
    assert report.asked == 2 and [r.rejected_caption for r in load_preferences(tmp_path / "new.parquet")] == ["a grainy noisy picture"] * 2
    assert pairs.read_text() == original
    with pytest.raises(ValueError, match="never the input"):
        caption_file(pairs, pairs, _endpoint(url), CaptionOptions())


def test_the_command_line_reports_an_unreachable_server_per_record(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bare = _bare_pairs(tmp_path, PROMPTS[:2])
    code = main([str(bare), "--out", str(tmp_path / "out.jsonl"), "--url", f"http://127.0.0.1:{port}", "--max-attempts", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "2 of 2 records could not be captioned" in err and "connection refused" in err and not (tmp_path / "out.jsonl").exists()


@pytest.mark.slow
def test_a_dcpo_c_run_trains_on_the_captioned_file(server, tmp_path):
    url, _ = server
    bare = _bare_pairs(tmp_path / "in", [p for p in PROMPTS if "BROKEN" not in p][:2])
    out = tmp_path / "captioned.jsonl"
    assert main([str(bare), "--out", str(out), "--url", url, "--fields", "preferred_caption", "rejected_caption"]) == 0
    quick = ["algorithm.captions=captioner", f"data.prompt_file={out}", "algorithm.group_size=2", "algorithm.groups_per_step=2", "rollout.num_steps=2", "train.steps=2"]
    _, rows = train_in_process(ROOT / "cluster" / "tiny_dcpo.yaml", tmp_path / "run", *quick)
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert rows[0]["learner/loss"] == pytest.approx(math.log(2), abs=1e-6) and np.isfinite(rows[1]["learner/loss"])
