"""The on-disk sample gallery: what the controller writes every logging.sample_every steps, read back as written."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from raygrpo.config import ConfigError, LoggingConfig, load_config
from raygrpo.gallery import (
    GalleryEntry, gallery_steps, is_gallery_step, read_galleries, read_group_media, read_step_gallery, write_step_gallery,
)  # fmt: skip


def _images(g: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(g, 16, 24, 3), dtype=np.uint8)  # [G, H, W, 3]


def _entry(group_id: int = 5, media: np.ndarray | None = None) -> GalleryEntry:
    media = _images() if media is None else media
    g = media.shape[0]
    jpeg = np.linspace(-3.0, -2.0, g).astype(np.float32)
    color = np.full(g, 0.5, np.float32)
    color[1] = np.nan  # a missing score
    return GalleryEntry(
        group_id, "a red fox", policy_version=7, media=media, scores={"jpeg": jpeg, "color": color}, total=jpeg + 0.5 * color
    )


def test_images_round_trip_with_scores_and_missing_values(tmp_path):
    entry = _entry()
    folder = write_step_gallery(tmp_path, 10, [entry, _entry(6)])
    assert folder == tmp_path / "samples" / "step-000010"

    (gallery,) = read_galleries(tmp_path)
    assert gallery.step == 10 and [g.group_id for g in gallery.groups] == [5, 6]
    group = gallery.groups[0]
    assert (group.prompt, group.policy_version, group.media_type, group.frames) == ("a red fox", 7, "image/png", None)
    assert [s.member for s in group.samples] == [0, 1, 2]
    for member, sample in enumerate(group.samples):
        with Image.open(gallery.file(sample)) as image:
            assert image.format == "PNG"
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), entry.media[member])  # PNG is lossless
        assert sample.scores["jpeg"] == pytest.approx(float(entry.scores["jpeg"][member]))
    assert group.samples[1].scores["color"] is None and group.samples[1].total is None  # NaN -> null, never 0
    assert group.samples[0].total == pytest.approx(-3.0 + 0.25)
    json.loads((folder / "index.json").read_text())  # strict JSON: no NaN literals


def test_videos_become_looping_gifs_with_every_frame(tmp_path):
    frames = np.zeros((2, 5, 8, 8, 3), np.uint8)  # [G, F, H, W, 3]
    for f in range(5):
        frames[:, f] = 50 * f  # every frame differs, so none is merged away
    write_step_gallery(tmp_path, 3, [_entry(1, frames)])
    group = read_step_gallery(tmp_path, 3).groups[0]
    assert (group.media_type, group.frames) == ("image/gif", 5)
    with Image.open(tmp_path / "samples" / "step-000003" / group.samples[0].file) as gif:
        assert gif.format == "GIF" and gif.n_frames == 5 and gif.info.get("loop") == 0
        gif.seek(4)
        assert np.asarray(gif.convert("RGB"))[0, 0, 0] == pytest.approx(200, abs=2)


def test_rewriting_a_step_replaces_it_and_leaves_no_temporary_folders(tmp_path):
    write_step_gallery(tmp_path, 4, [_entry(1), _entry(2)])
    write_step_gallery(tmp_path, 4, [_entry(9)])  # a resumed run repeats step 4
    (gallery,) = read_galleries(tmp_path)
    assert [g.group_id for g in gallery.groups] == [9]
    assert sorted(p.name for p in gallery.path.iterdir()) == ["g9-0.png", "g9-1.png", "g9-2.png", "index.json"]
    assert [p.name for p in (tmp_path / "samples").iterdir()] == ["step-000004"]


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    write_step_gallery(tmp_path, 1, [_entry()])

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        write_step_gallery(tmp_path, 2, [_entry()])
    assert [p.name for p in (tmp_path / "samples").iterdir()] == ["step-000001"]
    assert gallery_steps(tmp_path) == [1]


def test_readers_skip_half_written_and_corrupt_steps(tmp_path):
    write_step_gallery(tmp_path, 2, [_entry()])
    samples = tmp_path / "samples"
    (samples / ".step-000003.abc.tmp").mkdir()  # a writer mid-way: hidden, no index yet
    (samples / "step-000004").mkdir()  # no index.json
    (samples / "step-000005").mkdir()
    (samples / "step-000005" / "index.json").write_text('{"format": "raygrpo.gallery/v1", "gro')  # truncated
    (samples / "notes.txt").write_text("not a step")
    assert gallery_steps(tmp_path) == [2, 5]
    assert read_step_gallery(tmp_path, 5) is None
    assert [g.step for g in read_galleries(tmp_path)] == [2]
    assert read_galleries(tmp_path / "no-such-run") == []


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (GalleryEntry(1, "p", 0, np.zeros((2, 8, 8, 3), np.float32), {}, np.zeros(2)), "uint8"),
        (GalleryEntry(1, "p", 0, np.zeros((2, 8, 8), np.uint8), {}, np.zeros(2)), r"\[G, H, W, 3\]"),
        (GalleryEntry(1, "p", 0, np.zeros((2, 8, 8, 3), np.uint8), {"jpeg": np.zeros(3)}, np.zeros(2)), r"scores\['jpeg'\].*\[2\]"),
        (GalleryEntry(1, "p", 0, np.zeros((2, 8, 8, 3), np.uint8), {}, np.zeros(1)), r"total.*\[2\]"),
    ],
)
def test_bad_entries_fail_naming_the_field(tmp_path, entry, message):
    with pytest.raises(ValueError, match=message):
        write_step_gallery(tmp_path, 1, [entry])
    assert gallery_steps(tmp_path) == []


def test_repeated_group_ids_are_refused(tmp_path):
    with pytest.raises(ValueError, match="group ids repeat"):
        write_step_gallery(tmp_path, 1, [_entry(3), _entry(3)])


def test_gallery_files_are_readable_by_other_users(tmp_path):
    folder = write_step_gallery(tmp_path, 1, [_entry()])
    assert os.stat(folder).st_mode & 0o055 == 0o055


def test_gallery_schedule():
    assert [s for s in range(1, 26) if is_gallery_step(s, 10, 25)] == [1, 10, 20, 25]
    assert not any(is_gallery_step(s, 0, 25) for s in range(1, 26))


def test_logging_section_defaults_and_validation(tmp_path):
    base = "rewards: [{name: jpeg, kind: jpeg_compressibility}]\ndata: {prompts: [a cat]}\n"
    path = tmp_path / "c.yaml"
    path.write_text(base + "logging: {sample_every: 5, sample_groups: 1, wandb_project: demo}\n")
    logging = load_config(path).logging
    assert (logging.sample_every, logging.sample_groups, logging.tensorboard, logging.wandb_project) == (5, 1, True, "demo")
    assert LoggingConfig() == LoggingConfig(sample_every=10, sample_groups=2, tensorboard=True, wandb_project=None)
    path.write_text(base + "logging: {sample_groups: 0}\n")
    with pytest.raises(ConfigError, match="sample_groups"):
        load_config(path)


def test_a_gallery_reads_back_as_arrays_for_the_report(tmp_path):
    """What samples.png shows of a step a resumed run did not see: the PNGs exactly, GIF videos at their frame count."""
    images = _images(3, seed=4)
    write_step_gallery(tmp_path, 1, [_entry(2, images)])
    gallery = read_step_gallery(tmp_path, 1)
    np.testing.assert_array_equal(read_group_media(gallery, gallery.groups[0]), images)
    video = np.zeros((2, 6, 8, 8, 3), np.uint8)  # [G, F, H, W, 3]; frames 0-2 and 3-5 equal, so Pillow merges them
    video[:, 3:] = 200
    write_step_gallery(tmp_path, 2, [_entry(3, video)])
    gallery = read_step_gallery(tmp_path, 2)
    back = read_group_media(gallery, gallery.groups[0])
    assert back.shape == video.shape
    np.testing.assert_allclose(back.astype(int), video.astype(int), atol=8)  # the GIF palette may shift a grey level
