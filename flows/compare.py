"""`quant-release compare RUN_A RUN_B`: two release runs side by side, read back from MLflow.

A run is named by its MLflow run id or by its quant-release run id (the `quant_release.run_id` tag, as
printed by `quant-release run`). Shown: the params that differ, and every metric of either run with the
change from A to B, so "what changed, and what did it do" is one command rather than two browser tabs.
"""

from __future__ import annotations

from typing import Any

from quant_release.errors import ConfigError


def find_run(client: Any, name: str) -> Any:
    """The parent run with this MLflow run id or quant-release run id; ConfigError if there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(name)
    except MlflowException:
        pass
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, filter_string=f"tags.`quant_release.run_id` = '{name}'", max_results=2)
    if not found:
        raise ConfigError(f"no MLflow run with run id or quant-release run id {name!r}")
    return found[0]


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def compare_table(a: Any, b: Any) -> str:
    """Params that differ, then all metrics with B − A (and B / A where A is not zero)."""
    name_a, name_b = a.info.run_name or a.info.run_id, b.info.run_name or b.info.run_id
    lines = [f"A: {name_a} ({a.info.run_id}, {a.info.status})", f"B: {name_b} ({b.info.run_id}, {b.info.status})", ""]
    params_a, params_b = a.data.params, b.data.params
    differing = sorted(k for k in set(params_a) | set(params_b) if params_a.get(k) != params_b.get(k))
    if differing:
        width = max(len(k) for k in differing)
        lines.append(f"{'param':<{width}}  A | B")
        lines += [f"{k:<{width}}  {params_a.get(k, '-')} | {params_b.get(k, '-')}" for k in differing]
    else:
        lines.append("params: identical")
    metrics_a, metrics_b = a.data.metrics, b.data.metrics
    keys = sorted(set(metrics_a) | set(metrics_b))
    if keys:
        width = max(len(k) for k in keys)
        lines += ["", f"{'metric':<{width}}  {'A':>12} {'B':>12} {'B - A':>12} {'B / A':>8}"]
        for key in keys:
            va, vb = metrics_a.get(key), metrics_b.get(key)
            delta = f"{vb - va:+.6g}" if va is not None and vb is not None else "-"
            ratio = f"{vb / va:.3f}x" if va and vb is not None else "-"
            lines.append(f"{key:<{width}}  {_number(va):>12} {_number(vb):>12} {delta:>12} {ratio:>8}")
    return "\n".join(lines)


def compare(tracking_uri: str, run_a: str, run_b: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    return compare_table(find_run(client, run_a), find_run(client, run_b))
