"""The ablation and baseline configs (configs/ablations/): each validates, each code path does what its config
says, and each runs end to end on the tiny model, starting from the `reference_run`'s M0.

`run_ablation(name, ...)` loads `configs/ablations/NAME.yaml` with the tiny overrides of tests/pipeline_fixtures.py,
the built-in data (the configs point at ESConv), and `run.m0_from` = the reference run, then runs the pipeline in
this process with the scripted backend. The scripted backend recognises the refinement prompt by the reflection it
carries; self-refinement alone (`evolve.reflection: none`) carries none, so its prompt is recognised here too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from esc_evolve.config import ExperimentConfig, load_config
from esc_evolve.evolve.loop import generate_pairs as generate
from esc_evolve.evolve.pairs import PairStore
from esc_evolve.generation.types import GenerationResult
from tests import pipeline_fixtures
from tests.pipeline_fixtures import FIELD_ANSWERS, register_scripted_backend, tiny_run_overrides
from tests.test_evolve_loop import LOOP, REFINED, NoRiskDetector, ScriptedGenerator, select_contexts, tokenizer

__all__ = ["tokenizer"]  # the loop tests' tokenizer fixture, used here too

ABLATIONS = Path(__file__).resolve().parents[1] / "configs" / "ablations"
NAMES = sorted(p.stem for p in ABLATIONS.glob("*.yaml"))
ITERATIONS = {"inference-refine": 0, "anchored-rejected": 2, "reference-m0": 2, "iterations-3": 3}


def ablation_config(
    name: str, output_dir: Path, model_dir: Path, m0_from: Path, extra: list[str] = ()
) -> ExperimentConfig:
    overrides = [
        *tiny_run_overrides(output_dir, model_dir, ITERATIONS.get(name, 1)),
        "data.train_path=builtin:train",
        "data.valid_path=builtin:valid",
        "data.max_conversations=null",
        "sft.max_train_samples=null",
        f"run.m0_from={m0_from}",
        *extra,
    ]
    if name == "sft-more":
        overrides.append(f"evolve.match_steps_of={m0_from}")
    return load_config(ABLATIONS / f"{name}.yaml", overrides)


def _plain_or_reflected(request) -> bool:
    messages = request.messages or []
    plain = bool(messages) and "Now write an improved reply" in messages[0]["content"]
    return plain or _REFLECTED(request)


_REFLECTED = pipeline_fixtures.is_refinement


def run_ablation(
    name: str, output_dir: Path, model_dir: Path, m0_from: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str] = ()
) -> Path:
    from esc_evolve.pipeline import run_pipeline

    register_scripted_backend()
    monkeypatch.setattr(pipeline_fixtures, "is_refinement", _plain_or_reflected)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    return run_pipeline(ablation_config(name, output_dir, model_dir, m0_from, extra), resume=True)


# ---------------------------------------------------------------------------------------------------------
# Configs


def test_every_ablation_config_validates_and_shares_the_main_runs_m0() -> None:
    expected = {
        "no-reflection": ("evolve.reflection", "none"),
        "oracle-reflection": ("evolve.reflection", "oracle"),
        "sft-more": ("evolve.update", "sft"),
        "inference-refine": ("evolve.iterations", 0),
        "anchored-rejected": ("evolve.rejected_from", "m0"),
        "reference-m0": ("dpo.reference", "m0"),
        "iterations-3": ("evolve.iterations", 3),
        "refine-best-of-4": ("evolve.refinement_samples", 4),
    }
    assert set(NAMES) == set(expected)
    for name in NAMES:
        config = load_config(ABLATIONS / f"{name}.yaml")
        section, key = expected[name][0].split(".")
        assert getattr(getattr(config, section), key) == expected[name][1], name
        assert config.run.m0_from == "runs/esconv-cpu" and config.run.name != "esconv-cpu"
        assert config.data.train_path.endswith("esconv/train.jsonl")  # extends configs/esconv-cpu.yaml
    assert load_config(ABLATIONS / "sft-more.yaml").evolve.match_steps_of == "runs/esconv-cpu"
    assert "m0+refine" in load_config(ABLATIONS / "inference-refine.yaml").eval.models
    assert "m3" in load_config(ABLATIONS / "iterations-3.yaml").eval.models


def test_defaults_are_the_method_and_contradictions_are_refused() -> None:
    from esc_evolve.config import ExperimentConfig
    from esc_evolve.errors import ConfigError

    default = ExperimentConfig()
    assert (default.evolve.reflection, default.evolve.rejected_from, default.evolve.update) == (
        "generated",
        "current",
        "dpo",
    )
    assert default.dpo.reference == "current" and default.run.m0_from is None and default.eval.context_seed is None
    with pytest.raises(ConfigError, match="update 'sft'"):
        load_config(None, ["evolve.update=sft", "evolve.rejected_from=m0"])
    with pytest.raises(ConfigError, match="match_steps_of"):
        load_config(None, ["evolve.match_steps_of=runs/x"])
    with pytest.raises(ConfigError, match="evolve.reflection"):
        load_config(None, ["evolve.reflection=gold"])


# ---------------------------------------------------------------------------------------------------------
# Code paths, without a pipeline


class _Generator(ScriptedGenerator):
    """The loop test's scripted model; the plain 'improve your reply' prompt is answered like a refinement."""

    def _answer(self, request):
        if not request.continuation and "Now write an improved reply" in request.messages[0]["content"]:
            return GenerationResult(REFINED, 20, "stop", request.id)
        return super()._answer(request)


