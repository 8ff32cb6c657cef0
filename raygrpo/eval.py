"""Evaluate a trained checkpoint against its base model on held-out prompts.

    python -m raygrpo.eval CONFIG [--checkpoint DIR] [--prompts FILE] [--num-steps N] [--sampler euler|dpmpp_2m]
                                  [--best-of-n N] [--seed S] [--out DIR] [key.path=value ...]

What is measured, for the base model and (with ``--checkpoint``) the trained one:

* prompts: ``--prompts`` (a .txt file, one per line, or a .parquet file with a ``prompt`` column), else
  ``data.eval_prompts`` when the config has it, else the training prompts (``data``). Image editing and
  image-to-video (flux_kontext, qwen_image_edit, wan_i2v) need a conditioning image per prompt: a .jsonl of
  ``{"prompt", "image"}`` lines or a .parquet with an ``image`` column (raygrpo/data/prompts.py), encoded with its
  prompt as in training; rewards that want it (``edit_fidelity``, ``send_reference: true``) get it as the reference;
* sampling: a deterministic ODE solver (``raygrpo.sampling.make_ode_solver``: Euler, or DPM-Solver++(2M)
  on diffusers' flow-DPM grid) over the whole grid of ``--num-steps`` steps (default
  ``rollout.num_steps``), with the rollout's guidance and shift. Training may sample with an SDE and
  train on a fraction of the steps; evaluation always walks every step of the deterministic path;
* the same initial noise for the same prompt in both models: prompt ``p``'s ``N`` noises come from
  ``SeedSequence([seed, p])``, so the two rows differ only by the network's weights;
* rewards: every configured reward, built in this process (``make_reward``; HTTP rewards call their
  server from here). Raw scores: a reward's ``threshold`` turns training feedback binary and is not
  applied. ``total = sum_k weight_k * score_k``; a sample with a missing score has no total;
* Best-of-N inference scaling (``--best-of-n N``): ``N`` samples per prompt; per prompt the sample
  with the highest total is kept, and the mean of those maxima is reported beside the mean over all
  samples (their expectation for one sample). ``E[max of N] >= E[one]``, so the gap is what
  inference-time search buys at ``N`` times the sampling cost.

Writes ``eval.json`` (settings, per-model summaries, per-prompt scores), ``samples.png`` (the first
prompts' samples of both models with their totals), and prints a markdown table::

    | model      | jpeg (mean ± std)  | total   | best-of-4 total | missing |
    | base       | -3.912 ± 0.210     | -3.912  | -3.701          | 0       |
    | checkpoint | -2.633 ± 0.144     | -2.633  | -2.498          | 0       |
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from raygrpo.config import Config, ConfigError, DataConfig, load_config
from raygrpo.contracts import ConditioningBatch
from raygrpo.data.prompts import PromptFileError, PromptImages, load_prompt_images, load_prompts
from raygrpo.export import LORA_WEIGHT_NAME, ExportError, TrainedCheckpoint, check_network_config, read_checkpoint
from raygrpo.runtime import torch_dtype
from raygrpo.sampling import ODE_SOLVERS, make_ode_solver

if TYPE_CHECKING:
    from raygrpo.reward import Reward

# The reward models and the figures (matplotlib) are imported where they are used, not here: a rollout actor imports
# this module for its held-out samples (raygrpo/guard/sampling.py: sample_final), which score and draw nothing, and the
# two imports cost it about 0.5 s of CPU at every start.

logger = logging.getLogger(__name__)


class EvalError(ValueError):
    """Input the evaluation cannot run on (missing checkpoint or prompts, a foreign checkpoint); says what to fix."""


@dataclass(frozen=True)
class EvalSettings:
    prompts: list[str]
    sampler: str  # one of ODE_SOLVERS
    num_steps: int
    shift: float
    best_of_n: int = 1  # samples per prompt
    seed: int = 0
    batch_size: int = 8  # samples per forward
    grid_prompts: int = 4  # prompts shown in samples.png
    images: PromptImages | None = None  # the prompts' conditioning images (editing, image-to-video); None: text only


@dataclass
class ModelResult:
    """Scores of one model on every prompt: ``scores[name]`` and ``totals`` are ``[P, N]`` (NaN = missing)."""

    name: str
    scores: dict[str, np.ndarray]
    totals: np.ndarray
    grid_images: list[np.ndarray] = field(default_factory=list)  # [N, H, W, 3] uint8 of the first grid_prompts prompts
    seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        """Means and stds over all samples, the Best-of-N mean, and the count of samples without a total."""
        out: dict[str, float] = {}
        for name, values in self.scores.items():
            out[f"{name}/mean"], out[f"{name}/std"] = _nanmean(values), _nanstd(values)
        out["total/mean"], out["total/std"] = _nanmean(self.totals), _nanstd(self.totals)
        valid = ~np.isnan(self.totals).all(axis=1)  # [P] prompts with at least one scored sample
        best = np.nanmax(self.totals[valid], axis=1) if valid.any() else np.array([])  # [P']
        out["best_of_n/mean"] = _nanmean(best)
        out["missing"] = float(np.isnan(self.totals).sum())
        out["seconds"] = self.seconds
        return out


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _nanstd(values: np.ndarray) -> float:
    return float(np.nanstd(values)) if np.isfinite(values).any() else float("nan")


# ----------------------------------------------------------------------------------------- inputs
def eval_prompts(config: Config, prompt_file: str | None) -> tuple[list[str], PromptImages | None]:
    """The prompts and their conditioning images (None: text only) of ``prompt_file``, else of ``data.eval_prompts``
    (when the config has that field), else of the training data; checked against the family (:func:`conditioning_images`)."""
    if prompt_file is not None:
        if not Path(prompt_file).is_file():
            raise EvalError(f"--prompts: {prompt_file!r} does not exist (a .txt, .jsonl or .parquet file of prompts)")
        source, where = DataConfig(prompt_file=prompt_file), "--prompts"
    elif held_out := getattr(config.data, "eval_prompts", None):
        source = DataConfig(prompts=list(held_out)) if isinstance(held_out, list) else DataConfig(prompt_file=held_out)
        where = "data.eval_prompts"
    else:
        source, where = config.data, "data"
    try:
        return load_prompts(source), conditioning_images(config, source, where)
    except PromptFileError as exc:
        raise EvalError(str(exc)) from None


def conditioning_images(config: Config, source: DataConfig, where: str) -> PromptImages | None:
    """The conditioning images of prompt ``source`` (each decoded once here, to fail early), or None for a text-only
    source; PromptFileError naming ``where`` unless image editing and image-to-video families have one per prompt and
    text-conditioned families none."""
    from raygrpo.models import IMAGE_CONDITIONED_FAMILIES

    family = config.model.family
    images = load_prompt_images(source)
    if family in IMAGE_CONDITIONED_FAMILIES and images is None:
        raise PromptFileError(
            f"{where}: model.family={family!r} is conditioned on an image and needs one per prompt: give a .jsonl of "
            '{"prompt": ..., "image": path} lines or a .parquet with an image column'
        )
    if family not in IMAGE_CONDITIONED_FAMILIES and images is not None:
        raise PromptFileError(f"{where}: the prompts come with images, but model.family={family!r} is conditioned on text only")
    if images is not None:
        images.check()
    return images


def build_rewards(config: Config) -> list[Reward]:
    from raygrpo.reward import make_reward

    rewards = []
    for i, reward in enumerate(config.rewards):
        try:
            rewards.append(make_reward(reward.kind, reward.params))
        except (ValueError, TypeError) as exc:
            raise EvalError(f"rewards.{i} ({reward.name}): {exc}") from None
    return rewards


def load_base_model(config: Config, device: str):
    from raygrpo.models import ModelNotFoundError, load_model

    try:
        return load_model(
            config.model.family,
            config.model.pretrained,
            torch_dtype=torch_dtype(config.model.dtype),
            device=device,
            height=config.model.height,
            width=config.model.width,
            guidance_scale=config.model.guidance_scale,
            max_sequence_length=config.model.max_sequence_length,
            num_frames=config.model.num_frames,  # video families: the run's frames (None: the family's default)
            train_expert=config.model.train_expert,  # Wan 2.2 A14B: the run's trained expert, the one a checkpoint replaces
        )
    except ModelNotFoundError as exc:
        raise EvalError(f"model.pretrained: {exc}") from None


def open_checkpoint(folder: str | Path, config: Config) -> TrainedCheckpoint:
    """Read a checkpoint folder and check what can be checked before any model loads."""
    try:
        checkpoint = read_checkpoint(folder)
    except ExportError as exc:
        raise EvalError(f"--checkpoint: {exc}") from None
    family = checkpoint.state.get("family")
    if family is not None and family != config.model.family:
        raise EvalError(f"--checkpoint {folder} was trained with model.family={family!r}, the config says {config.model.family!r}")
    recorded = checkpoint.state.get("pretrained")
    if recorded is not None and recorded != config.model.pretrained:
        logger.warning("checkpoint %s was trained from %r; the config's base model is %r", folder, recorded, config.model.pretrained)
    return checkpoint


def _network(model, checkpoint: TrainedCheckpoint) -> torch.nn.Module:
    network = getattr(model, checkpoint.component, None)
    return model.transformer if network is None else network  # adapters may keep a UNet under .transformer


def _check_fits(model, checkpoint: TrainedCheckpoint) -> None:
    if checkpoint.component != model.network_component:
        # Wan 2.2 A14B's experts share one architecture: the config check below would pass the other expert's weights.
        raise EvalError(
            f"--checkpoint {checkpoint.folder} holds a trained {checkpoint.component}, but the model loaded from the config trains "
            f"its {model.network_component}: for Wan 2.2's two experts set model.train_expert as the run did (high: transformer, "
            "low: transformer_2)"
        )
    network = _network(model, checkpoint)
    try:
        check_network_config(checkpoint, {**network.config, "_class_name": type(network).__name__})
    except ExportError as exc:
        raise EvalError(f"--checkpoint: {exc}") from None


def load_checkpoint_weights(model, checkpoint: TrainedCheckpoint) -> None:
    """Put the checkpoint's weights into ``model``'s network in place (full weights, or the LoRA adapter)."""
    network = _network(model, checkpoint)
    _check_fits(model, checkpoint)
    try:
        if checkpoint.lora:
            network.load_lora_adapter(str(checkpoint.network_folder), weight_name=LORA_WEIGHT_NAME, adapter_name="raygrpo", prefix=None)
            return
        trained = type(network).from_pretrained(checkpoint.network_folder, torch_dtype=network.dtype)
        network.load_state_dict(trained.state_dict(), strict=True)
    except (RuntimeError, ValueError, OSError) as exc:
        raise EvalError(
            f"--checkpoint {checkpoint.folder}: its weights do not load into the base {type(network).__name__}: {exc}"
        ) from None


# --------------------------------------------------------------------------------------- sampling
def prompt_generator(seed: int, prompt_index: int) -> torch.Generator:
    """The CPU generator of one prompt's initial noise; the same for every model evaluated."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, prompt_index]).generate_state(1)[0]))


