"""What a study leaves behind: the table of trials (printed and CSV), ``best.yaml`` and the "command center" figures.

Everything is read back from the study's database, so any machine that reaches it can write the
report. The figures follow the lectures: every trial's validation curve on one plot beside its
training loss as a moving average; the final metric against each hyperparameter (log axes for log
ranges: which parameter matters shows at a glance); and the stage-2 ranges inside the stage-1 ranges.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lightning_tricks.monitoring.plots import _new_figure  # the package's Agg figure (PNG and logger arrays)
from lightning_tricks.tuning.space import Distribution, parse_distribution

STATE_NAMES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
               "WAITING": "waiting"}


def rows(study: Any) -> list[dict[str, Any]]:
    """One dict per trial: number, state, stage, epochs, value, each parameter, seconds, reason."""
    names = list((study.user_attrs.get("settings") or {}).get("space", {}))
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("reason", "").startswith("surplus"):
            continue
        curves = t.user_attrs.get("curves") or {}
        row: dict[str, Any] = {
            "trial": t.number, "state": STATE_NAMES.get(t.state.name, t.state.name.lower()),
            "stage": t.user_attrs.get("stage"), "epochs": curves.get("epochs"),
            "value": t.value if t.value is not None else (curves.get("metric") or [[None, None]])[-1][1],
        }
        row.update({n: t.params.get(n) for n in names})
        row["seconds"] = t.user_attrs.get("seconds")
        row["reason"] = t.user_attrs.get("reason", "")
        out.append(row)
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(table: Sequence[dict[str, Any]], metric: str) -> str:
    """A fixed-width text table of :func:`rows` (the metric column named after ``metric``)."""
    if not table:
        return "(no trials)"
    headers = [metric if k == "value" else k for k in table[0]]
    cells = [[_cell(v) for v in row.values()] for row in table]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip() for cell in cells]
    return "\n".join(lines)


def write_csv(table: Sequence[dict[str, Any]], path: Path, metric: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        if table:
            writer = csv.writer(f)
            writer.writerow([metric if k == "value" else k for k in table[0]])
            writer.writerows([["" if v is None else v for v in row.values()] for row in table])
    return path


def best_trial(study: Any) -> Any | None:
    """The COMPLETE trial with the best value (ties: the later stage, then the lower number), or None."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]
    if not done:
        return None
    sign = 1.0 if study.direction.name == "MAXIMIZE" else -1.0
    return max(done, key=lambda t: (sign * t.value, t.user_attrs.get("stage", 0), -t.number))


def write_best(config: dict[str, Any], path: Path, header: str) -> Path:
    """Write a complete ``fit`` config with a comment header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    path.write_text(comment + yaml.safe_dump(config, sort_keys=False))
    return path


# -- figures --------------------------------------------------------------------------------------
def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` points (non-finite points are skipped).

    Examples:
        >>> moving_average([1.0, 3.0, 5.0, 7.0], 2)
        [1.0, 2.0, 4.0, 6.0]
    """
    out, kept = [], []
    for v in values:
        if math.isfinite(v):
            kept.append(v)
            kept = kept[-window:]
        out.append(sum(kept) / len(kept) if kept else math.nan)
    return out


def _stage_colors(stages: int) -> list[str]:
    return ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"][: max(stages, 1)]


def curves_figure(study: Any, metric: str) -> Any:
    """Training loss (moving average) and validation metric of every trial; colour = stage, dashed = pruned."""
    fig = _new_figure(11, 4.2)
    ax_loss, ax_val = fig.subplots(1, 2)
    colors = _stage_colors(5)
    for t in study.get_trials(deepcopy=False):
        curves = t.user_attrs.get("curves") or {}
        stage = int(t.user_attrs.get("stage") or 1)
        style = "--" if t.state.name == "PRUNED" else (":" if t.state.name == "FAIL" else "-")
        color = colors[(stage - 1) % len(colors)]
        loss = curves.get("train_loss") or []
        if loss:
            ax_loss.plot([p[0] for p in loss], moving_average([p[1] for p in loss], 10), style, color=color,
                         alpha=0.6, lw=1)
        val = curves.get("metric") or []
        if val:
            ax_val.plot([p[0] + 1 for p in val], [p[1] for p in val], style, marker=".", color=color, alpha=0.7,
                        lw=1)
    ax_loss.set(title="training loss (moving average of 10 logged steps)", xlabel="step", ylabel="loss")
    ax_loss.set_yscale("log")
    ax_val.set(title=f"validation {metric} per epoch", xlabel="epoch", ylabel=metric)
    handles = [ax_val.plot([], [], color=c, label=f"stage {k + 1}")[0] for k, c in enumerate(colors[:2])]
    handles.append(ax_val.plot([], [], "--", color="gray", label="pruned")[0])
    ax_val.legend(handles=handles, fontsize=8)
    return fig