def _pairs(tmp_path: Path, tokenizer, rejected=None, **evolve) -> list:
    config = ExperimentConfig.model_validate(
        {"run": {"output_dir": str(tmp_path)}, "evolve": {"contexts_per_iteration": 4, **evolve}}
    )
    contexts = select_contexts(config, 1)
    generator = _Generator()
    generate(
        config.evolve,
        contexts,
        generator,
        tmp_path / "pairs.jsonl",
        iteration=1,
        seed=42,
        system_prompt=config.data.system_prompt,
        tokenizer=tokenizer,
        risk_detector=NoRiskDetector(),
        rejected=rejected(contexts) if rejected else None,
        rejected_model="m0" if rejected else None,
    )
    return list(PairStore(tmp_path / "pairs.jsonl").read())


def test_no_reflection_refines_from_a_plain_prompt_without_asking_any_field(tmp_path: Path, tokenizer) -> None:
    records = _pairs(tmp_path, tokenizer, reflection="none")
    assert records and all(r.reflection == {"parsed": True, "fields": {}} for r in records)
    assert all("Now write an improved reply" in r.refine_system for r in records)
    assert all("What you noticed" not in r.refine_system and "Good support" not in r.refine_system for r in records)
    assert all(r.chosen == REFINED and r.keep for r in records)  # no reflection to fail: the pair is judged on y', y


def test_oracle_reflection_takes_emotion_and_situation_from_the_gold_profile(tmp_path: Path, tokenizer) -> None:
    from esc_evolve.evolve.reflection import ORACLE_RAW

    records = _pairs(tmp_path, tokenizer, reflection="oracle")
    for r in records:
        fields = r.reflection["fields"]
        assert fields["emotion"] == {
            "name": "emotion",
            "raw": ORACLE_RAW,
            "value": r.gold["emotion_type"].lower(),
            "status": "ok",
        }
        assert fields["situation"]["value"] == f"{r.gold['problem_type']}: {r.gold['situation']}"
        assert fields["need"]["raw"] == FIELD_ANSWERS["need"]  # a field without gold is still generated
        assert r.gold["situation"] in r.refine_system  # and the gold reaches the refinement


def test_anchored_rejected_side_replaces_the_draft_and_keeps_it(tmp_path: Path, tokenizer) -> None:
    anchor = "Tell me more about it."

    def m0_replies(contexts):
        return {s.sample_id: GenerationResult(anchor, 6, "stop", s.sample_id) for s in contexts}

    records = _pairs(tmp_path, tokenizer, rejected=m0_replies)
    assert records and all(r.rejected == anchor and r.rejected_model == "m0" for r in records)
    assert all(r.draft == LOOP.strip() for r in records)  # M_t's own draft, the one it reflected on
    assert all(r.rejected_degenerate is None for r in records)  # the filters read the anchor, not the looping draft
    default = _pairs(tmp_path / "default", tokenizer)
    line = (tmp_path / "default" / "pairs.jsonl").read_text().splitlines()[0]
    assert '"draft"' not in line and '"rejected_model"' not in line  # default records are written as before
    assert default[0].rejected == LOOP.strip()


def test_dpo_reference_m0_scores_with_m0_while_training_on_top_of_m1(tmp_path: Path, tiny_model_dir: Path) -> None:
    """dpo.reference: m0 in iteration 2: the policy starts at M1, the reference log-probs are M0's, not M1's."""
    import json

    import torch

    from esc_evolve.models import load_model
    from esc_evolve.pipeline import RunDir
    from esc_evolve.training.dpo import build_dpo_trainer
    from esc_evolve.training.settings import resolve_runtime
    from tests.test_dpo import _completion_logps, _m0, _random_adapter_on, _write_pairs
    from tests.test_dpo import _config as dpo_config

    config = dpo_config(tmp_path, tiny_model_dir, max_steps=2)
    run = RunDir.create(config)
    m0 = _m0(run.path, tiny_model_dir)
    m1 = run.path / "iter1/m1"
    _random_adapter_on(config, m0, m1)
    _write_pairs(run.path)
    rows = [json.loads(line) for line in (run.path / "iter1/preference.jsonl").open()]
    runtime = resolve_runtime(config.model, config.dpo)
    trainer = build_dpo_trainer(
        config.dpo, config.model, rows, runtime, m1, config.run.seed, tmp_path / "work", [], reference=m0
    )
    batch = next(iter(trainer.get_train_dataloader()))
    m0_logps = _completion_logps(load_model(config.model, adapter=m0)[0], batch)
    m1_logps = _completion_logps(load_model(config.model, adapter=m1)[0], batch)
    assert not torch.allclose(m0_logps, m1_logps, atol=1e-2)
    torch.testing.assert_close(_completion_logps(trainer.model, batch), m1_logps, atol=1e-3, rtol=0)  # policy: M1
    trainer.train()
    assert (_completion_logps(trainer.model, batch) - m1_logps).abs().max() > 0.05  # the policy moved
    # The model the loss takes its reference log-probs from (trl: `self.ref_model` when there is one) is M0.
    chosen, rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    torch.testing.assert_close(torch.cat([chosen, rejected]).float(), m0_logps, atol=1e-3, rtol=0)


