"""Export a trained checkpoint as something diffusers loads without raygrpo.

    python -m raygrpo.export RUN_DIR/checkpoint-final OUT [--pretrained ID_OR_DIR] [--family flux] [--merge-lora] [--copy]

A checkpoint written by :meth:`raygrpo.learner.learner.Learner.save` holds the trained network alone
(``transformer/`` from ``save_pretrained``, or ``transformer_lora/`` from ``save_lora_adapter``) and
``raygrpo_state.json``. :func:`export_pipeline` turns it into:

* full fine-tuning: a complete pipeline folder. ``DiffusionPipeline.from_pretrained(out)`` loads it
  with the trained network in place of the base one (``transformer/``, or ``unet/`` for UNet families);
  every other component (VAE, text encoders, tokenizers, scheduler) comes from the pretrained folder;
* LoRA: the adapter in the pipeline's LoRA format (``pytorch_lora_weights.safetensors`` with keys
  prefixed ``transformer.`` and the adapter's rank/alpha in the safetensors metadata), so
  ``DiffusionPipeline.from_pretrained(base).load_lora_weights(out)`` gives the trained model. With
  ``merge_lora=True`` the adapter is fused into the network instead and a complete pipeline is written.

Base files are hard-linked where the file system allows it (no copy of a 24 GB text encoder), copied
otherwise or with ``link=False``; the pretrained folder and the checkpoint are only read. A hard link
is the same file as its source: never write into an exported folder in place (``save_pretrained``
over it would rewrite the pretrained files too); save changes to a new folder. ``out`` appears in
one rename when everything is written, and an existing ``out`` is never overwritten.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

STATE_FILE = "raygrpo_state.json"
EXPORT_FILE = "raygrpo_export.json"
# The trainable network of a diffusers pipeline; transformer_2: Wan 2.2 A14B's low-noise expert (model.train_expert=low),
# exported in place of the base's, the base's high-noise transformer/ kept (raygrpo/models/wan_experts.py).
NETWORK_COMPONENTS = ("transformer", "unet", "transformer_2")
LORA_SUFFIX = "_lora"  # Learner.save writes the adapter of <component> to <component>_lora/
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' name, read by load_lora_weights
LORA_METADATA_KEY = "lora_adapter_metadata"  # where save_lora_adapter keeps the peft config (rank, alpha, targets)


class ExportError(ValueError):
    """A checkpoint or pretrained source that cannot be exported; the message says what to fix."""


@dataclass(frozen=True)
class TrainedCheckpoint:
    """What a checkpoint folder holds: which network, trained fully or as a LoRA adapter."""

    folder: Path
    component: str  # "transformer" or "unet"
    lora: bool
    state: dict  # raygrpo_state.json (policy_version, pretrained, algorithm, maybe family); {} if absent

    @property
    def network_folder(self) -> Path:
        return self.folder / (self.component + LORA_SUFFIX if self.lora else self.component)


def read_checkpoint(folder: str | os.PathLike) -> TrainedCheckpoint:
    """Inspect a checkpoint folder written by ``Learner.save``; raises :class:`ExportError` if it is not one."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ExportError(f"checkpoint folder {str(folder)!r} does not exist (a run writes <run dir>/checkpoint-final)")
    found = [(c, False) for c in NETWORK_COMPONENTS if (folder / c / "config.json").is_file()]
    found += [(c, True) for c in NETWORK_COMPONENTS if (folder / (c + LORA_SUFFIX) / LORA_WEIGHT_NAME).is_file()]
    if len(found) != 1:
        what = "none" if not found else ", ".join(c + (LORA_SUFFIX if lora else "") + "/" for c, lora in found)
        raise ExportError(
            f"{folder} is not a raygrpo checkpoint: it must hold exactly one of transformer/ or unet/ (full fine-tuning, "
            f"with config.json) or transformer_lora/ or unet_lora/ (LoRA, with {LORA_WEIGHT_NAME}); found {what}"
        )
    state_path = folder / STATE_FILE
    try:
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise ExportError(f"{state_path} is not valid JSON ({exc}); the checkpoint may be partial") from None
    component, lora = found[0]
    return TrainedCheckpoint(folder=folder, component=component, lora=lora, state=state)


def resolve_pipeline_folder(pretrained: str, family: str | None = None) -> Path:
    """A local folder holding the whole pretrained pipeline (``model_index.json`` and every component).

    ``"tiny-random"`` is the cached tiny model of ``family`` (default flux); a hub id not fully on
    disk is downloaded with ``snapshot_download`` (the export needs every component).
    """
    from raygrpo.models import TINY_RANDOM, ModelNotFoundError, resolve_pretrained, tiny_model_folder

    try:
        if pretrained == TINY_RANDOM:
            return tiny_model_folder(family or "flux")
        source = resolve_pretrained(pretrained)
    except (ModelNotFoundError, ValueError) as exc:
        raise ExportError(f"pretrained model: {exc}") from None
    folder = Path(source)
    if folder.is_dir() and not _missing_components(folder):
        return folder
    from huggingface_hub import snapshot_download

    logger.info("downloading the whole pipeline %s for the export", pretrained)
    try:
        folder = Path(snapshot_download(pretrained))
    except Exception as exc:  # noqa: BLE001 - network, auth and offline errors come as many types
        raise ExportError(f"pretrained model {pretrained!r}: could not download the whole pipeline ({type(exc).__name__}: {exc})") from None
    missing = _missing_components(folder)
    if missing:
        raise ExportError(f"pretrained pipeline {folder} lacks the component folders {missing} that model_index.json lists")
    return folder


