"""PNG/GIF outputs of a run: the reward curve, grids of sampled images (videos as frame strips), animated GIFs.

Both are written without a display. Matplotlib is used through ``Figure`` and the Agg canvas
directly rather than ``pyplot``, so that importing this module neither switches the process-wide
backend nor keeps figures alive in pyplot's global registry (a long run plots many times).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

MIN_TILE = 128  # pixels; generated images are often 64x64, too small to judge by eye
STRIP_FRAMES = 4  # frames of a video shown side by side in its grid tile (first and last always among them)
STRIP_GAP = 2  # white pixels between the frames of a strip (before upscaling)
PAD = 8  # between tiles and around the grid
TITLE_H = 18  # height of a row's title line
CAPTION_H = 16  # height of the caption line under each tile

_PREFIX, _SUFFIX, _STD = "reward/", "/mean", "/std"
_Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def plot_reward_curve(metrics_jsonl: Path, out_png: Path) -> Path:
    """Plot every ``reward/<name>/mean`` of a metrics file against ``step``, with a ±std band.

    Lines without a step, values that are not numbers and lines that are not JSON (such as a
    half-written last line of a running job) are skipped, so the curve can be drawn mid-run.
    """
    series = _read_reward_series(Path(metrics_jsonl))
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, points in sorted(series.items(), key=lambda kv: (kv[0] == "total", kv[0])):
        steps, means, stds = (np.array(col, dtype=np.float64) for col in zip(*sorted(points)))
        style = {"color": "black", "linewidth": 2.0} if name == "total" else {}
        (line,) = ax.plot(steps, means, label=name, **style)
        if np.isfinite(stds).any():
            ax.fill_between(steps, means - stds, means + stds, color=line.get_color(), alpha=0.2, linewidth=0)
    if series:
        ax.legend(loc="best")
    else:
        ax.text(0.5, 0.5, "no reward data yet", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="step", ylabel="reward (group mean)", title=f"Reward vs step ({Path(metrics_jsonl).parent.name or 'run'})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, Path(out_png))


def _read_reward_series(path: Path) -> dict[str, list[tuple[float, float, float]]]:
    """``{reward name: [(step, mean, std or NaN), ...]}`` from a metrics JSON-lines file."""
    series: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = _number(record.get("step")) if isinstance(record, dict) else math.nan
        if math.isnan(step):
            continue
        for key, value in record.items():
            if key.startswith(_PREFIX) and key.endswith(_SUFFIX) and not math.isnan(_number(value)):
                name = key[len(_PREFIX) : -len(_SUFFIX)]
                std = _number(record.get(f"{_PREFIX}{name}{_STD}"))
                series[name].append((step, _number(value), std))
    return dict(series)


def _number(value: object) -> float:
    """A finite float, or NaN for anything else (missing, null, text, bool, inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value) if math.isfinite(value) else math.nan


def _save_figure(fig: Figure, out_png: Path) -> Path:
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png


@dataclass
class GridRow:
    """One titled row of a sample grid, e.g. the group of one prompt at one step.

    Videos ``[N, F, H, W, 3]`` are shown as frame strips: each tile holds :data:`STRIP_FRAMES`
    evenly spaced frames side by side (see :func:`frame_strip`); ``images`` then holds the strips.
    """

    title: str
    images: np.ndarray  # [N, H, W, 3] uint8 images, or [N, F, H, W, 3] uint8 videos (stored as strips)
    captions: list[str] = field(default_factory=list)  # [N], or empty for none

    def __post_init__(self) -> None:
        if self.images.ndim not in (4, 5) or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(
                f"GridRow {self.title[:80]!r}: images must be uint8 [N, H, W, 3] (or videos [N, F, H, W, 3]), "
                f"got {self.images.dtype} {self.images.shape}"
            )
        if self.images.ndim == 5:
            self.images = np.stack([frame_strip(video) for video in self.images])  # [N, H, k*W + gaps, 3]
        if self.captions and len(self.captions) != len(self.images):
            raise ValueError(f"GridRow {self.title[:80]!r}: {len(self.captions)} captions for {len(self.images)} images")


def sample_grid(rows: list[GridRow], out_png: Path, max_cols: int = 8) -> Path:
    """Draw rows of images, each under its title and above its captions, on a white PNG.

    Images are upscaled by an integer factor (nearest neighbour, so pixels stay sharp) until their
    shorter side is at least ``MIN_TILE``. A row longer than ``max_cols`` wraps onto more lines
    under the same title rather than losing images. With ``c`` columns, tile size ``t`` and ``L``
    lines of tiles over all rows, the PNG is ``PAD + c * (t + PAD)`` wide and
    ``PAD + len(rows) * (TITLE_H + PAD) + L * (t + CAPTION_H + PAD)`` tall.
    """
    if not rows or max_cols < 1:
        raise ValueError("sample_grid needs at least one row and max_cols >= 1")
    tiles = [[_upscale(image) for image in row.images] for row in rows]
    tile_w = max((t.width for row in tiles for t in row), default=MIN_TILE)
    tile_h = max((t.height for row in tiles for t in row), default=MIN_TILE)
    cols = max(1, min(max_cols, max(len(row) for row in tiles)))
    lines = sum(math.ceil(len(row) / cols) for row in tiles)
    width = PAD + cols * (tile_w + PAD)
    height = PAD + len(rows) * (TITLE_H + PAD) + lines * (tile_h + CAPTION_H + PAD)
    canvas = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    y = PAD
    for row, row_tiles in zip(rows, tiles):
        y = _draw_row(canvas, draw, font, row, row_tiles, y, cols, (tile_w, tile_h))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png, format="PNG")
    return out_png


