"""`esc-evolve compare` on the tiny pipeline: the reference run and one ablation that shares its M0 (self-refinement
alone, tests/test_ablations.py), one table against a baseline row, the refusal of runs on other contexts, and
seeds of one config pooled."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from esc_evolve.cli.app import app
from esc_evolve.evaluation.responses import read_rows, write_responses
from tests.test_ablations import run_ablation

runner = CliRunner()


@pytest.fixture(scope="module")
def ablation_run(tmp_path_factory: pytest.TempPathFactory, reference_run: Path, varied_model_dir: Path) -> Path:
    """The `no-reflection` ablation, one iteration, from the reference run's M0."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_ablation(
            "no-reflection", tmp_path_factory.mktemp("ablation"), varied_model_dir, reference_run, monkeypatch
        )


def test_an_ablation_starts_from_the_shared_m0(reference_run: Path, ablation_run: Path) -> None:
    stages = json.loads((ablation_run / "stages.json").read_text())
    assert stages["sft"]["m0_from"] == str((reference_run / "m0").resolve())
    assert stages["sft"]["steps"] == json.loads((reference_run / "stages.json").read_text())["sft"]["steps"]
    assert not (ablation_run / "sft-checkpoints").exists()  # SFT was not repeated
    for name in ("adapter_model.safetensors", "esc_lineage.json"):
        assert (ablation_run / "m0" / name).read_bytes() == (reference_run / "m0" / name).read_bytes()
    pairs = [json.loads(line) for line in (ablation_run / "iter1/pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["reflection"]["fields"] == {} for p in pairs)
    assert stages["iter1.dpo"]["steps"] > 0  # its pairs were kept and trained on


def test_compare_one_table_against_the_baseline(tmp_path: Path, reference_run: Path, ablation_run: Path) -> None:
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(reference_run), str(ablation_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "compare.json").read_text())
    ref, abl = reference_run.name, ablation_run.name
    assert data["baseline"] == f"{ref}:m0"
    assert data["rows"] == [f"{ref}:base", f"{ref}:m0", f"{ref}:m1", f"{abl}:base", f"{abl}:m0", f"{abl}:m1", "human"]
    # The same numbers as each run's own report: the same responses, metrics and settings.
    own = json.loads((reference_run / "metrics.json").read_text())["estimates"]
    for metric, value in own["m1"].items():
        assert data["estimates"][f"{ref}:m1"][metric]["value"] == pytest.approx(value["value"], nan_ok=True), metric
    # Both runs share M0, so their m0 rows answer alike and differ by nothing.
    same = data["differences"][f"{abl}:m0"]
    assert all(v["value"] == pytest.approx(0.0, abs=1e-9) and not v["significant"] for v in same.values())
    diff = data["differences"][f"{abl}:m1"]["length"]
    expected = data["estimates"][f"{abl}:m1"]["length"]["value"] - data["estimates"][f"{ref}:m0"]["length"]["value"]
    assert diff["value"] == pytest.approx(expected) and diff["ci_low"] <= diff["value"] <= diff["ci_high"]
    # Length control: every per-context metric of every row but the baseline, an intercept with a CI.
    controlled = data["length_controlled"][f"{abl}:m1"]
    assert controlled and all(
        v["ci_low"] <= v["value"] <= v["ci_high"] for v in controlled.values() if v["ci_low"] is not None
    )
    # Per run: reflections and pairs per iteration, generation time per row.
    assert set(data["pairs"]) == {ref, abl}
    it = data["pairs"][ref][0]
    stages = json.loads((reference_run / "stages.json").read_text())
    assert it["iteration"] == 1 and it["kept"] == stages["iter1.pairs"]["kept"] and it["dpo_steps"] == 2
    assert it["kept_pairs"]["chosen_words"] > 0 and 0 <= it["kept_pairs"]["similarity"] <= 1
    assert any("emotion_match" in v for v in data["reflection_accuracy"][ref].values())
    assert data["reflection_accuracy"][abl] == {}  # no reflection was written: nothing to score
    assert data["generation_time"][f"{ref}:m1"]["seconds_per_reply"] > 0
    text = (out / "compare.md").read_text()
    for heading in (
        "Metrics",
        f"Differences from {ref}:m0",
        "Length-controlled",
        "Pairs per iteration",
        "Reflection accuracy",
    ):
        assert heading in text
    assert (out / "compare.html").read_text().startswith("<!doctype html>")

    bad = runner.invoke(app, ["compare", str(reference_run), "-o", str(out), "-b", "nope:m1"])
    assert bad.exit_code == 2 and "nope:m1" in bad.output


def test_runs_on_other_contexts_are_refused(tmp_path: Path, reference_run: Path, ablation_run: Path) -> None:
    moved = _copy_run(ablation_run, tmp_path / "moved")
    rows = read_rows(moved / "eval/responses.jsonl")
    dropped = rows[0].sample_id
    write_responses(moved / "eval/responses.jsonl", [r for r in rows if r.sample_id != dropped])
    result = runner.invoke(app, ["compare", str(reference_run), str(moved), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "different contexts" in message and "moved differs from" in message and "1 contexts" in message
    assert reference_run.name in message and "Traceback" not in result.output


def test_seeds_of_one_config_are_pooled(tmp_path: Path, reference_run: Path, ablation_run: Path) -> None:
    """A second seed of the ablation (its run directory copied, run.seed changed with eval.context_seed kept, m1's
    replies cut short so that the seeds differ): one group, mean and spread over seeds, pooled CIs."""
    seed2 = _copy_run(ablation_run, tmp_path / "seed2")
    saved = yaml.safe_load((seed2 / "config.yaml").read_text())
    saved["run"].update(seed=7, name="seed2")
    saved["eval"]["context_seed"] = 42
    (seed2 / "config.yaml").write_text(yaml.safe_dump(saved))
    rows = read_rows(seed2 / "eval/responses.jsonl")
    cut = [r.model_copy(update={"response": " ".join(r.response.split()[:3])}) if r.model == "m1" else r for r in rows]
    write_responses(seed2 / "eval/responses.jsonl", cut)

    out = tmp_path / "cmp"
    runs = [str(reference_run), str(ablation_run), str(seed2)]
    result = runner.invoke(app, ["compare", *runs, "--out", str(out), "--baseline", f"{ablation_run.name}:m0"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "compare.json").read_text())
    assert data["baseline"] == f"{ablation_run.name}:m0"  # the same M0 as the reference run's: the same values
    group = f"{ablation_run.name} (2 seeds)"
    assert data["seed_groups"] == {reference_run.name: [reference_run.name], group: [ablation_run.name, "seed2"]}
    pooled = data["seeds"][f"{group}:m1"]["length"]
    per_seed = [data["estimates"][f"{run}:m1"]["length"]["value"] for run in (ablation_run.name, "seed2")]
    assert per_seed[0] != per_seed[1]
    assert pooled["seeds"] == 2 and pooled["mean"] == pytest.approx(np.mean(per_seed))
    assert pooled["sd"] == pytest.approx(np.std(per_seed, ddof=1))
    assert pooled["pooled"]["value"] == pytest.approx(np.mean(per_seed))
    assert pooled["pooled"]["ci_low"] <= pooled["pooled"]["value"] <= pooled["pooled"]["ci_high"]
    base = data["estimates"][f"{reference_run.name}:m0"]["length"]["value"]
    assert pooled["pooled_difference"]["value"] == pytest.approx(np.mean(per_seed) - base)
    # Seeds widen the interval: resampling seeds adds their spread to the contexts'.
    single = data["estimates"][f"{ablation_run.name}:m1"]["length"]
    assert pooled["pooled"]["ci_high"] - pooled["pooled"]["ci_low"] > 0
    assert single["ci_high"] - single["ci_low"] > 0
    distinct = data["seeds"][f"{group}:m1"]["distinct_2"]["pooled_difference"]  # corpus-level: pooled too
    assert distinct["ci_low"] <= distinct["value"] <= distinct["ci_high"]  # both sides debiased alike
    assert "Seeds pooled" in (out / "compare.md").read_text()


def _copy_run(run: Path, target: Path) -> Path:
    shutil.copytree(run, target, ignore=shutil.ignore_patterns(".lock"))
    return target