def _model_index(folder: Path) -> dict:
    return json.loads((folder / "model_index.json").read_text())


def _components(index: dict) -> dict[str, tuple[str, str]]:
    """``{component: (library, class)}`` of a model_index.json; optional components set to null are left out."""
    return {k: tuple(v) for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None}


def _missing_components(folder: Path) -> list[str]:
    if not (folder / "model_index.json").is_file():
        return ["model_index.json"]
    return [name for name in _components(_model_index(folder)) if not (folder / name).is_dir()]


def check_compatible(checkpoint: TrainedCheckpoint, base: Path) -> None:
    """Fail unless the checkpoint's network is the base pipeline's network (same class and architecture).

    Full fine-tuning: the saved ``config.json`` must name the base's class and agree on every
    architectural field. LoRA: the adapter's target layers must exist in the base network (checked
    by the load itself); here the pipeline must have the component at all.
    """
    components = _components(_model_index(base))
    if checkpoint.component not in components:
        raise ExportError(
            f"the checkpoint trained a {checkpoint.component}, but the pretrained pipeline {base} has none "
            f"(components: {sorted(components)}): it is a checkpoint of another model family"
        )
    if checkpoint.lora:
        return
    reference = json.loads((base / checkpoint.component / "config.json").read_text())
    check_network_config(checkpoint, reference)


def check_network_config(checkpoint: TrainedCheckpoint, reference: dict) -> None:
    """Fail unless a fully fine-tuned checkpoint's ``config.json`` matches ``reference`` (the base network's config).

    The class must be the same and so must every architectural field (keys not starting with "_",
    which diffusers uses for bookkeeping such as ``_diffusers_version``). LoRA checkpoints pass.
    """
    if checkpoint.lora:
        return
    trained = json.loads((checkpoint.network_folder / "config.json").read_text())
    reference = json.loads(json.dumps(dict(reference)))  # a FrozenDict's tuples compare equal to JSON's lists only after this
    if trained.get("_class_name") != reference.get("_class_name"):
        raise ExportError(
            f"the checkpoint's {checkpoint.component} is a {trained.get('_class_name')}, the pretrained model's is a "
            f"{reference.get('_class_name')}: it is a checkpoint of another model family; use the pretrained model it was trained from"
        )
    differ = sorted(k for k in set(trained) | set(reference) if not k.startswith("_") and trained.get(k) != reference.get(k))
    if differ:
        details = ", ".join(f"{k}: {trained.get(k)!r} vs {reference.get(k)!r}" for k in differ[:6])
        raise ExportError(
            f"the checkpoint's {checkpoint.component} has another architecture than the pretrained one ({details}): "
            "it was trained from another model; use the pretrained model it was trained from"
        )


def export_pipeline(
    pretrained: str,
    trained: str | os.PathLike,
    out: str | os.PathLike,
    *,
    family: str | None = None,
    merge_lora: bool = False,
    link: bool = True,
) -> Path:
    """Write ``out`` so diffusers loads the trained model from it (see the module docstring); returns ``out``.

    ``pretrained`` is what the run trained from (``model.pretrained``: a hub id, a folder, or
    "tiny-random" with ``family``, default the checkpoint's recorded family, else flux). ``link``:
    hard-link unchanged files instead of copying them. Raises
    :class:`ExportError` for a missing or foreign checkpoint, an incomplete base, or an existing ``out``.
    """
    checkpoint = read_checkpoint(trained)
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"export folder {str(out)!r} already exists and is not empty; choose a new folder (nothing was written)")
    base = resolve_pipeline_folder(pretrained, family or checkpoint.state.get("family"))
    check_compatible(checkpoint, base)
    recorded = checkpoint.state.get("pretrained")
    if recorded is not None and recorded != pretrained:
        logger.warning("checkpoint %s records pretrained=%r, exporting against %r", checkpoint.folder, recorded, pretrained)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        if checkpoint.lora and not merge_lora:
            _write_lora(checkpoint, base, tmp)
            kind = "lora"
        else:
            _write_pipeline(checkpoint, base, tmp, link)
            kind = "merged_lora" if checkpoint.lora else "full"
        provenance = {
            "kind": kind,
            "pretrained": pretrained,
            "pretrained_folder": str(base.resolve()),
            "checkpoint": str(checkpoint.folder.resolve()),
            "component": checkpoint.component,
            **{k: v for k, v in checkpoint.state.items() if k in ("policy_version", "algorithm", "family", "generation")},
        }
        (tmp / EXPORT_FILE).write_text(json.dumps(provenance, indent=2))
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a folder
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("exported %s (%s) to %s", checkpoint.folder, kind, out)
    return out