def _space(study: Any) -> dict[str, Distribution]:
    space = (study.user_attrs.get("settings") or {}).get("space", {})
    return {n: parse_distribution(n, spec) for n, spec in space.items()}


def params_figure(study: Any, metric: str) -> Any:
    """The final metric against each hyperparameter (log axis for log ranges), one panel per parameter."""
    space = _space(study)
    n = max(len(space), 1)
    fig = _new_figure(3.6 * n, 3.4)
    axes = fig.subplots(1, n, squeeze=False)[0]
    colors = _stage_colors(5)
    done = [t for t in study.get_trials(deepcopy=False) if t.value is not None and t.state.name == "COMPLETE"]
    for ax, (name, dist) in zip(axes, space.items(), strict=False):
        for t in done:
            if name not in t.params:
                continue
            x = t.params[name]
            if dist.kind == "choice":
                x = list(dist.choices).index(x) if x in dist.choices else math.nan
            ax.scatter([x], [t.value], s=18, color=colors[(int(t.user_attrs.get("stage") or 1) - 1) % 5])
        if dist.kind == "choice":
            ax.set_xticks(range(len(dist.choices)), [str(c) for c in dist.choices])
        elif dist.log:
            ax.set_xscale("log")
        ax.set(xlabel=name.rsplit(".", 1)[-1], ylabel=metric, title=name, )
        ax.title.set_fontsize(8)
    return fig


def ranges_figure(study: Any) -> Any:
    """Each numeric parameter's range per stage as horizontal bars (stage 2 inside stage 1), log axes for log."""
    space = {n: d for n, d in _space(study).items() if d.numeric}
    stage_ranges: dict[int, dict[str, Any]] = {}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("ranges") and t.user_attrs.get("stage"):
            stage_ranges.setdefault(int(t.user_attrs["stage"]), t.user_attrs["ranges"])
    n = max(len(space), 1)
    fig = _new_figure(6, 0.9 + 1.0 * n)
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    colors = _stage_colors(5)
    for ax, (name, dist) in zip(axes, space.items(), strict=False):
        for stage, ranges in sorted(stage_ranges.items()):
            if name in ranges:
                d = parse_distribution(name, ranges[name])
                ax.barh([-stage], [d.high - d.low], left=[d.low], height=0.6, color=colors[(stage - 1) % 5],
                        label=f"stage {stage}")
        ax.set_yticks([-k for k in sorted(stage_ranges)], [f"stage {k}" for k in sorted(stage_ranges)])
        if dist.log:
            ax.set_xscale("log")
        ax.set_xlim(dist.low * (0.8 if dist.log else 1), dist.high * (1.25 if dist.log else 1))
        ax.set_title(name, fontsize=8)
    return fig


def write_figures(study: Any, folder: Path, metric: str, loggers: Sequence[Any] = ()) -> list[Path]:
    """Write ``curves.png``, ``params.png`` and ``ranges.png`` into ``folder``; also send them to ``loggers``
    that take images (TensorBoard, Weights & Biases: see ``monitoring.plots.log_figure``)."""
    from lightning_tricks.monitoring.plots import log_figure, save_figure

    figures = {"curves": curves_figure(study, metric), "params": params_figure(study, metric),
               "ranges": ranges_figure(study)}
    for name, figure in figures.items():
        log_figure(loggers, f"tune/{name}", figure, step=0)
    return [save_figure(figure, folder / f"{name}.png") for name, figure in figures.items()]


def config_loggers(config: dict[str, Any], folder: Path) -> list[Any]:
    """The loggers of a ``fit`` config (``trainer.logger`` class paths), writing into ``folder``; none for
    ``logger: false``. A logger that cannot be built here is skipped (the PNG files are written anyway)."""
    import importlib

    spec = (config.get("trainer") or {}).get("logger")
    out = []
    for entry in spec if isinstance(spec, list) else [spec]:
        if not isinstance(entry, dict) or "class_path" not in entry:
            continue
        module, _, name = entry["class_path"].rpartition(".")
        args = dict(entry.get("init_args") or {})
        if "save_dir" in args:
            args.update(save_dir=str(folder), name="figures")
        try:
            cls = getattr(importlib.import_module(module), name)
            from lightning.pytorch.loggers import TensorBoardLogger

            if callable(getattr(cls, "log_image", None)) or issubclass(cls, TensorBoardLogger):
                out.append(cls(**args))  # only loggers that take images (a CSV logger would leave an empty folder)
        except Exception as err:  # an optional logger package missing, an offline service: not fatal here
            print(f"figures not sent to {name}: {type(err).__name__}: {err}".splitlines()[0], flush=True)
    return out


__all__ = ["best_trial", "curves_figure", "format_table", "moving_average", "params_figure", "ranges_figure",
           "config_loggers", "rows", "write_best", "write_csv", "write_figures"]
