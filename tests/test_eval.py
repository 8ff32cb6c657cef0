"""python -m raygrpo.eval: base vs checkpoint on held-out prompts with fixed noise, Best-of-N, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raygrpo.config import LoraConfig, load_config
from raygrpo.eval import EvalError, EvalSettings, load_base_model, load_checkpoint_weights, main, run_eval
from raygrpo.export import read_checkpoint
from raygrpo.models import FluxModel, tiny_model_folder
from raygrpo.models.lora import add_lora

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "cluster" / "tiny.yaml"
# Two rewards, so the table has a column per reward and the total is their weighted sum.
OVERRIDES = ["rewards=[{name: jpeg, kind: jpeg_compressibility, weight: 1.0}, {name: bright, kind: brightness, weight: 2.0}]"]



@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "held_out.txt"
    path.write_text("a blue bird on a tree\n\na bowl of apples\n")
    return path


def _checkpoint(folder: Path, *, scale: float, lora: bool = False) -> Path:
    """A checkpoint as Learner.save writes it, with the network's weights moved by ``scale``."""
    network = FluxModel.from_pretrained(str(tiny_model_folder("flux")), load_text_encoders=False, load_vae=False).transformer
    if lora:
        add_lora(network, LoraConfig(rank=4, alpha=8, target_modules=["to_q", "to_v"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in network.parameters():
            if p.requires_grad or not lora:
                p.add_(scale * torch.randn(p.shape, generator=generator))
    if lora:
        network.save_lora_adapter(folder / "transformer_lora")
    else:
        network.save_pretrained(folder / "transformer")
    (folder / "raygrpo_state.json").write_text(json.dumps({"policy_version": 5, "pretrained": "tiny-random", "algorithm": "dancegrpo"}))
    return folder


def test_base_vs_perturbed_checkpoint(tmp_path, prompt_file, capsys):
    checkpoint = _checkpoint(tmp_path / "checkpoint-final", scale=0.1)
    out = tmp_path / "eval"
    argv = [str(CONFIG), *OVERRIDES, "--checkpoint", str(checkpoint), "--prompts", str(prompt_file)]
    assert main([*argv, "--num-steps", "3", "--best-of-n", "3", "--sampler", "dpmpp_2m", "--out", str(out)]) == 0

    printed = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in printed.splitlines() if line.startswith("| ")}
    assert {"base", "checkpoint", "change"} <= set(rows)
    assert "jpeg (mean ± std)" in rows["model"] and "bright (mean ± std)" in rows["model"] and "best-of-3 total" in rows["model"]

    document = json.loads((out / "eval.json").read_text())
    assert document["prompts"] == ["a blue bird on a tree", "a bowl of apples"]
    assert document["settings"]["num_steps"] == 3 and document["settings"]["sampler"] == "dpmpp_2m"
    base, trained = (document["results"][k] for k in ("base", "checkpoint"))
    for result in (base, trained):
        totals = np.array(result["totals"])  # [P, N]
        assert totals.shape == (2, 3)
        s = result["summary"]
        assert s["best_of_n/mean"] >= s["total/mean"]
        assert s["best_of_n/mean"] == pytest.approx(totals.max(axis=1).mean())
        # total = 1.0 * jpeg + 2.0 * bright, sample by sample
        np.testing.assert_allclose(totals, np.array(result["scores"]["jpeg"]) + 2.0 * np.array(result["scores"]["bright"]), rtol=1e-6)
        assert s["missing"] == 0
    assert not np.allclose(base["totals"], trained["totals"])  # the perturbed network draws other images
    assert (out / "samples.png").stat().st_size > 0


def test_same_noise_for_both_models_and_lora_checkpoints(tmp_path, prompt_file):
    """An adapter whose update is zero scores exactly as the base: same prompts, same noise, same path."""
    config = load_config(CONFIG, OVERRIDES)
    settings = EvalSettings(prompts=["a blue bird on a tree"], sampler="euler", num_steps=2, shift=3.0, best_of_n=2)
    unchanged = _checkpoint(tmp_path / "zero-lora", scale=0.0, lora=True)  # peft's gaussian init: B = 0
    document = run_eval(config, settings, str(unchanged), tmp_path / "out-a", "cpu")
    assert document["results"]["base"]["totals"] == document["results"]["checkpoint"]["totals"]

    moved = _checkpoint(tmp_path / "moved-lora", scale=0.5, lora=True)
    document = run_eval(config, settings, str(moved), tmp_path / "out-b", "cpu")
    assert document["results"]["base"]["totals"] != document["results"]["checkpoint"]["totals"]


def test_bad_inputs_fail_with_a_clear_message(tmp_path, prompt_file, capsys):
    def error(*args: str) -> str:
        assert main([str(CONFIG), *args, "--out", str(tmp_path / "out")]) == 2
        return capsys.readouterr().err

    assert "does not exist" in error("--checkpoint", str(tmp_path / "nowhere"), "--prompts", str(prompt_file))
    assert "--prompts" in error("--prompts", str(tmp_path / "missing.txt"))

    foreign = tmp_path / "sd3-checkpoint"
    (foreign / "transformer").mkdir(parents=True)
    (foreign / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel", "in_channels": 16}))
    message = error("--checkpoint", str(foreign), "--prompts", str(prompt_file), "--num-steps", "2")
    assert "another model family" in message and "SD3Transformer2DModel" in message

    recorded = tmp_path / "recorded-sd3"
    _checkpoint(recorded, scale=0.0)
    (recorded / "raygrpo_state.json").write_text(json.dumps({"family": "sd3", "pretrained": "tiny-random"}))
    assert "model.family='sd3'" in error("--checkpoint", str(recorded), "--prompts", str(prompt_file))
    assert not (tmp_path / "out").exists()


def test_the_model_is_rebuilt_as_the_run_trained_it(tmp_path):
    """Wan 2.2 A14B: eval loads the expert the run trained (model.train_expert) at the run's frames; a checkpoint of that
    expert loads into it, one of the other expert (same architecture) is refused rather than evaluated in its place."""
    config = load_config(ROOT / "cluster" / "tiny_wan_t2v.yaml", ["model.train_expert=low", "model.num_frames=9"])
    model = load_base_model(config, "cpu")
    assert (model.experts.train_expert, model.network_component, model.num_frames) == ("low", "transformer_2", 9)

    trained = tmp_path / "low-expert"
    model.transformer.save_pretrained(trained / "transformer_2")
    saved = {name: value.clone() for name, value in model.transformer.state_dict().items()}
    model.transformer.load_state_dict({name: value + 0.5 for name, value in saved.items()})
    load_checkpoint_weights(model, read_checkpoint(trained))  # back to the saved weights
    assert all(torch.equal(value, saved[name]) for name, value in model.transformer.state_dict().items())

    high = tmp_path / "high-expert"
    model.transformer.save_pretrained(high / "transformer")
    settings = EvalSettings(prompts=["a cat"], sampler="euler", num_steps=2, shift=3.0)
    with pytest.raises(EvalError, match=r"holds a trained transformer, .* set model.train_expert"):
        run_eval(config, settings, str(high), tmp_path / "out", "cpu")
