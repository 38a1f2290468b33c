"""MMLU results as tables and a chart, for MLflow, the Prefect UI and the model card. Reads records only.

- `subject_table`: one row per (level, name) with both variants' counts, accuracies and standard errors;
  MLflow's `log_table` takes it as columns.
- `category_rows`: the categories and the overall row, as the Prefect table artifact shows them.
- `plot_categories`: a PNG bar chart per category, BF16 vs FP8, with ±1 standard error bars.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quant_release.mmlu import CATEGORY_TITLES
from quant_release.records import MmluGroupScore, MmluResult, MmluScores

LEVEL_ORDER = ("category", "subcategory", "subject")


def _groups(scores: MmluScores) -> dict[tuple[str, str], MmluGroupScore]:
    return {(g.level, g.name): g for g in scores.groups}


def subject_table(result: MmluResult) -> dict[str, list[Any]]:
    """Columns of the per-group table: level, name, questions, then per variant correct/accuracy/stderr."""
    bf16, fp8 = _groups(result.bf16), _groups(result.fp8)
    keys = sorted(bf16, key=lambda k: (LEVEL_ORDER.index(k[0]), k[1]))
    columns: dict[str, list[Any]] = {
        name: []
        for name in (
            "level",
            "name",
            "questions",
            "bf16_correct",
            "bf16_accuracy",
            "bf16_stderr",
            "fp8_correct",
            "fp8_accuracy",
            "fp8_stderr",
            "delta",
        )
    }
    for key in keys:
        a, b = bf16[key], fp8[key]
        for column, value in (
            ("level", key[0]),
            ("name", key[1]),
            ("questions", a.total),
            ("bf16_correct", a.correct),
            ("bf16_accuracy", a.accuracy),
            ("bf16_stderr", a.stderr),
            ("fp8_correct", b.correct),
            ("fp8_accuracy", b.accuracy),
            ("fp8_stderr", b.stderr),
            ("delta", b.accuracy - a.accuracy),
        ):
            columns[column].append(value)
    return columns


def category_rows(result: MmluResult) -> list[dict[str, Any]]:
    """Categories then the overall row, accuracies in percent (two decimals), for a table artifact."""
    bf16, fp8 = _groups(result.bf16), _groups(result.fp8)
    rows = []
    for key, title in CATEGORY_TITLES.items():
        if ("category", key) in bf16:
            a, b = bf16[("category", key)], fp8[("category", key)]
            rows.append(_row(title, a.total, a.accuracy, a.stderr, b.accuracy, b.stderr))
    rows.append(
        _row(
            "all",
            result.questions,
            result.bf16.accuracy,
            result.bf16.stderr or 0.0,
            result.fp8.accuracy,
            result.fp8.stderr or 0.0,
        )
    )
    return rows


def _row(name: str, questions: int, bf16: float, bf16_se: float, fp8: float, fp8_se: float) -> dict[str, Any]:
    return {
        "category": name,
        "questions": questions,
        "BF16 %": round(100 * bf16, 2),
        "BF16 ± SE": round(100 * bf16_se, 2),
        "FP8 %": round(100 * fp8, 2),
        "FP8 ± SE": round(100 * fp8_se, 2),
        "FP8 - BF16 pp": round(100 * (fp8 - bf16), 2),
    }


def plot_categories(result: MmluResult, path: Path) -> Path:
    """Accuracy per category and overall, BF16 and FP8 side by side, ±1 standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = category_rows(result)
    labels = [f"{r['category'].split(' (')[0]}\n(n={r['questions']})" for r in rows]
    positions = range(len(rows))
    width = 0.38
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for offset, variant, color in ((-width / 2, "BF16", "#4c72b0"), (width / 2, "FP8", "#dd8452")):
        ax.bar(
            [p + offset for p in positions],
            [r[f"{variant} %"] for r in rows],
            width,
            yerr=[r[f"{variant} ± SE"] for r in rows],
            capsize=3,
            color=color,
            label=variant,
        )
    ax.axhline(25.0, color="grey", linestyle=":", linewidth=1, label="chance (25%)")
    ax.set_xticks(list(positions), labels, fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"MMLU {result.num_fewshot}-shot, {result.scoring} scoring, {result.questions} questions", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
