"""What a run leaves for people to look at: per-step galleries, ``samples.png``, ``reward_curve.png`` and
the exported diffusers pipeline (``<run>/export``).

The controller hands over each step's scored groups (:meth:`RunOutputs.after_step`) and, at the end, the
final checkpoint (:meth:`RunOutputs.finish`). Media are fetched from the object store only for the
groups shown, only on the steps that show them.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from raygrpo.actor_group import get
from raygrpo.config import Config
from raygrpo.contracts import GroupMedia, ScoredGroup
from raygrpo.checkpoint import write_run_state
from raygrpo.errors import RunAborted
from raygrpo.export import EXPORT_FILE, export_pipeline
from raygrpo.gallery import GalleryEntry, is_gallery_step, read_group_media, read_step_gallery, write_step_gallery
from raygrpo.report import GridRow, plot_reward_curve, sample_grid

logger = logging.getLogger(__name__)


class ExportFailed(RuntimeError):
    """The trained weights are saved, but the diffusers pipeline could not be written; the message says why and how to retry."""


def fetch_media(refs: list) -> list[GroupMedia]:
    """GroupMedia per entry; an entry that is a list of parts' refs comes back as one group, parts joined in order."""
    flat = [r for ref in refs for r in (ref if isinstance(ref, list) else [ref])]
    fetched = iter(get(flat))
    medias = []
    for ref in refs:
        parts = [next(fetched) for _ in (ref if isinstance(ref, list) else [ref])]
        images = np.concatenate([p.images for p in parts]) if len(parts) > 1 else parts[0].images
        medias.append(GroupMedia(group=parts[0].group, images=images))
    return medias


class RunOutputs:
    def __init__(self, config: Config, run_dir: Path):
        self.config, self.run_dir = config, run_dir
        self.weights = np.array([r.weight for r in config.rewards], np.float32)  # [K]
        self.grid: dict[int, list[ScoredGroup]] = {}  # first and last step: the groups samples.png shows

    def after_step(self, step: int, groups: list[ScoredGroup]) -> None:
        """Keep the groups samples.png shows (first and last step) and write the step's gallery when it has one."""
        last = self.config.train.steps
        groups = [g for g in groups if g.evaluated]  # an offline pair trained without evaluation samples has no media
        if step in (1, last):
            self.grid[step] = groups[: self.config.train.sample_grid_groups]
        if is_gallery_step(step, self.config.logging.sample_every, last):
            self._write_gallery(step, groups[: self.config.logging.sample_groups])

    def _scores(self, group: ScoredGroup) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Per reward the members' scores (NaN where missing), and the weighted total ``[G]``."""
        values = {r.name: np.where(group.scores[r.name].valid, group.scores[r.name].values, np.nan).astype(np.float32) for r in self.config.rewards}
        total = sum(w * values[r.name] for w, r in zip(self.weights, self.config.rewards))
        return values, total

    def _write_gallery(self, step: int, chosen: list[ScoredGroup]) -> None:
        """Every sample of the chosen groups with its scores (raygrpo/gallery.py; the dashboard shows them)."""
        entries = []
        for group, media in zip(chosen, fetch_media([g.media for g in chosen])):
            values, total = self._scores(group)
            g = group.group
            entries.append(GalleryEntry(g.group_id, g.prompt, g.policy_version, media.images, values, total))
        write_step_gallery(self.run_dir, step, entries)

    def write_report(self) -> None:
        """``reward_curve.png`` from metrics.jsonl, and ``samples.png``: the first and the last step's groups with their totals."""
        plot_reward_curve(self.run_dir / "metrics.jsonl", self.run_dir / "reward_curve.png")
        rows = []
        for step in sorted({1, self.config.train.steps}):
            if step not in self.grid:
                rows += self._rows_from_gallery(step)  # a resumed run did not see that step
                continue
            groups = self.grid[step]
            for group, media in zip(groups, fetch_media([g.media for g in groups])):
                _, total = self._scores(group)
                rows.append(GridRow(f"step {step}: {group.group.prompt}", media.images, [f"{t:.3f}" for t in total]))
        sample_grid(rows, self.run_dir / "samples.png")

    def _rows_from_gallery(self, step: int) -> list[GridRow]:
        """The step's rows from its gallery on disk (``logging.sample_groups`` groups of it), or none when it has no gallery."""
        gallery = read_step_gallery(self.run_dir, step)
        if gallery is None:
            return []
        rows = []
        for group in gallery.groups[: self.config.train.sample_grid_groups]:
            captions = ["–" if s.total is None else f"{s.total:.3f}" for s in group.samples]
            rows.append(GridRow(f"step {step}: {group.prompt}", read_group_media(gallery, group), captions))
        return rows

    def finish(self, checkpoint: Path) -> None:
        """The report and the export of a trained run. An export that fails marks the run aborted with the
        reason and raises :class:`~raygrpo.errors.RunAborted` (the trained weights stay in ``checkpoint``)."""
        self.write_report()
        try:
            self.export(checkpoint)
        except ExportFailed as exc:
            write_run_state(self.run_dir, "aborted", step=self.config.train.steps, checkpoint=checkpoint.name, reason=str(exc))
            raise RunAborted(str(exc)) from None

    def export(self, checkpoint: Path) -> None:
        """``<run>/export``: the trained model as a diffusers pipeline folder (or a LoRA file), when the base
        pipeline is on this machine; otherwise the log says the command that makes it. Any failure raises
        :class:`ExportFailed` (the run is then marked aborted with the reason; the weights stay in ``checkpoint``)."""
        pretrained = self.config.model.pretrained
        command = f"python -m raygrpo.export {checkpoint} {self.run_dir / 'export'} --pretrained {pretrained}"
        if pretrained != "tiny-random" and not Path(pretrained).is_dir():
            logger.info("to get a diffusers pipeline folder of the trained model run: %s", command)
            return
        out = self.run_dir / "export"
        if (out / EXPORT_FILE).is_file():
            shutil.rmtree(out)  # this run's own export, from an attempt that stopped before the run was marked finished
        try:
            export_pipeline(pretrained, checkpoint, out, family=self.config.model.family)
        except Exception as exc:  # noqa: BLE001 - whatever broke, the run must not end as finished
            raise ExportFailed(
                f"the trained weights are in {checkpoint}, but exporting a diffusers pipeline failed ({type(exc).__name__}: {exc}); "
                f"fix the cause and run: {command}"
            ) from exc
