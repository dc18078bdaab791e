"""``report.md`` and ``recipe.png``: each step's validation and test accuracy against the baseline, and its time.

Everything is read from the state file (:mod:`lightning_tricks.recipe.state`), so the report of a recipe
that was killed and resumed is written from the same results as an uninterrupted one; only the times
differ (a killed step's time is the time of its re-run). Paths are relative to the output folder.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

TITLES = {"baseline": "1. baseline (your config as given)", "babysit": "2. babysit", "tune": "3. tune (2 stages)",
          "final": "4. best trial, trained to the end", "ensemble": "5. ensemble", "tta": "6. test-time augmentation"}


def pct(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}%"


def _delta(value: Any, base: Any) -> str:
    if value is None or base is None or any(isinstance(v, float) and math.isnan(v) for v in (value, base)):
        return "-"
    return f"{100 * (value - base):+.2f}"


def _time(seconds: Any) -> str:
    return "-" if seconds is None else f"{float(seconds):.1f} s"


def final_result(steps: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The step whose prediction the recipe ends with: the last adopted of final, ensemble, TTA."""
    chosen = ("final", steps.get("final", {}))
    for name in ("ensemble", "tta"):
        if steps.get(name, {}).get("adopted"):
            chosen = (name, steps[name])
    return chosen


def step_status(name: str, result: dict[str, Any]) -> str:
    if not result:
        return "not run"
    if result.get("skipped"):
        return "skipped: " + result["skipped"]
    if name == "babysit":
        if result.get("passed"):
            return "passed"
        return "FAILED" if result.get("stop", True) else "warning (the loss drops slowly: left to the search)"
    if name in ("ensemble", "tta"):
        return "adopted" if result.get("adopted") else "not adopted (not better on validation)"
    return "done"


