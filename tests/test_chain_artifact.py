"""The served artifact of M_t (models/served.py) is the whole adapter chain: the logits of the backbone with that one
artifact equal those of the chain loaded the way every stage loads it (models/loading.py), for chains of 1, 2 and
3 adapters of different ranks, alphas and target modules; where concatenation is not exact, merged weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from esc_evolve.config import ModelSettings
from esc_evolve.models import load_model
from esc_evolve.models.lineage import write_lineage
from esc_evolve.models.served import (
    SERVED_FILE,
    cat_problem,
    ensure_served,
    read_served,
    served_dir,
    write_served,
)

IDS = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
# (r, alpha, target modules, rsLoRA) of a0, a1, a2: ranks, scalings and targets all differ.
CHAIN = [
    (4, 8, ["q_proj", "v_proj", "down_proj"], False),
    (8, 4, ["q_proj", "o_proj", "up_proj"], True),
    (2, 16, ["k_proj", "v_proj", "gate_proj"], False),
]


def _config(model_dir: Path) -> ModelSettings:
    return ModelSettings(name=str(model_dir), device="cpu", dtype="float32")


def _logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _train_like_a_run(model_dir: Path, root: Path, spec: list[tuple], **extra) -> list[Path]:
    """Adapters saved as a run saves them: each with random (non-zero) weights drawn on its parent's merged
    weights, with a lineage file pointing at the parent."""
    from peft import LoraConfig, get_peft_model

    folders = []
    for index, (r, alpha, targets, rslora) in enumerate(spec):
        parent = folders[-1] if folders else None
        model = load_model(_config(model_dir), parent, merge=True)[0] if parent else _backbone(model_dir)
        torch.manual_seed(index + 1)
        lora = LoraConfig(
            r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, init_lora_weights=False, **extra
        )
        folder = root / ("m0" if index == 0 else f"iter{index}/m{index}")
        get_peft_model(model, lora).save_pretrained(folder)
        write_lineage(folder, str(model_dir), parent)
        folders.append(folder)
    return folders


def _backbone(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _served_logits(model_dir: Path, adapter: Path) -> torch.Tensor:
    """What an engine serving the artifact computes: the raw backbone plus the one LoRA (or the merged folder)."""
    from peft import PeftModel

    artifact = read_served(adapter)
    assert artifact is not None
    if artifact.kind == "merged":
        return _logits(_backbone(artifact.path))
    return _logits(PeftModel.from_pretrained(_backbone(model_dir), str(artifact.path)))


@pytest.mark.parametrize("length", [2, 3])
def test_the_concatenated_lora_gives_the_chain_s_logits(tmp_path: Path, tiny_model_dir: Path, length: int) -> None:
    chain = _train_like_a_run(tiny_model_dir, tmp_path, CHAIN[:length])
    artifact = write_served(_config(tiny_model_dir), chain[-1])
    assert artifact.kind == "lora" and artifact.path == served_dir(chain[-1])
    assert artifact.rank == sum(r for r, *_ in CHAIN[:length])
    config = json.loads((artifact.path / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == artifact.rank  # scaling 1: the alphas sit in A
    expected = _logits(load_model(_config(tiny_model_dir), chain[-1])[0])
    served = _served_logits(tiny_model_dir, chain[-1])
    assert torch.allclose(served, expected, atol=1e-5, rtol=1e-5)
    # Serving only the last adapter (what the vLLM backend used to do) is a different model.
    shorter = _logits(load_model(_config(tiny_model_dir), chain[-2])[0])
    assert (served - shorter).abs().max() > 1e-3


def test_m0_is_served_as_its_own_adapter(tmp_path: Path, tiny_model_dir: Path) -> None:
    (m0,) = _train_like_a_run(tiny_model_dir, tmp_path, CHAIN[:1])
    artifact = write_served(_config(tiny_model_dir), m0)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (artifact.path / name).read_bytes() == (m0 / name).read_bytes()
    assert json.loads((artifact.path / SERVED_FILE).read_text())["chain"] == [".."]


def test_a_chain_that_cat_cannot_express_is_served_merged(tmp_path: Path, tiny_model_dir: Path) -> None:
    spec = [(4, 8, ["q_proj", "v_proj"], True), (2, 4, ["q_proj"], False)]  # rsLoRA first: cat would rescale
    chain = _train_like_a_run(tiny_model_dir, tmp_path, spec)
    artifact = write_served(_config(tiny_model_dir), chain[-1])
    assert artifact.kind == "merged" and (artifact.path / "model.safetensors").is_file()
    expected = _logits(load_model(_config(tiny_model_dir), chain[-1])[0])
    assert torch.allclose(_served_logits(tiny_model_dir, chain[-1]), expected, atol=1e-5, rtol=1e-5)


def test_cat_problems_are_named() -> None:
    lora = {"peft_type": "LORA", "target_modules": ["q_proj"], "bias": "none"}
    assert cat_problem([lora, lora]) is None
    assert "DoRA" in cat_problem([lora, {**lora, "use_dora": True}])
    assert "rsLoRA" in cat_problem([{**lora, "use_rslora": True}, lora])
    assert cat_problem([lora, {**lora, "use_rslora": True}]) is None  # its own scaling is folded into A
    assert "biases" in cat_problem([lora, {**lora, "bias": "all"}])
    assert "modules" in cat_problem([{**lora, "modules_to_save": ["lm_head"]}])


def test_an_unfinished_artifact_is_written_again(tmp_path: Path, tiny_model_dir: Path) -> None:
    chain = _train_like_a_run(tiny_model_dir, tmp_path, CHAIN[:2])
    first = write_served(_config(tiny_model_dir), chain[-1])
    (first.path / SERVED_FILE).unlink()  # as if killed before the marker: not an artifact
    assert read_served(chain[-1]) is None
    again = ensure_served(_config(tiny_model_dir), chain[-1])
    assert again == first and read_served(chain[-1]) == first
    assert not list(chain[-1].glob(".served*"))  # no staging folder left behind