def _write_pipeline(checkpoint: TrainedCheckpoint, base: Path, tmp: Path, link: bool) -> None:
    """The base pipeline with the trained network: linked files, plus the network from the checkpoint."""
    for entry in base.iterdir():
        if entry.name == checkpoint.component or entry.name.startswith("."):
            continue
        if entry.is_dir():
            _link_tree(entry, tmp / entry.name, link)
        elif entry.is_file():
            _link_file(entry, tmp / entry.name, link)
    if checkpoint.lora:
        _merge_lora_into(checkpoint, base, tmp / checkpoint.component)
    else:
        _link_tree(checkpoint.network_folder, tmp / checkpoint.component, link)


def _write_lora(checkpoint: TrainedCheckpoint, base: Path, tmp: Path) -> None:
    """The adapter as the pipeline class's ``save_lora_weights`` writes it (prefixed keys, metadata kept).

    The rank and alpha travel in the safetensors metadata: without them ``load_lora_weights`` would
    assume alpha = rank and scale the update by 1 instead of alpha / rank.
    """
    import diffusers
    from safetensors import safe_open

    path = checkpoint.network_folder / LORA_WEIGHT_NAME
    with safe_open(str(path), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
        metadata = f.metadata() or {}
    adapter_config = json.loads(metadata[LORA_METADATA_KEY]) if LORA_METADATA_KEY in metadata else None
    if adapter_config is None:
        logger.warning("%s has no adapter metadata: load_lora_weights will assume lora_alpha = rank", path)
    pipeline_cls = getattr(diffusers, _model_index(base)["_class_name"])
    parameters = inspect.signature(pipeline_cls.save_lora_weights).parameters
    layers_kw, metadata_kw = f"{checkpoint.component}_lora_layers", f"{checkpoint.component}_lora_adapter_metadata"
    if layers_kw not in parameters:
        raise ExportError(
            f"{pipeline_cls.__name__}.save_lora_weights takes no {layers_kw}: this pipeline cannot load a {checkpoint.component} LoRA"
        )
    kwargs = {layers_kw: tensors}
    if adapter_config is not None and metadata_kw in parameters:
        kwargs[metadata_kw] = adapter_config
    pipeline_cls.save_lora_weights(tmp, weight_name=LORA_WEIGHT_NAME, **kwargs)


def _merge_lora_into(checkpoint: TrainedCheckpoint, base: Path, target: Path) -> None:
    """Load the base network, fuse the adapter into its weights, and save the plain network."""
    import diffusers

    _, class_name = _components(_model_index(base))[checkpoint.component]
    network_cls = getattr(diffusers, class_name)
    network = network_cls.from_pretrained(base, subfolder=checkpoint.component)
    network.load_lora_adapter(str(checkpoint.network_folder), weight_name=LORA_WEIGHT_NAME, adapter_name="raygrpo", prefix=None)
    network.fuse_lora(lora_scale=1.0)
    network.unload_lora()
    network.save_pretrained(target)


def _link_tree(source: Path, target: Path, link: bool) -> None:
    for path in sorted(source.rglob("*")):
        destination = target / path.relative_to(source)
        if path.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
        elif path.is_file():
            _link_file(path, destination, link)


def _link_file(source: Path, target: Path, link: bool) -> None:
    """Hard-link (a Hugging Face cache symlink is followed to its blob); copy across file systems or if not ``link``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    real = source.resolve()
    if link:
        try:
            os.link(real, target)
            return
        except OSError:
            pass  # another file system, or links not allowed: copy
    shutil.copy2(real, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raygrpo.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint folder written by a run, e.g. outputs/tiny-.../checkpoint-final")
    parser.add_argument("out", help="the folder to create (must not exist or be empty)")
    parser.add_argument("--pretrained", help="the model the run trained from (default: the one raygrpo_state.json records)")
    parser.add_argument("--family", help="model family for --pretrained tiny-random (flux, sd3)")
    parser.add_argument("--merge-lora", action="store_true", help="fuse a LoRA adapter into the network and write a whole pipeline")
    parser.add_argument("--copy", action="store_true", help="copy the pretrained files instead of hard-linking them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        pretrained = args.pretrained or read_checkpoint(args.checkpoint).state.get("pretrained")
        if not pretrained:
            raise ExportError(f"{args.checkpoint} records no pretrained model; pass --pretrained")
        out = export_pipeline(pretrained, args.checkpoint, args.out, family=args.family, merge_lora=args.merge_lora, link=not args.copy)
    except ExportError as exc:
        print(f"raygrpo.export: {exc}", file=sys.stderr)
        return 2
    print(f"exported: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
