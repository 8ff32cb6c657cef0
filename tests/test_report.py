"""Run report PNGs: the reward curve and the sample grid."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from raygrpo.report import (
    CAPTION_H,
    MIN_TILE,
    PAD,
    STRIP_GAP,
    TITLE_H,
    GridRow,
    _fit,
    frame_strip,
    plot_reward_curve,
    sample_grid,
    save_gif,
)


def write_metrics(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_reward_curve(tmp_path):
    records = [
        {
            "step": s,
            "reward/color/mean": 0.5 + 0.02 * s,
            "reward/color/std": 0.1,
            "reward/jpeg/mean": -3.0 + 0.1 * s,
            "reward/total/mean": 0.3 + 0.01 * s,
        }
        for s in range(1, 11)
    ]
    metrics = write_metrics(tmp_path / "run" / "metrics.jsonl", records)
    out = plot_reward_curve(metrics, tmp_path / "plots" / "deep" / "reward.png")
    assert out == tmp_path / "plots" / "deep" / "reward.png" and out.is_file()
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert 300 <= image.width <= 3000 and 200 <= image.height <= 3000
        assert np.asarray(image.convert("L")).std() > 0


def test_reward_curve_tolerates_incomplete_lines(tmp_path):
    lines = [
        json.dumps({"step": 1, "reward/brightness/mean": 0.4}),
        json.dumps({"step": 2, "loss": 0.1}),  # no reward at all
        json.dumps({"reward/brightness/mean": 0.9}),  # no step
        json.dumps({"step": 3, "reward/brightness/mean": None, "reward/brightness/std": 0.1}),
        json.dumps({"step": 4, "reward/brightness/mean": 0.5, "reward/brightness/std": 0.05}),
        "",
        '{"step": 5, "reward/brigh',  # half-written last line of a running job
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(lines))
    out = plot_reward_curve(metrics, tmp_path / "reward.png")
    with Image.open(out) as image:
        assert np.asarray(image.convert("L")).std() > 0


def test_reward_curve_without_any_reward(tmp_path):
    metrics = write_metrics(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 0.3}])
    assert plot_reward_curve(metrics, tmp_path / "reward.png").is_file()


def test_sample_grid_size(tmp_path):
    rng = np.random.default_rng(0)
    rows = [
        GridRow(f"step {s}: a red apple", rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8), [f"{v:.3f}" for v in rng.random(4)])
        for s in (1, 2)
    ]
    out = sample_grid(rows, tmp_path / "grids" / "step_2.png")
    tile = max(MIN_TILE, 64)
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (PAD + 4 * (tile + PAD), PAD + 2 * (TITLE_H + PAD + tile + CAPTION_H + PAD))
        pixels = np.asarray(image.convert("RGB"))
    assert tuple(pixels[0, 0]) == (255, 255, 255)
    # Nearest-neighbour upscaling by 2: each source pixel becomes a 2x2 block of the same colour.
    top = PAD + TITLE_H + PAD
    np.testing.assert_array_equal(pixels[top : top + tile : 2, PAD : PAD + tile : 2], rows[0].images[0])
    np.testing.assert_array_equal(pixels[top + 1 : top + tile : 2, PAD + 1 : PAD + tile : 2], rows[0].images[0])


def test_sample_grid_wraps_long_rows(tmp_path):
    images = np.zeros((5, 64, 64, 3), dtype=np.uint8)
    out = sample_grid([GridRow("five", images, [])], tmp_path / "grid.png", max_cols=2)
    tile = MIN_TILE
    with Image.open(out) as image:
        assert image.size == (PAD + 2 * (tile + PAD), PAD + TITLE_H + PAD + math.ceil(5 / 2) * (tile + CAPTION_H + PAD))


def test_grid_row_validation():
    with pytest.raises(ValueError, match="captions"):
        GridRow("x", np.zeros((2, 8, 8, 3), dtype=np.uint8), ["only one"])
    with pytest.raises(ValueError, match="uint8"):
        GridRow("x", np.zeros((2, 8, 8, 3), dtype=np.float32), [])


def _video(frames: int, size: int = 32) -> np.ndarray:
    """``[F, H, W, 3]`` where frame f is filled with the grey level 10 * (f + 1), so frames can be told apart."""
    return np.stack([np.full((size, size, 3), 10 * (f + 1), dtype=np.uint8) for f in range(frames)])


def test_frame_strip_shows_evenly_spaced_frames_including_first_and_last():
    strip = frame_strip(_video(9), max_frames=4)
    assert strip.shape == (32, 4 * 32 + 3 * STRIP_GAP, 3)
    shown = [int(strip[0, k * (32 + STRIP_GAP), 0]) for k in range(4)]
    assert shown == [10, 40, 60, 90]  # frames 0, 3 (rint of 2.67), 5 (rint of 5.33), 8
    assert (strip[:, 32 : 32 + STRIP_GAP] == 255).all()  # white gap
    assert frame_strip(_video(2), max_frames=4).shape == (32, 2 * 32 + STRIP_GAP, 3)  # fewer frames than slots
    with pytest.raises(ValueError, match="video"):
        frame_strip(np.zeros((32, 32, 3), np.uint8))


def test_sample_grid_draws_videos_as_frame_strips(tmp_path):
    videos = np.stack([_video(5), _video(5)[::-1].copy()])  # [2, 5, 32, 32, 3]
    row = GridRow("step 1: a fox", videos, ["0.1", "0.2"])
    assert row.images.shape == (2, 32, 4 * 32 + 3 * STRIP_GAP, 3)
    out = sample_grid([row], tmp_path / "videos.png")
    factor = MIN_TILE // 32
    tile_w, tile_h = row.images.shape[2] * factor, 32 * factor
    with Image.open(out) as image:
        assert image.size == (PAD + 2 * (tile_w + PAD), PAD + TITLE_H + PAD + tile_h + CAPTION_H + PAD)
        pixels = np.asarray(image.convert("RGB"))
    top = PAD + TITLE_H + PAD
    assert pixels[top, PAD, 0] == 10 and pixels[top, PAD + tile_w - 1, 0] == 50  # first and last frame of video 0
    assert pixels[top, 2 * PAD + tile_w, 0] == 50  # video 1 runs backwards
    with pytest.raises(ValueError, match="videos"):
        GridRow("x", np.zeros((2, 5, 8, 8, 4), dtype=np.uint8))


def test_save_gif_round_trips_frames(tmp_path):
    video = _video(5)
    out = save_gif(video, tmp_path / "gifs" / "sample.gif", fps=10)
    with Image.open(out) as gif:
        assert gif.format == "GIF" and gif.n_frames == 5 and gif.size == (32, 32)
        assert gif.info["duration"] == 100 and gif.info["loop"] == 0
        levels = []
        for f in range(gif.n_frames):
            gif.seek(f)
            levels.append(int(np.asarray(gif.convert("RGB"))[0, 0, 0]))
    assert levels == [10, 20, 30, 40, 50]
    with pytest.raises(ValueError, match="uint8 video"):
        save_gif(video.astype(np.float32), tmp_path / "bad.gif")
    with pytest.raises(ValueError, match="fps"):
        save_gif(video, tmp_path / "bad.gif", fps=0)


def _draw_and_font():
    return ImageDraw.Draw(Image.new("RGB", (1, 1))), ImageFont.load_default()


def test_fit_keeps_short_text_and_cuts_long_text_at_the_last_fitting_character():
    draw, font = _draw_and_font()
    assert _fit(draw, font, "a red apple", 500) == "a red apple"
    text = "an astronaut riding a horse on the moon, " * 2500  # 102,500 characters
    fitted = _fit(draw, font, text, 300)
    assert fitted.endswith("...") and text.startswith(fitted[:-3])
    assert draw.textlength(fitted, font=font) <= 300
    # maximal: one more character of the prompt would not fit (bar a space, which the cut drops)
    longer = text[: len(fitted) - 3 + 1].rstrip() + "..."
    assert longer == fitted or draw.textlength(longer, font=font) > 300


def test_fit_puts_line_breaks_and_control_characters_on_one_line():
    draw, font = _draw_and_font()
    assert _fit(draw, font, "a red\napple\r\n\tin a\x00bowl", 500) == "a red apple in a bowl"
    # a prompt that is long only because of trailing whitespace is not marked as cut
    assert _fit(draw, font, "a red apple" + " " * 5000 + "\n", 500) == "a red apple"


def test_sample_grid_with_a_100k_character_prompt_is_fast_and_stays_in_its_title_line(tmp_path):
    prompt = "a very\nlong prompt " * 6000 + "END"  # ~108k characters with line breaks, as a .jsonl can hold
    images = np.zeros((3, 64, 64, 3), dtype=np.uint8)
    start = time.perf_counter()
    out = sample_grid([GridRow(f"step 1: {prompt}", images, [prompt] * 3)], tmp_path / "grid.png")
    assert time.perf_counter() - start < 2.0  # was hours: one full-length measurement per dropped character
    with Image.open(out) as image:
        pixels = np.asarray(image.convert("L"))
    assert pixels[PAD : PAD + TITLE_H].min() < 128  # the title is drawn
    assert (pixels[PAD + TITLE_H : PAD + TITLE_H + PAD] == 255).all()  # and only on its line: nothing between it and the tiles