def test_m0_from_refuses_what_is_not_an_m0_of_this_backbone(tmp_path: Path, tiny_model_dir: Path) -> None:
    from esc_evolve.errors import ConfigError
    from esc_evolve.pipeline.stages import share_m0
    from tests.test_dpo import _config as dpo_config
    from tests.test_dpo import _m0, _random_adapter_on

    config = dpo_config(tmp_path, tiny_model_dir)
    source = tmp_path / "source"
    m0 = _m0(source, tiny_model_dir)
    with pytest.raises(ConfigError, match="neither a run directory"):
        share_m0(tmp_path / "nowhere", tmp_path / "run/m0", str(tiny_model_dir))
    with pytest.raises(ConfigError, match="trained on"):
        share_m0(source, tmp_path / "run/m0", "another-backbone")
    _random_adapter_on(config, m0, source / "iter1/m1")
    with pytest.raises(ConfigError, match="not an M0"):
        share_m0(source / "iter1/m1", tmp_path / "run/m0", str(tiny_model_dir))
    summary = share_m0(source, tmp_path / "run/m0", str(tiny_model_dir))  # a run directory: its m0/
    assert summary["m0_from"] == str(m0.resolve())
    assert (tmp_path / "run/m0/adapter_model.safetensors").read_bytes() == (
        m0 / "adapter_model.safetensors"
    ).read_bytes()


# ---------------------------------------------------------------------------------------------------------
# End to end on the tiny model (no-reflection runs in tests/test_compare.py, in the default suite)


@pytest.mark.slow
def test_every_ablation_runs_end_to_end(
    tmp_path: Path, reference_run: Path, varied_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from esc_evolve.evaluation.responses import read_rows
    from esc_evolve.models.lineage import adapter_chain

    def run(name: str) -> tuple[Path, dict]:
        path = run_ablation(name, tmp_path / name, varied_model_dir, reference_run, monkeypatch)
        stages = json.loads((path / "stages.json").read_text())
        assert stages["sft"]["m0_from"] == str((reference_run / "m0").resolve()) and "eval" in stages, name
        return path, stages

    def pairs(path: Path, iteration: int) -> list[dict]:
        return [json.loads(line) for line in (path / f"iter{iteration}/pairs.jsonl").read_text().splitlines()]

    path, stages = run("oracle-reflection")
    assert all(p["reflection"]["fields"]["emotion"]["raw"] == "(gold annotation)" for p in pairs(path, 1))

    path, stages = run("sft-more")
    reference_steps = json.loads((reference_run / "stages.json").read_text())["iter1.dpo"]["steps"]
    assert list(stages) == ["prepare", "sft", "iter1.sft", "eval"]
    assert stages["iter1.sft"]["steps"] == stages["iter1.sft"]["matched_steps"] == reference_steps
    assert stages["iter1.sft"]["samples"] == 4 and not (path / "iter1/pairs.jsonl").exists()
    assert adapter_chain(path / "iter1/m1")[1] == [(path / "m0").resolve(), (path / "iter1/m1").resolve()]

    path, stages = run("inference-refine")
    refined = [r for r in read_rows(path / "eval/responses.jsonl") if r.model == "m0+refine"]
    assert len(refined) == 6 and all(r.reflection is not None and r.reflection.emotion == "anxiety" for r in refined)
    assert all(r.meta["draft"] and r.response != r.meta["draft"] for r in refined)
    times = json.loads((path / "eval/generation_time.json").read_text())
    assert times["m0+refine"]["seconds_per_reply"] > 0 and "m0" in times
    assert stages["eval"]["models"] == ["base", "m0", "m0+refine", "human"]

    path, stages = run("anchored-rejected")
    anchors = {
        row["request_id"]: row["text"].strip()
        for row in map(json.loads, (path / "iter2/anchor.jsonl").read_text().splitlines())
    }
    second = pairs(path, 2)
    assert second and all(p["rejected"] == anchors[p["sample_id"]] and p["rejected_model"] == "m0" for p in second)
    assert all("draft" not in p for p in pairs(path, 1))  # in iteration 1, M0 is M_t: its own draft

    path, stages = run("reference-m0")
    assert stages["iter2.dpo"]["reference"] == str(path / "m0") and "reference" not in stages["iter1.dpo"]

    path, stages = run("iterations-3")
    assert stages["iter3.dpo"]["steps"] > 0 and stages["eval"]["models"][-2:] == ["m3", "human"]
