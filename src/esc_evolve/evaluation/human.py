"""Blinded A/B human evaluation: export rating sheets, import them back, unblind, score, measure agreement.

Export writes to a folder: `sheet.csv` (one row per item: context and two anonymous responses, empty criterion
columns to fill with 1, 2 or tie), `form.html` (the same items as a static page that downloads a filled CSV; no
server), `instructions.md`, and `key.json`, the hidden key (which model wrote response 1 and 2 of each item;
do not share it with raters). Items and the side each model is shown on are shuffled with the seed.

Import reads any number of filled CSVs (one per rater: a `rater` column, else the file name), unblinds them
with the key, and reports per (pair, criterion): the win rate of the pair's first model (ties count half), and
inter-rater agreement on the items every rater rated: Cohen's kappa for 2 raters, Fleiss' kappa for 3 or more,
over the unblinded categories (first model wins / second wins / tie).
"""

from __future__ import annotations

import csv
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from esc_evolve.errors import DataFormatError
from esc_evolve.evaluation.judge.prompts import render_context
from esc_evolve.evaluation.responses import ResponsesTable
from esc_evolve.storage import write_atomic, write_json_atomic

DEFAULT_CRITERIA = ("empathy", "personalisation", "helpfulness", "overall")
CHOICES = {"1": "1", "2": "2", "tie": "tie", "a": "1", "b": "2", "t": "tie", "=": "tie"}


def export_sheets(
    table: ResponsesTable,
    pairs: list[tuple[str, str]],
    out_dir: Path,
    n_items: int = 50,
    seed: int = 42,
    criteria: tuple[str, ...] = DEFAULT_CRITERIA,
) -> dict[str, Path]:
    """Blinded sheets for `n_items` contexts per pair (fewer if the table is smaller)."""
    for pair in pairs:
        if not set(pair) <= set(table.models):
            raise DataFormatError(f"pair {pair} names a model not in the responses ({', '.join(table.models)})")
    rng = np.random.default_rng(seed)
    items, key = [], {}
    for a, b in pairs:
        for i in sorted(rng.choice(len(table), size=min(n_items, len(table)), replace=False).tolist()):
            shown = [a, b] if rng.random() < 0.5 else [b, a]
            items.append({"context": render_context(table.samples[i]), "pair": (a, b), "shown": shown, "index": i})
    rng.shuffle(items)
    rows = []
    for number, item in enumerate(items, start=1):
        item_id = f"item{number:04d}"
        i = item["index"]
        key[item_id] = {
            "sample_id": table.samples[i].sample_id,
            "pair": list(item["pair"]),
            "response_1": item["shown"][0],
            "response_2": item["shown"][1],
        }
        rows.append(
            {
                "item_id": item_id,
                "context": item["context"],
                "response_1": table.responses[item["shown"][0]][i],
                "response_2": table.responses[item["shown"][1]][i],
            }
        )
    out_dir = Path(out_dir)
    columns = ["rater", "item_id", "context", "response_1", "response_2", *criteria, "comment"]
    write_atomic(out_dir / "sheet.csv", _csv(columns, [{"rater": "", **r} for r in rows]))
    write_atomic(out_dir / "form.html", _form_html(rows, criteria))
    write_atomic(out_dir / "instructions.md", _instructions(criteria))
    write_json_atomic(
        out_dir / "key.json",
        {"criteria": list(criteria), "pairs": [list(p) for p in pairs], "seed": seed, "items": key},
    )
    return {name: out_dir / name for name in ("sheet.csv", "form.html", "instructions.md", "key.json")}


