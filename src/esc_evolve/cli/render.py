"""Rich rendering of data statistics and previews for the CLI."""

from __future__ import annotations

import logging
from collections import Counter

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from esc_evolve.config import ExperimentConfig
from esc_evolve.data import Split
from esc_evolve.data.labels import STRATEGIES
from esc_evolve.data.prompts import build_messages, render_prompt
from esc_evolve.data.stats import corpus_stats

log = logging.getLogger(__name__)


def print_stats(console: Console, split: Split) -> None:
    stats = corpus_stats(split.conversations)
    overview = Table(title=f"{split.source}  ({split.format})", show_header=False)
    overview.add_column("what")
    overview.add_column("count", justify="right")
    for name, value in [
        ("conversations", stats.conversations),
        ("utterances", stats.utterances),
        ("seeker utterances", stats.seeker_utterances),
        ("supporter utterances", stats.supporter_utterances),
        ("  with a strategy label", stats.supporter_utterances - stats.unlabelled_supporter_utterances),
        ("turn-level samples", len(split.samples)),
        ("skipped invalid records", len(split.skipped)),
        ("utterances per conversation (mean)", f"{stats.mean_utterances_per_conversation:.1f}"),
        ("words per seeker utterance (mean)", f"{stats.mean_words_seeker:.1f}"),
        ("words per supporter utterance (mean)", f"{stats.mean_words_supporter:.1f}"),
    ]:
        overview.add_row(name, str(value))
    console.print(overview)
    ordered = Counter({s: stats.strategies.get(s, 0) for s in STRATEGIES})
    console.print(_counter_table("strategy", ordered, stats.supporter_utterances))
    console.print(_counter_table("emotion", stats.emotions, stats.conversations))
    console.print(_counter_table("problem", stats.problems, stats.conversations))
    console.print(_counter_table("experience", stats.experiences, stats.conversations))


def _counter_table(name: str, counts: Counter[str], total: int) -> Table:
    table = Table(title=f"{name} counts")
    table.add_column(name)
    table.add_column("count", justify="right")
    table.add_column("share", justify="right")
    items = counts.items() if name == "strategy" else counts.most_common()
    for key, value in items:
        table.add_row(key, str(value), f"{100 * value / max(total, 1):.1f}%")
    table.add_row("[bold]total[/bold]", f"[bold]{sum(counts.values())}[/bold]", "")
    return table


def print_preview(console: Console, split: Split, n: int, config: ExperimentConfig) -> None:
    from esc_evolve.models import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    for sample in split.samples[:n]:
        prompt = render_prompt(tokenizer, build_messages(sample.context, config.data.system_prompt))
        profile = sample.profile
        meta = (
            f"{sample.sample_id} | target strategy: {sample.strategy} | gold profile (not in prompt): "
            f"{profile.emotion_type} / {profile.problem_type}"
        )
        console.print(Panel(prompt, title=meta, title_align="left", subtitle="prompt", highlight=False))
        console.print(Panel(sample.response, subtitle="target response", highlight=False))
