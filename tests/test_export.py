"""Export: a checkpoint saved as Learner.save saves it becomes a pipeline diffusers loads and generates with."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline

from raygrpo.config import LoraConfig
from raygrpo.export import ExportError, export_pipeline, main, read_checkpoint
from raygrpo.models import FluxModel, tiny_model_folder
from raygrpo.models.lora import add_lora

PROMPT = "a red car on a mountain road"



@pytest.fixture(scope="module")
def base() -> Path:
    return tiny_model_folder("flux")


def _learner_network(base: Path) -> torch.nn.Module:
    # As the learner loads it: transformer only.
    return FluxModel.from_pretrained(str(base), load_text_encoders=False, load_vae=False).transformer


def _save_state(folder: Path, pretrained: str) -> None:
    (folder / "raygrpo_state.json").write_text(json.dumps({"policy_version": 3, "pretrained": pretrained, "algorithm": "dancegrpo"}))


@torch.no_grad()
def _perturb(parameters, seed: int, scale: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in parameters:
        p.add_(scale * torch.randn(p.shape, generator=generator))


def _image(pipeline: FluxPipeline) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    out = pipeline(PROMPT, height=64, width=64, num_inference_steps=2, max_sequence_length=32, generator=generator, output_type="np")
    return out.images[0]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base_image(base) -> np.ndarray:
    return _image(DiffusionPipeline.from_pretrained(base))


def test_full_finetune_export_loads_as_pipeline_with_trained_weights(base, base_image, tmp_path):
    network = _learner_network(base)
    _perturb(network.parameters(), seed=1, scale=0.05)
    checkpoint = tmp_path / "checkpoint-final"
    network.save_pretrained(checkpoint / "transformer")  # what Learner.save writes for full fine-tuning
    _save_state(checkpoint, "tiny-random")
    before = _digest(base)

    out = export_pipeline("tiny-random", checkpoint, tmp_path / "export")

    pipeline = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipeline, FluxPipeline)
    loaded = pipeline.transformer.state_dict()
    for name, value in network.state_dict().items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)
    image = _image(pipeline)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    assert np.abs(image - base_image).max() > 1e-3  # the trained network, not the base one, drew it
    # The other components are the base's (linked, unchanged) and the base folder was not modified.
    torch.testing.assert_close(
        pipeline.vae.state_dict()["decoder.conv_in.weight"],
        DiffusionPipeline.from_pretrained(base).vae.state_dict()["decoder.conv_in.weight"],
    )
    assert _digest(base) == before
    provenance = json.loads((out / "raygrpo_export.json").read_text())
    assert provenance["kind"] == "full" and provenance["policy_version"] == 3

    # Unchanged files are hard links to the base (same file system here); link=False copies them.
    vae_file = "vae/diffusion_pytorch_model.safetensors"
    assert (out / vae_file).samefile(base / vae_file)
    copied = export_pipeline("tiny-random", checkpoint, tmp_path / "export-copy", link=False)
    assert not (copied / vae_file).samefile(base / vae_file) and _digest(copied / "vae") == _digest(base / "vae")


def test_lora_export_loads_with_load_lora_weights(base, base_image, tmp_path):
    network = _learner_network(base)
    add_lora(network, LoraConfig(rank=4, alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    _perturb([p for p in network.parameters() if p.requires_grad], seed=2, scale=0.2)
    checkpoint = tmp_path / "checkpoint-final"
    network.save_lora_adapter(checkpoint / "transformer_lora")  # what Learner.save writes for LoRA
    _save_state(checkpoint, "tiny-random")

    out = export_pipeline("tiny-random", checkpoint, tmp_path / "export-lora")
    assert (out / "pytorch_lora_weights.safetensors").is_file()

    pipeline = DiffusionPipeline.from_pretrained(base)
    pipeline.load_lora_weights(out)
    lora_image = _image(pipeline)
    assert np.abs(lora_image - base_image).max() > 1e-3

    # The same image as the trained network itself draws: alpha/rank (scale 4 here) survived the export.
    reference = DiffusionPipeline.from_pretrained(base)
    reference.transformer = network.eval()
    np.testing.assert_allclose(lora_image, _image(reference), atol=1e-5)

    # --merge-lora: a whole pipeline with the adapter fused in, loadable without load_lora_weights.
    merged = export_pipeline("tiny-random", checkpoint, tmp_path / "export-merged", merge_lora=True)
    np.testing.assert_allclose(_image(DiffusionPipeline.from_pretrained(merged)), lora_image, atol=1e-4)


def test_bad_inputs_fail_clearly_and_write_nothing(base, tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        export_pipeline("tiny-random", tmp_path / "missing", tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match="not a raygrpo checkpoint"):
        read_checkpoint(empty)

    foreign = tmp_path / "foreign"
    (foreign / "transformer").mkdir(parents=True)
    (foreign / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel", "in_channels": 16}))
    with pytest.raises(ExportError, match="another model family"):
        export_pipeline("tiny-random", foreign, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    network = _learner_network(base)
    checkpoint = tmp_path / "checkpoint"
    network.save_pretrained(checkpoint / "transformer")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export_pipeline("tiny-random", checkpoint, taken)
    assert (taken / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".*tmp*"))  # no half-written folder left behind

    # The CLI reports the same errors without a traceback.
    assert main([str(tmp_path / "missing"), str(tmp_path / "out2"), "--pretrained", "tiny-random"]) == 2
