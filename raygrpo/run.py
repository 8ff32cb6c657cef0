"""Entry point: ``python -m raygrpo.run CONFIG [key.path=value ...] [--skip-reward-check]``.

1. Load and validate the config; run the preflight checks (weights reachable and their folders readable,
   rewards known, every HTTP-backed reward's server answering and accepting the token, prompts present,
   enough GPUs on this machine when no cluster is given). Everything here fails before Ray starts,
   naming the field to fix.
2. Join the Ray cluster named by ``ray.address`` or ``RAY_ADDRESS`` (``ray job submit`` sets it), or
   start a local instance bound to loopback; with ``run.in_process=true`` no Ray at all.
3. Check the resource plan against the cluster, then hand over to the :class:`Controller`, in a new
   run folder or, when an unfinished run of the same name has a checkpoint (``run.resume: auto``), in
   that folder from its newest checkpoint (raygrpo/checkpoint.py).

Exit codes: 0 finished; 2 the run cannot start (config, preflight, plan, checkpoint); 3 aborted (a
reward rejecting the token, steps that trained nothing, an export that failed, no live actor of a role);
130 / 143 stopped by Ctrl-C / SIGTERM (``ray job stop``) with a resumable checkpoint: the same command continues.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from raygrpo.config import Config, ConfigError, load_config
from raygrpo.errors import PreflightError, RunStopped

logger = logging.getLogger("raygrpo")

# Per request of the reward-server check (two attempts each): a server that accepts connections and never
# answers fails the preflight in about 2 x this, plus a second; one that is down, at once.
PREFLIGHT_TIMEOUT_S = 3.0


def preflight(config: Config, check_rewards: bool = True, gpu_memory_bytes: int | None = None) -> list[str]:
    """Check what can be checked on the driver; return the prompts. Raises PreflightError listing every problem.

    ``check_rewards``: contact the server of every HTTP-backed reward (health, then an authenticated info);
    ``--skip-reward-check`` turns it off for servers that come up after the run starts. ``gpu_memory_bytes``:
    when the rollout or learner ask for whole GPUs, dry-run the resource plan (raygrpo/plan/) against GPUs of
    this memory and fail with its table if a role cannot fit; None (``--skip-plan``) skips it.
    """
    from raygrpo.data.prompts import PromptFileError, load_prompts
    from raygrpo.eval import conditioning_images
    from raygrpo.models import IMAGE_CONDITIONED_FAMILIES, VIDEO_FAMILIES, ModelNotFoundError, check_pretrained
    from raygrpo.placement import plan_totals, resource_plan
    from raygrpo.reward import VIDEO_HINT, RewardServiceError, accepts_video, check_reward_service, make_reward
    from raygrpo.reward.registry import wants_references

    problems, prompts = [], []
    try:
        check_pretrained(config.model.family, config.model.pretrained)  # folder readable, JSON parses; tiny-random is built here
    except ModelNotFoundError as exc:
        problems.append(f"model.pretrained: {exc}")
    entries = [(f"rewards.{i}", reward) for i, reward in enumerate(config.rewards)]
    entries += [(f"guard.gold_rewards.{i}", gold) for i, gold in enumerate(config.guard.gold_rewards if config.guard else [])]
    for where, reward in entries:
        try:
            if check_rewards:
                check_reward_service(reward.name, reward.kind, reward.params, timeout_s=PREFLIGHT_TIMEOUT_S)
            else:
                make_reward(reward.kind, reward.params)
        except RewardServiceError as exc:
            problems.append(f"{where}: {exc} (start the server, fix the URL or token; --skip-reward-check if it comes up later)")
        except (ValueError, TypeError) as exc:
            problems.append(f"{where} ({reward.name}): {exc}")
        if config.model.family in VIDEO_FAMILIES and not accepts_video(reward.kind, reward.params):
            what = f"model.family={config.model.family!r} makes videos and {reward.kind!r} scores images"
            problems.append(f"{where} ({reward.name}): {what}: {VIDEO_HINT}")
        if config.model.family not in IMAGE_CONDITIONED_FAMILIES and wants_references(reward.kind, reward.params):
            what = f"{reward.kind!r} compares each output with its conditioning image and model.family={config.model.family!r} has none"
            problems.append(f"{where} ({reward.name}): {what} (only {sorted(IMAGE_CONDITIONED_FAMILIES)} do; drop send_reference)")
    try:
        prompts = load_prompts(config.data)
        problem = _conditioning_images_problem(config)
        if problem:
            problems.append(problem)
    except PromptFileError as exc:
        problems.append(str(exc))
    if config.guard is not None:  # its gold rewards are checked above with the trained ones
        try:
            load_prompts(config.guard.data)
            conditioning_images(config, config.guard.data, "guard")  # editing / image-to-video: an image per prompt
        except PromptFileError as exc:
            problems.append(f"guard.prompt_file: {exc}")
    problem = _unwritable(Path(config.run.output_root))
    if problem:
        problems.append(f"run.output_root: {problem}")
    if config.run.in_process:
        need_gpus = max(config.rollout.num_gpus, config.learner.num_gpus, *(r.num_gpus for r in config.rewards))
        if need_gpus and not _local_gpu_count():
            problems.append("run.in_process: the roles ask for GPUs and this machine has none; set their num_gpus to 0")
    elif not _cluster_address(config):
        need_gpus = plan_totals(resource_plan(config))["GPU"]
        have_gpus = _local_gpu_count()
        if need_gpus > have_gpus:
            problems.append(
                f"rollout/reward/learner num_gpus: the plan needs {need_gpus:g} GPUs, this machine has {have_gpus} and no Ray "
                "cluster is given (set ray.address or RAY_ADDRESS, or submit with `ray job submit`)"
            )
    if not problems and gpu_memory_bytes is not None and max(config.rollout.num_gpus, config.learner.num_gpus) >= 1:
        problem = _memory_plan_problem(config, gpu_memory_bytes)
        if problem:
            problems.append(problem)
    if problems:
        raise PreflightError("cannot start this run:\n" + "\n".join(f"  - {p}" for p in problems))
    return prompts


def _memory_plan_problem(config: Config, gpu_memory_bytes: int) -> str | None:
    """The resource planner's verdict on the run's GPUs: None when it fits (or its architecture is unknown), else the table."""
    from raygrpo.plan import ArchitectureError, make_plan

    try:
        # The configured checkpointing only, cached by config and code: a repeated or resumed launch plans at once.
        plan = make_plan(config, gpu_memory_bytes=gpu_memory_bytes, compare=False, cache=Path(config.run.output_root) / ".plans")
    except ArchitectureError as exc:
        logger.warning("no resource plan for this model (%s); starting without it", exc)
        return None
    logger.info("resource plan:\n%s", plan.table())
    if plan.fits:
        return None
    return f"the resource plan does not fit GPUs of {gpu_memory_bytes / 2**30:g} GiB (--gpu-memory; --skip-plan starts anyway):\n{plan.table()}"


def _conditioning_images_problem(config: Config) -> str | None:
    """Image-to-video and image editing need a readable conditioning image per prompt; text-conditioned families take none."""
    from raygrpo.data.prompts import load_prompt_images
    from raygrpo.models import IMAGE_CONDITIONED_FAMILIES, VIDEO_FAMILIES

    family = config.model.family
    images = load_prompt_images(config.data)  # PromptFileError for a half-illustrated file
    if family in IMAGE_CONDITIONED_FAMILIES and images is None:
        return (
            f"data: model.family={family!r} is {'image-to-video' if family in VIDEO_FAMILIES else 'image editing'} and needs a "
            "conditioning image per prompt: set data.prompt_file "
            'to a .jsonl of {"prompt": ..., "image": path} lines or a .parquet with an image column'
        )
    if family not in IMAGE_CONDITIONED_FAMILIES and images is not None:
        return (
            f"data.prompt_file: {config.data.prompt_file!r} gives conditioning images, but model.family={family!r} is "
            f"conditioned on text only (image-conditioned families: {sorted(IMAGE_CONDITIONED_FAMILIES)}); drop the images"
        )
    if images is not None:
        images.check()  # every image decodes, or PromptFileError listing the bad ones
    return None


def _unwritable(folder: Path) -> str | None:
    """Why runs cannot be written under ``folder`` (checked on its nearest existing ancestor), or None."""
    existing = folder.resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{str(existing)!r} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{str(existing)!r} is not writable; choose another run.output_root"
    return None


def _cluster_address(config: Config) -> str | None:
    return config.ray.address or os.environ.get("RAY_ADDRESS")


def _local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def make_run_dir(config: Config) -> Path:
    """A new ``<output_root>/<name>-YYYYmmdd-HHMMSS`` (``-<pid>`` added if that exists): the names auto-resume looks for."""
    from raygrpo.checkpoint import run_folder_name

    run_dir = Path(config.run.output_root).resolve() / run_folder_name(config.run.name)
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        run_dir = run_dir.with_name(f"{run_dir.name}-{os.getpid()}")
        run_dir.mkdir(parents=True)
    except OSError as exc:
        raise PreflightError(f"run.output_root: cannot create {str(run_dir)!r}: {exc.strerror}") from None
    (run_dir / "config.yaml").write_text(config.to_yaml())
    return run_dir


def connect_ray(config: Config) -> None:
    import ray

    address = _cluster_address(config)
    if address:
        logger.info("joining Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # A local instance serves only this machine: keep every Ray socket on loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        logger.info("starting a local Ray instance")
        ray.init(
            address="local",  # a new instance even when another one runs on this machine (never attach to it silently)
            num_cpus=config.ray.num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level=logging.WARNING,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raygrpo.run", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="YAML run config, e.g. cluster/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=3 rollout.num_workers=2")
    parser.add_argument(
        "--skip-reward-check", action="store_true", help="do not contact reward servers before the run (for servers that come up later)"
    )
    parser.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU the resource plan is checked against (default 80GiB)")
    parser.add_argument("--skip-plan", action="store_true", help="do not dry-run the resource plan before the run (python -m raygrpo.plan)")
    args = parser.parse_intermixed_args(argv)  # the flag may stand anywhere among the overrides
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Until the controller takes the signals over (it stops a run with a checkpoint), Ctrl-C and SIGTERM stop
    # the start-up with one line instead of a traceback or a silent death.
    signal.signal(signal.SIGTERM, _stop_starting)
    try:
        return launch(args)
    except KeyboardInterrupt as exc:
        number = exc.signal_number if isinstance(exc, RunStopped) else signal.SIGINT
        print(f"raygrpo: stopped by {signal.Signals(number).name} outside the training loop (while starting or shutting down)", file=sys.stderr)
        return 128 + number


def _stop_starting(signum: int, frame) -> None:
    raise RunStopped(signal.Signals(signum).name, signum)


def launch(args: argparse.Namespace) -> int:
    """Config, preflight, Ray, the controller; the exit code (see the module docstring)."""
    try:
        config = load_config(args.config, args.overrides)
        from raygrpo.plan import parse_bytes

        gpu_memory = None if args.skip_plan else parse_bytes(args.gpu_memory)
        prompts = preflight(config, check_rewards=not args.skip_reward_check, gpu_memory_bytes=gpu_memory)
    except (ConfigError, PreflightError, ValueError) as exc:
        print(f"raygrpo: {exc}", file=sys.stderr)
        return 2

    from raygrpo.checkpoint import CheckpointError, find_resume_point
    from raygrpo.controller import Controller, finish_trained
    from raygrpo.errors import RunAborted
    from raygrpo.placement import PlanError

    try:
        resume = find_resume_point(config)
    except CheckpointError as exc:
        print(f"raygrpo: {exc}", file=sys.stderr)
        return 2
    try:
        if resume is not None and resume.finishing:
            summary = finish_trained(config, resume.run_dir)  # trained to the end already: the report and export only
        else:
            if not config.run.in_process:
                connect_ray(config)
                check_cluster(config)
            if resume:
                # Nothing is written into it until the checkpoint has loaded (the controller keeps this config beside the first one).
                logger.info("continuing %s from %s (step %d)", resume.run_dir, resume.checkpoint.name, resume.step)
            run_dir = resume.run_dir if resume else make_run_dir(config)
            summary = Controller(config, run_dir, prompts, resume=resume, check_rewards=not args.skip_reward_check).run()
    except (PlanError, PreflightError, CheckpointError) as exc:
        print(f"raygrpo: {exc}", file=sys.stderr)
        return 2
    except RunAborted as exc:
        print(f"raygrpo: run aborted: {exc}", file=sys.stderr)
        return 3
    except RunStopped as exc:
        print(f"raygrpo: run {exc}", file=sys.stderr)
        return 128 + exc.signal_number
    finally:
        ray = sys.modules.get("ray")  # imported (and maybe started) only by runs on Ray
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    print(f"reward (weighted total, mean over the step): first step {summary.first_reward:.4f} -> last step {summary.last_reward:.4f}")
    print(f"outputs: {summary.run_dir}")
    return 0


def check_cluster(config: Config) -> None:
    """The resource plan against the connected cluster, in total and node by node; PlanError with a table if it cannot fit."""
    import ray

    from raygrpo.placement import check_plan_fits, node_resources, resource_plan

    check_plan_fits(resource_plan(config), ray.cluster_resources(), node_resources())


if __name__ == "__main__":
    sys.exit(main())
