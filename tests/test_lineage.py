from pathlib import Path

import pytest
import torch

from esc_evolve.config import ModelSettings
from esc_evolve.errors import BackboneError
from esc_evolve.models import load_model
from esc_evolve.models.lineage import adapter_chain, write_lineage


def _random_adapter(model, out: Path, seed: int) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(out)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_chain_of_adapters_loads_as_merged_parents_plus_last(tmp_path: Path, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = ModelSettings(name=str(tiny_model_dir), device="cpu")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    _random_adapter(base, tmp_path / "m0", seed=1)
    write_lineage(tmp_path / "m0", str(tiny_model_dir), None)

    m0_merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "m0")
    m0_merged = m0_merged.merge_and_unload()
    _random_adapter(m0_merged, tmp_path / "iter1" / "m1", seed=2)
    write_lineage(tmp_path / "iter1" / "m1", str(tiny_model_dir), tmp_path / "m0")

    base_name, chain = adapter_chain(tmp_path / "iter1" / "m1")
    assert base_name == str(tiny_model_dir)
    assert chain == [(tmp_path / "m0").resolve(), (tmp_path / "iter1" / "m1").resolve()]

    ids = torch.tensor([[1, 2, 3, 4, 5]])
    expected_m1 = PeftModel.from_pretrained(m0_merged, tmp_path / "iter1" / "m1")
    loaded, _ = load_model(ModelSettings(name="some/other-model", device="cpu"), adapter=tmp_path / "iter1" / "m1")
    assert torch.allclose(_logits(loaded, ids), _logits(expected_m1, ids), atol=1e-5)  # base taken from lineage
    merged, _ = load_model(config, adapter=tmp_path / "iter1" / "m1", merge=True)
    assert torch.allclose(_logits(merged, ids), _logits(expected_m1, ids), atol=1e-5)
    m0_only, _ = load_model(config, adapter=tmp_path / "m0")
    assert not torch.allclose(_logits(m0_only, ids), _logits(expected_m1, ids), atol=1e-3)


def test_not_an_adapter_folder(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="not a LoRA adapter folder"):
        adapter_chain(tmp_path)
