"""The run dashboard: a FastAPI app over an output root (read-only).

Pages (static HTML + a small hand-written script that draws SVG charts; no CDN, works offline):

    GET /                                   the runs under the root
    GET /runs/{name}                        one run: reward curves, timings per role, learner statistics, sample gallery

JSON API (what the pages read):

    GET /api/runs                           [{name, started_at, updated_at, steps, last_reward, status, status_reason}]
    GET /api/runs/{name}                    the same for one run, plus its gallery steps and the images in its folder
    GET /api/runs/{name}/metrics            {steps: [..], series: {key: [..]}} from metrics.jsonl (null: absent / not finite)
    GET /api/runs/{name}/samples            {steps: [..]} steps with a gallery
    GET /api/runs/{name}/samples/{step}     one step's gallery: groups, prompts, each sample's scores and media URL
    GET /api/runs/{name}/guard              the reward-hacking guard: its gallery steps and events (<run>/guard/events.jsonl)
    GET /api/runs/{name}/guard/samples/{step}  one guard round's gallery of held-out samples (as /samples/{step})
    GET /runs/{name}/files/{path}           an image of the run folder (PNG, GIF, JPEG); nothing outside the run folder
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse

from raygrpo.gallery import gallery_steps, read_step_gallery
from raygrpo.guard.layout import GUARD_DIR
from services.dashboard.runs import METRICS, RunNotFound, list_runs, read_guard_events, read_metrics, run_dir, run_info

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MEDIA_TYPES = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
STALE_AFTER_S = 600.0  # an unfinished run with no new metrics line for this long counts as aborted


def create_app(root: Path, stale_after_s: float = STALE_AFTER_S) -> FastAPI:
    root = Path(root).resolve()
    app = FastAPI(title="raygrpo dashboard", docs_url="/api/docs", redoc_url=None)

    def folder(name: str) -> Path:
        try:
            return run_dir(root, name)
        except RunNotFound:
            raise HTTPException(404, f"no run {name!r} under {root}") from None

    @app.get("/", include_in_schema=False)
    def index_page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/runs/{name}", include_in_schema=False)
    def run_page(name: str) -> FileResponse:
        folder(name)
        return FileResponse(STATIC / "run.html", media_type="text/html")

    @app.get("/static/{file}", include_in_schema=False)
    def static(file: str) -> FileResponse:
        path = STATIC / file
        if file not in {"dashboard.js", "dashboard.css"} or not path.is_file():
            raise HTTPException(404, "not found")
        return FileResponse(path, media_type="text/javascript" if file.endswith(".js") else "text/css")

    @app.get("/api/runs")
    def runs() -> dict:
        return {"root": str(root), "runs": [asdict(r) for r in list_runs(root, stale_after_s)]}

    @app.get("/api/runs/{name}")
    def run(name: str) -> dict:
        path = folder(name)
        images = sorted(
            f.name for f in path.iterdir() if f.suffix.lower() in MEDIA_TYPES and f.is_file() and not f.is_symlink()
        )  # reward_curve.png, samples.png
        return {**asdict(run_info(path, stale_after_s)), "sample_steps": gallery_steps(path), "images": images}

    @app.get("/api/runs/{name}/metrics")
    def metrics(name: str) -> dict:
        return {"run": name, **asdict(read_metrics(folder(name) / METRICS))}

    @app.get("/api/runs/{name}/samples")
    def sample_steps(name: str) -> dict:
        return {"run": name, "steps": gallery_steps(folder(name))}

    @app.get("/api/runs/{name}/samples/{step}")
    def samples(name: str, step: int) -> dict:
        return gallery_json(name, folder(name), step, "")

    @app.get("/api/runs/{name}/guard")
    def guard(name: str) -> dict:
        path = folder(name)
        return {"run": name, "steps": gallery_steps(path / GUARD_DIR), "events": read_guard_events(path)}

    @app.get("/api/runs/{name}/guard/samples/{step}")
    def guard_samples(name: str, step: int) -> dict:
        return gallery_json(name, folder(name), step, GUARD_DIR)

    def gallery_json(name: str, path: Path, step: int, under: str) -> dict:
        """One gallery of the run (``under``: "" for the training samples, "guard" for the guard's held-out ones)."""
        gallery = read_step_gallery(path / under, step)
        if gallery is None:
            raise HTTPException(404, f"run {name!r} has no {under + ' ' if under else ''}gallery for step {step}")
        base = f"/runs/{quote(name)}/files/{gallery.path.relative_to(path).as_posix()}"
        groups = []
        for group in gallery.groups:
            items = [{**asdict(s), "url": f"{base}/{quote(s.file)}"} for s in group.samples]
            groups.append({**asdict(group), "samples": items})
        return {"run": name, "step": gallery.step, "written_at": gallery.written_at, "groups": groups}

    @app.get("/runs/{name}/files/{relative:path}")
    def media(name: str, relative: str) -> FileResponse:
        base = folder(name).resolve()
        # Resolve symlinks and ".." first, then demand the result still lies inside the run folder.
        target = (base / relative).resolve()
        if not target.is_relative_to(base) or target.suffix.lower() not in MEDIA_TYPES or not target.is_file():
            raise HTTPException(404, "not found")
        return FileResponse(target, media_type=MEDIA_TYPES[target.suffix.lower()])

    return app
