"""The same seed and config give the same results: two runs of the tiny pipeline in separate processes.

What is compared (tests/pipeline_fixtures.py, `results_of`): every JSON-lines file (pairs, preference pairs,
evaluation responses) byte for byte, every adapter (M0, M1) bit for bit, and metrics.json and stages.json
without clocks, throughput, the commit and the run's own path. Both runs are on this CPU with the same library
versions and one torch thread; GPU kernels and vLLM are not covered (README, "Reliability").
"""

from __future__ import annotations

from pathlib import Path

from tests.pipeline_fixtures import assert_same_results, results_of, run_to_end


def test_two_runs_in_separate_processes_give_the_same_results(
    reference_run: Path, varied_model_dir: Path, tmp_path: Path
) -> None:
    again = run_to_end(tmp_path, varied_model_dir, hash_seed=2)  # another process, another hash seed
    expected, got = results_of(reference_run), results_of(again)
    assert got["stages"]["iter1.dpo"]["steps"] == 2 and got["stages"]["iter1.pairs"]["kept"] > 0  # DPO trained
    assert set(got["adapters"]) == {"m0", "iter1/m1"}
    assert {"iter1/pairs.jsonl", "iter1/preference.jsonl", "eval/responses.jsonl"} == set(got["jsonl"])
    assert_same_results(got, expected)
