"""Per-step sample galleries on disk: what the controller writes every ``logging.sample_every`` steps and
what the run dashboard (services/dashboard) reads.

Layout of one run folder::

    <run_dir>/samples/step-000010/index.json     the step's groups, prompts, files and scores
    <run_dir>/samples/step-000010/g3-0.png       group 3, member 0 (an image)
    <run_dir>/samples/step-000010/g3-1.gif       (a video: an animated GIF, looping)

``index.json`` (format ``raygrpo.gallery/v1``)::

    {"format": "raygrpo.gallery/v1", "step": 10, "written_at": 1763900000.0,
     "groups": [{"group_id": 3, "prompt": "...", "policy_version": 9, "media_type": "image/png", "frames": null,
                 "samples": [{"member": 0, "file": "g3-0.png", "scores": {"jpeg": -3.1, "clip": null}, "total": -3.1}]}]}

A missing score (NaN) is ``null``. A step is written into a hidden temporary folder and renamed into
place, so a reader sees either the whole step or none of it, even while the run is writing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

logger = logging.getLogger(__name__)

FORMAT = "raygrpo.gallery/v1"
SAMPLES_DIR = "samples"
INDEX = "index.json"
GIF_FPS = 8  # frames per second of video GIFs


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def is_gallery_step(step: int, sample_every: int, last_step: int) -> bool:
    """Steps 1..last_step that get a gallery: the first, every ``sample_every``-th and the last (so a short run
    still shows its start and its end); none when ``sample_every`` is 0."""
    if sample_every <= 0:
        return False
    return step == 1 or step % sample_every == 0 or step == last_step


@dataclass
class GalleryEntry:
    """One prompt group of a step, as the controller hands it over."""

    group_id: int
    prompt: str
    policy_version: int
    media: np.ndarray  # [G, H, W, 3] uint8 images or [G, F, H, W, 3] uint8 videos
    scores: dict[str, np.ndarray]  # reward name -> [G] float32, NaN where missing
    total: np.ndarray  # [G] weighted total, NaN where missing

    def validate(self) -> None:
        """Raise ValueError naming the field and what is expected."""
        media = np.asarray(self.media)
        where = f"gallery entry of group {self.group_id}"
        if media.dtype != np.uint8 or media.ndim not in (4, 5) or media.shape[-1] != 3:
            raise ValueError(
                f"{where}: media must be uint8 [G, H, W, 3] images or [G, F, H, W, 3] videos, got {media.dtype} {list(media.shape)}"
            )
        size = media.shape[0]
        if size == 0:
            raise ValueError(f"{where}: media holds no samples")
        for name, values in {**{f"scores[{k!r}]": v for k, v in self.scores.items()}, "total": self.total}.items():
            if np.asarray(values).shape != (size,):
                raise ValueError(f"{where}: {name} must have one value per sample, shape [{size}], got {list(np.asarray(values).shape)}")


@dataclass(frozen=True)
class GallerySample:
    member: int
    file: str  # relative to the step folder
    scores: dict[str, float | None]  # None: missing
    total: float | None


@dataclass(frozen=True)
class GalleryGroup:
    group_id: int
    prompt: str
    policy_version: int
    media_type: str  # "image/png" or "image/gif"
    frames: int | None  # frames per video; None for images
    samples: list[GallerySample]


@dataclass(frozen=True)
class StepGallery:
    step: int
    path: Path  # the step folder
    written_at: float  # unix seconds
    groups: list[GalleryGroup]

    def file(self, sample: GallerySample) -> Path:
        return self.path / sample.file


def write_step_gallery(run_dir: Path, step: int, entries: list[GalleryEntry], fps: int = GIF_FPS) -> Path:
    """Write one step's gallery atomically; returns ``<run_dir>/samples/step-NNNNNN``.

    Writing the same step again (a resumed run repeating a step) replaces the earlier gallery.
    """
    if step < 0:
        raise ValueError(f"gallery step must be >= 0, got {step}")
    ids = [e.group_id for e in entries]
    if len(set(ids)) != len(ids):
        raise ValueError(f"gallery of step {step}: group ids repeat {sorted(ids)}; each group's files are named after its id")
    for entry in entries:
        entry.validate()
    samples = Path(run_dir) / SAMPLES_DIR
    samples.mkdir(parents=True, exist_ok=True)
    final = samples / step_dir_name(step)
    # The temporary folder starts with "." so readers skip it, and lives beside the final one so the rename stays on one filesystem.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=samples))
    try:
        index = {"format": FORMAT, "step": step, "written_at": time.time(), "groups": [_write_group(tmp, e, fps) for e in entries]}
        (tmp / INDEX).write_text(json.dumps(index, indent=1))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the dashboard may run as another user
        _swap_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_group(folder: Path, entry: GalleryEntry, fps: int) -> dict:
    media = np.asarray(entry.media)
    is_video = media.ndim == 5
    samples = []
    for member, item in enumerate(media):
        name = f"g{entry.group_id}-{member}.{'gif' if is_video else 'png'}"
        if is_video:
            # item: [F, H, W, 3]. Pillow merges identical consecutive frames into one longer frame: same playback.
            frames = [Image.fromarray(frame) for frame in item]
            frames[0].save(folder / name, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
        else:
            Image.fromarray(item).save(folder / name)  # item: [H, W, 3]
        scores = {k: _number(v[member]) for k, v in entry.scores.items()}
        samples.append({"member": member, "file": name, "scores": scores, "total": _number(entry.total[member])})
    return {
        "group_id": int(entry.group_id),
        "prompt": entry.prompt,
        "policy_version": int(entry.policy_version),
        "media_type": "image/gif" if is_video else "image/png",
        "frames": int(media.shape[1]) if is_video else None,
        "samples": samples,
    }


def _number(value) -> float | None:
    value = float(value)
    # Scores are float32: 7 significant digits hold all they carry (-2.698, not -2.697999954223633).
    return float(f"{value:.7g}") if math.isfinite(value) else None


def _swap_into_place(tmp: Path, final: Path) -> None:
    """rename(2) cannot replace a non-empty folder: move an old gallery aside first, then drop it."""
    if not final.exists():
        os.rename(tmp, final)
        return
    old = final.with_name(f".{final.name}.{os.getpid()}.old")
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def gallery_steps(run_dir: Path) -> list[int]:
    """Steps that have a complete gallery folder (cheap: no index is parsed)."""
    folder = Path(run_dir) / SAMPLES_DIR
    steps = []
    if folder.is_dir():
        for child in folder.iterdir():
            name = child.name
            if name.startswith("step-") and name[5:].isdigit() and (child / INDEX).is_file():
                steps.append(int(name[5:]))
    return sorted(steps)


def read_step_gallery(run_dir: Path, step: int) -> StepGallery | None:
    """One step's gallery, or None when it does not exist or its index cannot be read."""
    path = Path(run_dir) / SAMPLES_DIR / step_dir_name(step)
    try:
        index = json.loads((path / INDEX).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("skipping gallery %s: unreadable %s (%s)", path, INDEX, exc)
        return None
    if index.get("format") != FORMAT:
        logger.warning("skipping gallery %s: format %r, expected %r", path, index.get("format"), FORMAT)
        return None
    try:
        groups = [
            GalleryGroup(
                group_id=int(g["group_id"]),
                prompt=str(g["prompt"]),
                policy_version=int(g["policy_version"]),
                media_type=str(g["media_type"]),
                frames=None if g.get("frames") is None else int(g["frames"]),
                samples=[GallerySample(int(s["member"]), str(s["file"]), dict(s["scores"]), s["total"]) for s in g["samples"]],
            )
            for g in index["groups"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        logger.warning("skipping gallery %s: malformed %s (%s)", path, INDEX, exc)
        return None
    return StepGallery(step=int(index.get("step", step)), path=path, written_at=float(index.get("written_at", 0.0)), groups=groups)


def read_group_media(gallery: StepGallery, group: GalleryGroup) -> np.ndarray:
    """A group's samples back as arrays: ``[G, H, W, 3]`` uint8 images, or ``[G, F, H, W, 3]`` for GIF videos
    (their frames as the GIF's palette left them)."""
    items = []
    for sample in group.samples:
        with Image.open(gallery.file(sample)) as image:
            if group.media_type != "image/gif":
                items.append(np.asarray(image.convert("RGB")))
                continue
            frames, durations = [], []
            for frame in ImageSequence.Iterator(image):
                frames.append(np.asarray(frame.convert("RGB")))
                durations.append(frame.info.get("duration") or 1)
        # Pillow merged repeated frames into longer ones: sample the playback at the video's own frame count.
        count = group.frames or len(frames)
        starts = np.cumsum([0, *durations[:-1]])
        times = (np.arange(count) + 0.5) * sum(durations) / count
        items.append(np.stack(frames)[np.searchsorted(starts, times, side="right") - 1])  # [F, H, W, 3]
    return np.stack(items)


def read_galleries(run_dir: Path) -> list[StepGallery]:
    """Every readable step gallery of a run, by step."""
    galleries = (read_step_gallery(run_dir, step) for step in gallery_steps(run_dir))
    return [g for g in galleries if g is not None]