@torch.inference_mode()
def sample_final(
    model, prompt: str, noise: torch.Tensor, sigmas: torch.Tensor, sampler: str, batch_size: int, image: np.ndarray | None = None
) -> tuple[torch.Tensor, np.ndarray]:
    """Integrate the flow ODE from ``noise [N, ...]`` over ``sigmas [T+1]``: the final latents ``[N, ...]`` (float32,
    CPU) and their decoded images ``[N, H, W, 3]`` uint8. ``image``: the prompt's conditioning image ``[H0, W0, 3]``
    uint8 (editing, image-to-video), encoded with it as the rollout worker does."""
    cond = model.encode_prompt(prompt, image)
    latents, images = [], []
    for chunk in noise.split(batch_size):
        solver = make_ode_solver(sampler, sigmas)  # stateful (DPM-Solver++ keeps its history): one per loop
        batch = ConditioningBatch.of(cond, len(chunk), model.device)
        x = chunk.to(model.device, torch.float32)  # [B, ...]
        for i in range(len(sigmas) - 1):
            v = model.velocity(x, sigmas[i].expand(len(x)), batch)  # [B, ...] float32
            x = solver.step(x, v, i)
        latents.append(x.float().cpu())
        images.append(model.decode(x))
    return torch.cat(latents), np.concatenate(images)