def _draw_row(
    canvas: Image.Image,
    draw: ImageDraw.ImageDraw,
    font: _Font,
    row: GridRow,
    tiles: list[Image.Image],
    y: int,
    cols: int,
    cell: tuple[int, int],
) -> int:
    """Draw one row's title, tiles and captions from height ``y``; returns where the next row starts."""
    tile_w, tile_h = cell
    draw.text((PAD, y), _fit(draw, font, row.title, canvas.width - 2 * PAD), fill="black", font=font)
    y += TITLE_H + PAD
    for i, tile in enumerate(tiles):
        x = PAD + (i % cols) * (tile_w + PAD)
        top = y + (i // cols) * (tile_h + CAPTION_H + PAD)
        canvas.paste(tile, (x + (tile_w - tile.width) // 2, top + (tile_h - tile.height) // 2))
        if row.captions:
            # Centred by measuring rather than with anchor=, which bitmap fonts do not support.
            caption = _fit(draw, font, row.captions[i], tile_w)
            draw.text((x + (tile_w - draw.textlength(caption, font=font)) / 2, top + tile_h + 2), caption, fill="black", font=font)
    return y + math.ceil(len(tiles) / cols) * (tile_h + CAPTION_H + PAD)


def frame_strip(video: np.ndarray, max_frames: int = STRIP_FRAMES, gap: int = STRIP_GAP) -> np.ndarray:
    """``[H, k*W + (k-1)*gap, 3]``: ``k = min(F, max_frames)`` frames of ``video [F, H, W, 3]`` side by side.

    The frames are ``round(linspace(0, F - 1, k))``, so the first and the last frame are always shown,
    separated by white columns ``gap`` pixels wide.
    """
    if video.ndim != 4 or video.shape[-1] != 3 or len(video) == 0:
        raise ValueError(f"frame_strip needs a video [F, H, W, 3] with at least one frame, got {video.shape}")
    index = np.unique(np.rint(np.linspace(0, len(video) - 1, min(len(video), max_frames))).astype(np.int64))
    height, width = video.shape[1:3]
    strip = np.full((height, len(index) * (width + gap) - gap, 3), 255, dtype=np.uint8)
    for k, frame in enumerate(index):
        strip[:, k * (width + gap) : k * (width + gap) + width] = video[frame]
    return strip


def save_gif(video: np.ndarray, path: Path, fps: float = 8.0) -> Path:
    """Write ``video [F, H, W, 3]`` uint8 as a looping animated GIF (PIL), ``fps`` frames per second.

    GIF frame durations are whole milliseconds (browsers round below 20 ms up), so the played rate is
    ``1000 / round(1000 / fps)``. Colours are quantised to GIF's 256-colour palettes per frame.
    """
    if not isinstance(video, np.ndarray) or video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or len(video) == 0:
        desc = f"{video.dtype} {video.shape}" if isinstance(video, np.ndarray) else type(video).__name__
        raise ValueError(f"save_gif needs a uint8 video [F, H, W, 3] with at least one frame, got {desc}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = [Image.fromarray(np.ascontiguousarray(frame)) for frame in video]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    return path


def _upscale(image: np.ndarray) -> Image.Image:
    tile = Image.fromarray(np.ascontiguousarray(image))
    factor = max(1, math.ceil(MIN_TILE / max(1, min(tile.size))))
    return tile.resize((tile.width * factor, tile.height * factor), Image.Resampling.NEAREST)


def _fit(draw: ImageDraw.ImageDraw, font: _Font, text: str, width: int) -> str:
    """``text`` on one line, cut short with "..." so that it fits in ``width`` pixels.

    Prompts can be long (100k characters have been seen) and hold line breaks, which ``textlength``
    refuses and ``text`` would draw over the tiles below. So: a glyph that takes room takes at least
    one pixel, hence no more than ``width`` characters can fit and the rest is dropped unmeasured;
    whitespace runs and unprintable characters become one space; and the longest prefix that fits
    with "..." is found by bisection. Cost: O(log width) measurements of at most ``width``
    characters, whatever the length of ``text`` (cutting one character per measurement was
    quadratic in it: hours for a 100k-character prompt).
    """
    visible = "".join(c if c.isprintable() else " " for c in text[: width + 1])
    line = " ".join(visible.split())
    dropped = text[width + 1 :]
    if (not dropped or dropped.isspace()) and draw.textlength(line, font=font) <= width:
        return line
    # Largest k with line[:k] + "..." fitting; widths grow with k, so bisect on k.
    low, high = 0, len(line)
    while low < high:
        middle = (low + high + 1) // 2
        if draw.textlength(line[:middle].rstrip() + "...", font=font) <= width:
            low = middle
        else:
            high = middle - 1
    return line[:low].rstrip() + "..."