def _csv(columns: list[str], rows: list[dict[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _instructions(criteria: tuple[str, ...]) -> str:
    return (
        "# Rating instructions\n\nEach item shows an emotional-support conversation and two candidate replies of the"
        " supporter. For each criterion write 1 if reply 1 is better, 2 if reply 2 is better, or tie.\n\n"
        f"Criteria: {', '.join(criteria)}.\n\n- empathy: the seeker would feel understood\n- personalisation: the"
        " reply fits this particular seeker, not anyone\n- helpfulness: a good next step for this moment\n"
        "- overall: which reply you would rather receive\n\nFill sheet.csv (put your name in the rater column) or"
        " open form.html in a browser and press 'Download CSV'. Do not guess who wrote a reply.\n"
    )


def _form_html(rows: list[dict[str, str]], criteria: tuple[str, ...]) -> str:
    data = json.dumps({"items": rows, "criteria": list(criteria)}).replace("</", "<\\/")
    return _FORM.replace("__DATA__", data).replace("__CRITERIA__", html.escape(", ".join(criteria)))


_FORM = """<!doctype html><html><head><meta charset="utf-8"><title>Rating form</title><style>
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}.item{border:1px solid #ccc;
border-radius:6px;padding:1em;margin:1em 0}.ctx{white-space:pre-wrap;background:#f6f6f6;padding:.5em}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:1em;margin:.5em 0}.resp{border:1px solid #ddd;padding:.5em}
</style></head><body><h1>Which reply is better?</h1><p>For each item and criterion (__CRITERIA__) choose reply 1,
reply 2 or tie. Then press <b>Download CSV</b> and send the file back.</p>
<p>Your name: <input id="rater"></p><div id="items"></div><button onclick="save()">Download CSV</button>
<script>
const DATA = __DATA__;
const root = document.getElementById("items");
function esc(s){const d=document.createElement("div");d.textContent=s;return d.innerHTML;}
DATA.items.forEach(it => {
  let h = `<div class="item"><b>${esc(it.item_id)}</b><div class="ctx">${esc(it.context)}</div><div class="pair">`;
  h += `<div class="resp"><b>Reply 1</b><br>${esc(it.response_1)}</div>`;
  h += `<div class="resp"><b>Reply 2</b><br>${esc(it.response_2)}</div></div>`;
  DATA.criteria.forEach(c => {
    h += `<div>${esc(c)}: ` + ["1","2","tie"].map(v =>
      `<label><input type="radio" name="${it.item_id}-${c}" value="${v}"> ${v === "tie" ? "tie" : "reply " + v}</label>`
    ).join(" ") + `</div>`;
  });
  h += `<div>comment: <input size="60" id="${it.item_id}-comment"></div></div>`;
  root.insertAdjacentHTML("beforeend", h);
});
function cell(s){s=String(s??"");return /[",\\n]/.test(s)?'"'+s.replace(/"/g,'""')+'"':s;}
function save(){
  const rater = document.getElementById("rater").value.trim();
  if(!rater){alert("Please enter your name.");return;}
  const cols = ["rater","item_id",...DATA.criteria,"comment"];
  const lines = [cols.join(",")];
  DATA.items.forEach(it => {
    const pick = c => document.querySelector(`input[name="${it.item_id}-${c}"]:checked`);
    const vals = DATA.criteria.map(c => (pick(c) || {}).value || "");
    lines.push([rater,it.item_id,...vals,document.getElementById(it.item_id+"-comment").value].map(cell).join(","));
  });
  const blob = new Blob([lines.join("\\n")+"\\n"], {type:"text/csv"});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob); a.download = "ratings-" + rater.replace(/\\W+/g,"_") + ".csv"; a.click();
}
</script></body></html>
"""


# ---------------------------------------------------------------------------------------------------------
# Import


@dataclass
class PairCriterionResult:
    pair: tuple[str, str]
    criterion: str
    wins: int
    ties: int
    losses: int
    win_rate: float  # of pair[0]; ties count half
    agreement: float | None  # Cohen's (2 raters) or Fleiss' (3+) kappa; None with 1 rater / no common items
    agreement_measure: str | None
    n_common_items: int


def read_ratings(paths: list[Path], criteria: list[str]) -> dict[str, dict[str, dict[str, str]]]:
    """rater -> item_id -> criterion -> '1' | '2' | 'tie' (blank cells are not ratings and are left out)."""
    ratings: dict[str, dict[str, dict[str, str]]] = {}
    for path in paths:
        with Path(path).open(encoding="utf-8-sig", newline="") as handle:
            for line, row in enumerate(csv.DictReader(handle), start=2):
                if not row.get("item_id"):
                    raise DataFormatError(f"{path}:{line}: missing item_id")
                rater = (row.get("rater") or "").strip() or Path(path).stem
                for criterion in criteria:
                    value = (row.get(criterion) or "").strip().lower()
                    if not value:
                        continue
                    if value not in CHOICES:
                        raise DataFormatError(f"{path}:{line}: {criterion}={value!r}; expected 1, 2 or tie")
                    ratings.setdefault(rater, {}).setdefault(row["item_id"].strip(), {})[criterion] = CHOICES[value]
    return ratings


def import_ratings(key_path: Path, sheet_paths: list[Path]) -> dict[str, Any]:
    key = json.loads(Path(key_path).read_text(encoding="utf-8"))
    criteria, items = key["criteria"], key["items"]
    ratings = read_ratings(sheet_paths, criteria)
    unknown = {i for r in ratings.values() for i in r} - set(items)
    if unknown:
        raise DataFormatError(f"ratings for items not in the key (wrong key file?): {sorted(unknown)[:3]}")
    results = []
    for pair in [tuple(p) for p in key["pairs"]]:
        for criterion in criteria:
            results.append(_score_pair(pair, criterion, items, ratings))
    rows = [
        {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.__dict__.items()}
        for r in results
    ]  # NaN is not JSON
    return {"raters": sorted(ratings), "criteria": criteria, "results": rows}


def unblind(choice: str, item: dict[str, Any]) -> str:
    """'first' / 'second' (the pair's models, in the pair's order) or 'tie'."""
    if choice == "tie":
        return "tie"
    model = item["response_1"] if choice == "1" else item["response_2"]
    return "first" if model == item["pair"][0] else "second"


def _score_pair(pair, criterion, items, ratings) -> PairCriterionResult:
    mine = {i for i, it in items.items() if tuple(it["pair"]) == pair}
    labels: dict[str, dict[str, str]] = {}  # rater -> item -> unblinded label
    for rater, by_item in ratings.items():
        for item_id, values in by_item.items():
            if item_id in mine and criterion in values:
                labels.setdefault(rater, {})[item_id] = unblind(values[criterion], items[item_id])
    flat = [v for by_item in labels.values() for v in by_item.values()]
    wins, ties, losses = flat.count("first"), flat.count("tie"), flat.count("second")
    rate = (wins + 0.5 * ties) / len(flat) if flat else float("nan")
    kappa, measure, common = agreement(list(labels.values()))
    return PairCriterionResult(pair, criterion, wins, ties, losses, rate, kappa, measure, common)


def agreement(per_rater: list[dict[str, str]]) -> tuple[float | None, str | None, int]:
    """Kappa over the items every rater labelled."""
    if len(per_rater) < 2:
        return None, None, 0
    common = sorted(set.intersection(*(set(r) for r in per_rater)))
    if not common:
        return None, None, 0
    categories = ["first", "second", "tie"]
    if len(per_rater) == 2:
        from sklearn.metrics import cohen_kappa_score

        a, b = ([r[i] for i in common] for r in per_rater)
        if len(set(a) | set(b)) == 1:
            return float("nan"), "cohen", len(common)  # one category used by both: kappa is 0/0, undefined
        return float(cohen_kappa_score(a, b, labels=categories)), "cohen", len(common)
    counts = np.array([[sum(r[i] == c for r in per_rater) for c in categories] for i in common])
    return fleiss_kappa(counts), "fleiss", len(common)


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss (1971) kappa from an items x categories matrix of rater counts (same number of raters per item).

    Written by hand because statsmodels (which has it) is not a dependency; the formula is five lines."""
    counts = np.asarray(counts, dtype=float)
    n_raters = counts.sum(axis=1)
    if not np.all(n_raters == n_raters[0]) or n_raters[0] < 2:
        raise ValueError("Fleiss' kappa needs the same number (>= 2) of ratings for every item")
    n = n_raters[0]
    p_category = counts.sum(axis=0) / counts.sum()
    p_item = ((counts**2).sum(axis=1) - n) / (n * (n - 1))
    expected = float((p_category**2).sum())
    if expected == 1.0:
        return float("nan")  # every rating in one category: kappa is 0/0, undefined
    return float((p_item.mean() - expected) / (1 - expected))


def render_human_report(result: dict[str, Any]) -> str:
    lines = [
        "# Human evaluation",
        "",
        f"Raters: {', '.join(result['raters'])}",
        "",
        "| pair | criterion | win rate of first (%) | wins / ties / losses | agreement | common items |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        kappa = "–"
        if r["agreement_measure"] is not None:
            value = r["agreement"]
            kappa = f"{r['agreement_measure']} kappa " + (f"{value:.3f}" if value is not None else "undefined")
        rate = f"{100 * r['win_rate']:.1f}" if r["win_rate"] is not None else "–"
        lines.append(
            f"| {r['pair'][0]} vs {r['pair'][1]} | {r['criterion']} | {rate} | {r['wins']} / {r['ties']} /"
            f" {r['losses']} | {kappa} | {r['n_common_items']} |"
        )
    return "\n".join(lines) + "\n"