def score_with(
    reward: Reward, name: str, images: np.ndarray, prompt: str, reference: np.ndarray | None = None
) -> tuple[np.ndarray, list[str]]:
    """``[N]`` raw scores of ``images`` under one reward (NaN where it has none) and the distinct errors it gave.
    ``reference``: the prompt's conditioning image, for rewards that want it (as in training: raygrpo/reward/base.py).

    Never raises: a reward that fails for a whole batch is a missing score for each sample, as in training."""
    from raygrpo.reward.base import score_outcome_of

    references = None if reference is None else [reference] * len(images)
    try:
        outcome = score_outcome_of(reward, images, [prompt] * len(images), references)
    except Exception as exc:  # noqa: BLE001 - see above
        logger.warning("reward %s failed on %r: %s: %s", name, prompt, type(exc).__name__, exc)
        return np.full(len(images), np.nan), [f"{type(exc).__name__}: {exc}"]
    errors = sorted({e for e in outcome.errors if e})
    if not outcome.valid.all():
        missing = int((~outcome.valid).sum())
        logger.warning("reward %s: no score for %d of %d samples of %r: %s", name, missing, len(outcome.valid), prompt, errors)
    return np.where(outcome.valid, outcome.values, np.nan).astype(np.float64), errors


def score_images(rewards: list[Reward], config: Config, images: np.ndarray, prompt: str, reference: np.ndarray | None = None) -> np.ndarray:
    """``[K, N]`` raw scores of ``images`` under each configured reward; NaN where a reward has none."""
    return np.stack([score_with(reward, r.name, images, prompt, reference)[0] for reward, r in zip(rewards, config.rewards)])