def markdown(steps: dict[str, dict[str, Any]], settings: dict[str, Any], figure: str | None) -> str:
    """The report's text (``steps``: step -> result, as in the state file)."""
    base = steps.get("baseline", {})
    lines = ["# lightning-tricks recipe report", "",
             "Command: `lightning-tricks recipe " + shlex.join(settings.get("argv", [])) + "`", ""]
    if steps.get("final"):
        name, res = final_result(steps)
        lines += [f"**Result**: test accuracy {pct(res.get('test_acc'))} ({TITLES[name]}) against "
                  f"{pct(base.get('test_acc'))} for the baseline ({_delta(res.get('test_acc'), base.get('test_acc'))}"
                  " points); validation accuracy "
                  f"{pct(res.get('val_acc'))} against {pct(base.get('val_acc'))}.", ""]
    lines += ["| step | status | val acc | test acc | test vs baseline (points) | val NLL | test NLL | time |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, title in TITLES.items():
        r = steps.get(name, {})
        lines.append(f"| {title} | {step_status(name, r)} | {pct(r.get('val_acc'))} | {pct(r.get('test_acc'))} | "
                     f"{_delta(r.get('test_acc'), base.get('test_acc'))} | {_num(r.get('val_loss'))} | "
                     f"{_num(r.get('test_loss'))} | {_time(r.get('seconds'))} |")
    total = sum(float(r.get("seconds") or 0) for r in steps.values())
    lines += ["", f"Total time: {total:.1f} s.", ""]
    if figure:
        lines += [f"![validation and test accuracy per step, and the time each took]({figure})", ""]
    lines += _details(steps)
    return "\n".join(lines).rstrip() + "\n"


def _num(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _files(result: dict[str, Any]) -> list[str]:
    out = []
    if result.get("configs"):
        out.append("configs: " + ", ".join(f"`{p}`" for p in result["configs"]))
    if result.get("checkpoints"):
        out.append("checkpoints: " + ", ".join(f"`{p}`" for p in result["checkpoints"]))
    return [f"- {line}" for line in out]


def _details(steps: dict[str, dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for name, title in TITLES.items():
        r = steps.get(name)
        if not r:
            continue
        lines += [f"## {title}", ""]
        if name in ("baseline", "final") and r.get("epochs") is not None:
            lines.append(f"- trained {r['epochs']} epochs")
        if name == "babysit":
            for s in r.get("steps", []):
                lines.append(f"- step {s['number']} {s['name']}: {'PASS' if s['passed'] else 'FAIL'} {s['measured']}")
                if s.get("diagnosis"):
                    lines.append(f"  - diagnosis: {s['diagnosis']}")
        if name == "tune":
            lines.append(f"- {r['finished']} finished trials, stage epochs {r['stage_epochs']}; search space: "
                         + ", ".join(f"`{k}`: {v}" for k, v in r["space"].items()))
            lines.append(f"- best (stage {r['best_stage']}): {r['metric']}={r['val_metric']:.4f}, "
                         + ", ".join(f"{k}={_short(v)}" for k, v in r["best_params"].items()))
            lines.append("- top trials (position, stage, value): " + "; ".join(
                f"{t['position']}, {t['stage']}, {t['value']:.4f}" for t in r["trials"][:5]))
        if name == "ensemble" and r.get("note"):
            lines.append(f"- `{r['kind']}`: {r['note']}; members: " + ", ".join(
                f"`{p}`" for p in r.get("ensemble_members", [])))
        if name == "tta":
            for t in r.get("tried", []):
                shown = t.get("error") or f"val acc {pct(t.get('val_acc'))}, test acc {pct(t.get('test_acc'))}"
                lines.append(f"- views {t['views']}: {shown}")
        lines += _files(r) + [""]
    return lines


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def figure(steps: dict[str, dict[str, Any]], path: Path) -> Path:
    """Validation and test accuracy per step with the baseline's as dashed lines, and each step's time."""
    from lightning_tricks.monitoring.plots import _new_figure, save_figure

    names = [n for n in TITLES if steps.get(n, {}).get("val_acc") is not None]
    fig = _new_figure(11, 4.2)
    ax_acc, ax_time = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    xs = range(len(names))
    for offset, key, color in ((-0.2, "val_acc", "tab:blue"), (0.2, "test_acc", "tab:orange")):
        values = [100 * steps[n][key] for n in names]
        ax_acc.bar([x + offset for x in xs], values, width=0.4, color=color, label=key.replace("_", " "))
        base = steps.get("baseline", {}).get(key)
        if base is not None:
            ax_acc.axhline(100 * base, color=color, ls="--", lw=1, label=f"baseline {key.split('_')[0]}")
    accs = [100 * steps[n][k] for n in names for k in ("val_acc", "test_acc")]
    if accs:
        low, high = min(accs), max(accs)
        ax_acc.set_ylim(max(0.0, low - max(1.0, (high - low))), min(100.0, high + max(0.5, (high - low) / 2)))
    ax_acc.set_xticks(list(xs), [n + ("\n(not adopted)" if n in ("ensemble", "tta") and not steps[n].get("adopted")
                                      else "") for n in names])
    ax_acc.set(title="accuracy per step (dashed: the baseline)", ylabel="accuracy (%)")
    ax_acc.legend(fontsize=8, loc="lower right")
    timed = [n for n in TITLES if steps.get(n, {}).get("seconds") is not None]
    ax_time.barh(range(len(timed)), [steps[n]["seconds"] for n in timed], color="tab:gray")
    ax_time.set_yticks(range(len(timed)), timed)
    ax_time.invert_yaxis()
    ax_time.set(title="time per step", xlabel="seconds")
    return save_figure(fig, path)


def write(out: Path, steps: dict[str, dict[str, Any]], settings: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``recipe.png`` and ``report.md`` into ``out``; returns their paths."""
    png = figure(steps, out / "recipe.png")
    md = out / "report.md"
    md.write_text(markdown(steps, settings, png.name))
    return md, png


__all__ = ["TITLES", "figure", "final_result", "markdown", "pct", "step_status", "write"]