def evaluate_model(name: str, model, rewards: list[Reward], config: Config, settings: EvalSettings) -> ModelResult:
    """Sample ``best_of_n`` images per prompt with fixed noise and score them."""
    start = time.perf_counter()
    sigmas = model.sigma_grid(settings.sampler, settings.num_steps, settings.shift).to(model.device)  # [T+1]
    weights = np.array([r.weight for r in config.rewards], np.float64)  # [K]
    per_prompt, grid = [], []
    for p, prompt in enumerate(settings.prompts):
        noise = model.initial_noise(prompt_generator(settings.seed, p), settings.best_of_n)  # [N, ...]
        reference = settings.images[p] if settings.images is not None else None  # [H0, W0, 3] uint8
        _, images = sample_final(model, prompt, noise, sigmas, settings.sampler, settings.batch_size, reference)  # [N, H, W, 3]
        per_prompt.append(score_images(rewards, config, images, prompt, reference))  # [K, N]
        if p < settings.grid_prompts:
            grid.append(images)
        logger.info("%s: prompt %d/%d scored", name, p + 1, len(settings.prompts))
    scores = np.stack(per_prompt)  # [P, K, N]
    totals = np.einsum("k,pkn->pn", weights, scores)  # [P, N]; NaN where any reward is missing
    by_name = {r.name: scores[:, k] for k, r in enumerate(config.rewards)}
    return ModelResult(name, by_name, totals, grid, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------- outputs
def markdown_table(results: list[ModelResult], reward_names: list[str], best_of_n: int) -> str:
    """One row per model (and a change row for two), one column per reward, the total and Best-of-N."""
    header = ["model", *[f"{n} (mean ± std)" for n in reward_names], "total"]
    if best_of_n > 1:
        header.append(f"best-of-{best_of_n} total")
    header.append("missing")
    summaries = [(r.name, r.summary()) for r in results]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, s in summaries:
        cells = [name, *[f"{s[f'{n}/mean']:.4f} ± {s[f'{n}/std']:.4f}" for n in reward_names], f"{s['total/mean']:.4f}"]
        if best_of_n > 1:
            cells.append(f"{s['best_of_n/mean']:.4f}")
        cells.append(f"{int(s['missing'])}")
        lines.append("| " + " | ".join(cells) + " |")
    if len(summaries) == 2:
        (_, a), (_, b) = summaries
        cells = ["change", *[f"{b[f'{n}/mean'] - a[f'{n}/mean']:+.4f}" for n in reward_names], f"{b['total/mean'] - a['total/mean']:+.4f}"]
        if best_of_n > 1:
            cells.append(f"{b['best_of_n/mean'] - a['best_of_n/mean']:+.4f}")
        cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(out: Path, results: list[ModelResult], config: Config, settings: EvalSettings, meta: dict) -> dict:
    """``eval.json`` and ``samples.png`` in ``out``; returns the JSON document."""
    from raygrpo.report import GridRow, sample_grid

    document = {
        **meta,
        "settings": {f.name: getattr(settings, f.name) for f in fields(settings) if f.name not in ("prompts", "images")},
        "rewards": [{"name": r.name, "kind": r.kind, "weight": r.weight} for r in config.rewards],
        "prompts": settings.prompts,
        "results": {
            r.name: {
                "summary": r.summary(),
                "totals": _json_array(r.totals),
                "scores": {name: _json_array(values) for name, values in r.scores.items()},
            }
            for r in results
        },
        "table": markdown_table(results, [r.name for r in config.rewards], settings.best_of_n),
    }
    (out / "eval.json").write_text(json.dumps(document, indent=2))
    rows = []
    for p in range(min(settings.grid_prompts, len(settings.prompts))):
        for result in results:
            captions = [f"{t:.3f}" for t in result.totals[p]]
            rows.append(GridRow(f"{result.name}: {settings.prompts[p]}", np.ascontiguousarray(result.grid_images[p]), captions))
    if rows and rows[0].images.ndim == 4:
        sample_grid(rows, out / "samples.png")
    return document


def _json_array(values: np.ndarray) -> list:
    """Nested lists with None for NaN (JSON has no NaN)."""
    return [[None if np.isnan(v) else float(v) for v in row] for row in values]


def default_out(config: Config, checkpoint: str | None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if checkpoint is not None:
        folder = Path(checkpoint).expanduser().resolve()
        return folder.parent / f"eval-{folder.name}-{stamp}"
    return Path(config.run.output_root) / f"eval-base-{stamp}"


def run_eval(config: Config, settings: EvalSettings, checkpoint: str | None, out: Path, device: str) -> dict:
    """Evaluate the base model and, if given, the checkpoint; write the outputs; return ``eval.json``'s content."""
    trained = open_checkpoint(checkpoint, config) if checkpoint is not None else None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EvalError(f"--out {str(out)!r} already exists and is not empty; choose a new folder")
    rewards = build_rewards(config)
    model = load_base_model(config, device)
    if trained is not None:
        _check_fits(model, trained)  # before the base is sampled: a foreign checkpoint fails in seconds
    results = [evaluate_model("base", model, rewards, config, settings)]
    if trained is not None:
        load_checkpoint_weights(model, trained)
        results.append(evaluate_model("checkpoint", model, rewards, config, settings))
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": {"family": config.model.family, "pretrained": config.model.pretrained},
        "checkpoint": None if trained is None else str(trained.folder.resolve()),
        "checkpoint_state": None if trained is None else trained.state,
    }
    return write_outputs(out, results, config, settings, meta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raygrpo.eval", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="the run's YAML config (its config.yaml, or the preset it was started from)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.guidance_scale=3.5")
    parser.add_argument("--checkpoint", help="a checkpoint folder (e.g. <run>/checkpoint-final); without it only the base model is scored")
    parser.add_argument(
        "--prompts", help="held-out prompts: a .txt file (one per line), a .jsonl or a .parquet file (with an image per prompt for editing)"
    )
    parser.add_argument("--num-steps", type=int, help="ODE steps (default rollout.num_steps)")
    parser.add_argument("--sampler", choices=ODE_SOLVERS, help="ODE solver (default: the algorithm's when it is an ODE solver, else euler)")
    parser.add_argument("--best-of-n", type=int, default=1, help="samples per prompt; the table adds the mean of each prompt's best")
    parser.add_argument("--seed", type=int, help="noise seed (default run.seed)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="output folder (default: next to the checkpoint, eval-<name>-<time>)")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.best_of_n < 1 or args.batch_size < 1 or (args.num_steps is not None and args.num_steps < 1):
            raise EvalError("--best-of-n, --batch-size and --num-steps must be at least 1")
        config = load_config(args.config, args.overrides)
        sampler = args.sampler or (config.algorithm.sampler if config.algorithm.sampler in ODE_SOLVERS else "euler")
        prompts, images = eval_prompts(config, args.prompts)
        settings = EvalSettings(
            prompts=prompts,
            images=images,
            sampler=sampler,
            num_steps=args.num_steps or config.rollout.num_steps,
            shift=config.rollout.shift,
            best_of_n=args.best_of_n,
            seed=config.run.seed if args.seed is None else args.seed,
            batch_size=args.batch_size,
        )
        out = Path(args.out) if args.out else default_out(config, args.checkpoint)
        document = run_eval(config, settings, args.checkpoint, out, args.device)
    except (ConfigError, EvalError) as exc:
        print(f"raygrpo.eval: {exc}", file=sys.stderr)
        return 2
    print(document["table"])
    print(f"outputs: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
