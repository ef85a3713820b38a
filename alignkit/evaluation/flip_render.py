"""The report files of a comparison: ``flips.json``, ``report.md``, ``flips.png``, and the terminal summary.

``flips.json`` holds the metrics, intervals, McNemar p-value, counts, settings, the model names, the
``--max-nfr`` gate's verdict and the ids of every flipped item; ``report.md`` the model names, the gate's
verdict, the 2×2 old × new table (the McNemar view), a summary table with intervals and the first ``show``
flipped items with id, reference, old and new; ``flips.png`` the 2×2 counts, accuracy and NFR / PFR with
their intervals (and the budget), and the score deltas. A training run's flip guard history
(``flip_guard.json``, :mod:`alignkit.evaluation.flip_guard`) is drawn over the training steps by
:func:`plot_flip_guard` (``flip_guard.png``), and added to a report by ``write_report(..., flip_guard=...)``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignkit.evaluation.flip_data import Column, take, text_form
from alignkit.evaluation.flip_summary import FlipReport


def _json_array(col: Column, indices: np.ndarray) -> str:
    """``json.dumps(ids)`` of the selected ids, built in Arrow when they are integers or plain strings."""
    if isinstance(col, pa.Array) and indices.size:
        picked = col.take(pa.array(indices, pa.int64()))
        if pa.types.is_integer(col.type):
            return "[" + _join(pc.cast(picked, pa.string()), ", ") + "]"
        is_text = pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
        if is_text and not pc.any(pc.match_substring_regex(picked, r'["\\\x00-\x1f]')).as_py():  # nothing to escape
            return '["' + _join(picked, '", "') + '"]'
    return json.dumps(take(col, indices), ensure_ascii=False)


def _join(strings: pa.Array, separator: str) -> str:
    one_list = pa.ListArray.from_arrays(pa.array([0, len(strings)], pa.int32()), strings.cast(pa.string()))
    return pc.binary_join(one_list, separator)[0].as_py()


def _json_text(report: FlipReport) -> str:
    """flips.json: the summary indented, each id list on one line."""
    body = json.dumps(report.summary, indent=2, ensure_ascii=False)
    lists = report.id_indices()
    if not lists:
        return body + "\n"
    parts = [f'  "{key}": {_json_array(report.data.ids, indices)}' for key, indices in lists.items()]
    return body[: body.rindex("}")].rstrip() + ",\n" + ",\n".join(parts) + "\n}\n"


def _cell(value, limit: int = 120) -> str:
    text = text_form(value)
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "⏎")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}"


def _fmt_ci(ci) -> str:
    return "" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def summary_rows(report: FlipReport) -> list[tuple[str, str, str]]:
    """(metric, value, interval) rows of the summary table."""
    s = report.summary
    rows: list[tuple[str, str, str]] = [("items", f"{s['items']:,}", "")]
    if "discrete" in s:
        d, ci = s["discrete"], s["discrete"].get("ci", {})
        rows += [
            ("accuracy old", _fmt(d["accuracy_old"]), _fmt_ci(ci.get("accuracy_old"))),
            ("accuracy new", _fmt(d["accuracy_new"]), _fmt_ci(ci.get("accuracy_new"))),
            ("accuracy delta", f"{d['accuracy_delta']:+.4f}", _fmt_ci(ci.get("accuracy_delta"))),
            ("NFR (negative flip rate)", _fmt(d["nfr"]), _fmt_ci(ci.get("nfr"))),
            ("PFR (positive flip rate)", _fmt(d["pfr"]), _fmt_ci(ci.get("pfr"))),
            ("NFR multi-class", _fmt(d["nfr_mc"]), _fmt_ci(ci.get("nfr_mc"))),
            ("NFI (negative flip impact)", _fmt(d["nfi"]), _fmt_ci(ci.get("nfi"))),
            ("BTC (backward trust compat.)", _fmt(d["btc"]), _fmt_ci(ci.get("btc"))),
            ("negative / positive flips", f"{d['negative_flips']:,} / {d['positive_flips']:,}", ""),
            ("McNemar p-value", f"{d['mcnemar']['p_value']:.4g}", ""),
        ]
    if "scores" in s:
        sc, ci = s["scores"], s["scores"].get("ci", {})
        rows += [
            ("mean score old", _fmt(sc["mean_old"]), ""),
            ("mean score new", _fmt(sc["mean_new"]), ""),
            ("mean score delta", f"{sc['mean_delta']:+.4f}", _fmt_ci(ci.get("mean_delta"))),
            (f"score NFR (delta < {-sc['threshold'] + 0.0:g})", _fmt(sc["nfr"]), _fmt_ci(ci.get("nfr"))),
            (f"score PFR (delta > {sc['threshold']:g})", _fmt(sc["pfr"]), _fmt_ci(ci.get("pfr"))),
            ("mean gain / mean regression", f"{sc['mean_gain']:.4f} / {sc['mean_regression']:.4f}", ""),
        ]
    return rows


def contingency_table(report: FlipReport) -> list[list[str]] | None:
    """The 2×2 old × new table (the McNemar view) as rows of cells, header first: old right/wrong by new
    right/wrong with totals; the off-diagonal cells are the negative and positive flips. ``None`` without
    per-item correctness."""
    if "discrete" not in report.summary:
        return None
    c, n = report.summary["discrete"]["counts"], report.summary["items"]
    names = report.summary.get("models", {"old": "old", "new": "new"})
    old_right, old_wrong = c["kept_correct"] + c["negative_flips"], c["positive_flips"] + c["kept_wrong"]
    new_right, new_wrong = c["kept_correct"] + c["positive_flips"], c["negative_flips"] + c["kept_wrong"]
    return [
        [f"old ({names['old']}) / new ({names['new']})", "new right", "new wrong", "total"],
        ["old right", f"{c['kept_correct']:,}", f"{c['negative_flips']:,} (negative flips)", f"{old_right:,}"],
        ["old wrong", f"{c['positive_flips']:,} (positive flips)", f"{c['kept_wrong']:,}", f"{old_wrong:,}"],
        ["total", f"{new_right:,}", f"{new_wrong:,}", f"{n:,}"],
    ]


def gate_line(report: FlipReport) -> str | None:
    """The ``--max-nfr`` gate's verdict in one line (``None`` when no budget was given)."""
    gate = report.summary.get("gate")
    if gate is None:
        return None
    what = "negative flips" if gate["basis"] == "discrete" else "score regressions"
    if gate["passed"]:
        return (f"PASSED: NFR {gate['nfr']:.4f} ({gate['basis']}) is within the budget --max-nfr {gate['max_nfr']:g} "
                f"({gate['regressed']:,} {what} of {gate['items']:,} items)")
    return (f"FAILED: NFR {gate['nfr']:.4f} ({gate['basis']}) is above the budget --max-nfr {gate['max_nfr']:g}: "
            f"{gate['regressed']:,} of {gate['items']:,} items regressed ({what}; their ids are in flips.json)")


def _text_table(rows: list[list[str]], right: bool = True) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [(c.rjust(w) if right else c.ljust(w)) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
    return lines


def format_summary(report: FlipReport) -> str:
    """A plain-text summary for the terminal: the models, the 2×2 table, the metrics, the gate's verdict."""
    rows = summary_rows(report)
    names = report.summary.get("models")
    lines = [f"old: {names['old']}  ->  new: {names['new']}", ""] if names else []
    table = contingency_table(report)
    if table is not None:
        lines += _text_table(table) + [""]
    level = report.summary["settings"]["confidence"]
    header = ("metric", "value", f"{level:.0%} CI" if report.summary["settings"]["bootstrap"] else "")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    lines.append(f"{header[0]:<{widths[0]}}  {header[1]:>{widths[1]}}  {header[2]}".rstrip())
    lines.append("-" * (sum(widths) + 4))
    lines += [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c}".rstrip() for a, b, c in rows]
    verdict = gate_line(report)
    if verdict:
        lines += ["", f"gate: {verdict}"]
    return "\n".join(lines)


def _item_table(report: FlipReport, indices: np.ndarray, show: int, with_delta: bool = False) -> list[str]:
    data = report.data
    picked = indices[:show]
    ids = take(data.ids, picked)
    refs = take(data.reference, picked) if data.reference is not None else [None] * len(picked)
    if data.old.prediction is not None and data.new.prediction is not None:
        olds, news = take(data.old.prediction, picked), take(data.new.prediction, picked)
    else:
        olds, news = [None] * len(picked), [None] * len(picked)
    head = "| id | reference | old | new |" + (" old score | new score | delta |" if with_delta else "")
    rule = "| --- | --- | --- | --- |" + (" ---: | ---: | ---: |" if with_delta else "")
    lines = [head, rule]
    for k, i in enumerate(picked):
        row = f"| {_cell(ids[k])} | {_cell(refs[k])} | {_cell(olds[k]) if olds[k] is not None else ''} | " \
              f"{_cell(news[k]) if news[k] is not None else ''} |"
        if with_delta:
            o, nw = data.old.score[i], data.new.score[i]
            row += f" {o:.4g} | {nw:.4g} | {nw - o:+.4g} |"
        lines.append(row)
    return lines


def markdown_report(report: FlipReport, show: int = 50, plot_name: str | None = "flips.png",
                    flip_guard: dict | None = None, flip_guard_plot: str | None = None) -> str:
    """report.md: the models, the gate's verdict, the 2×2 table, the summary table, settings, the first
    ``show`` flipped items of each kind, and a training run's flip guard history when given."""
    s = report.summary
    names = s.get("models", {"old": "old", "new": "new"})
    sources = ", ".join(f"{k}: `{v}`" for k, v in s["sources"].items())
    lines = [f"# Negative flip report: {_cell(names['old'])} → {_cell(names['new'])}", "",
             f"Old model: **{_cell(names['old'])}**; new model: **{_cell(names['new'])}**.", "",
             f"{s['items']:,} items ({sources}); correctness: {s['settings']['correctness']}.", ""]
    verdict = gate_line(report)
    if verdict:
        lines += ["## Gate", "", f"**{verdict}**", ""]
    else:
        lines += ["No NFR budget given (alignkit flips --max-nfr): no gate verdict.", ""]
    table = contingency_table(report)
    if table is not None:
        lines += ["## Old × new (McNemar view)", "", "| " + " | ".join(table[0]) + " |", "| --- | ---: | ---: | ---: |"]
        lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
        p = s["discrete"]["mcnemar"]["p_value"]
        lines += ["", f"The off-diagonal cells are the flips; McNemar's exact test on them: p = {p:.4g}.", ""]
    lines += ["## Summary", "", "| metric | value | interval |", "| --- | ---: | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(report)]
    st = s["settings"]
    lines += ["", f"Intervals: {st['confidence']:.0%}, {st['ci_method']}. McNemar: exact two-sided binomial test "
              "on the discordant items (negative vs positive flips)." if "discrete" in s else
              f"Intervals: {st['confidence']:.0%}, {st['ci_method']}.", ""]
    if plot_name:
        lines += [f"![old × new counts, accuracy and NFR with their intervals]({plot_name})", ""]
    if "discrete" in s:
        for title, indices in (("Negative flips (old right, new wrong)", report.negative),
                               ("Positive flips (old wrong, new right)", report.positive)):
            shown = min(show, indices.size)
            lines += [f"## {title}: {indices.size:,} items" + (f", first {shown}" if shown < indices.size else ""), ""]
            lines += (_item_table(report, indices, show) if indices.size else ["None."]) + [""]
    if "scores" in s:
        delta = report.data.new.score[report.regressions] - report.data.old.score[report.regressions]
        k = min(show, delta.size)
        if k and k < delta.size:
            top = np.argpartition(delta, k - 1)[:k]
        else:
            top = np.arange(delta.size)
        top = top[np.argsort(delta[top], kind="stable")]
        lines += [f"## Score regressions (delta < {-s['scores']['threshold'] + 0.0:g}): {delta.size:,} items"
                  + (f", the {k} largest" if k < delta.size else ", largest first"), ""]
        lines += (_item_table(report, report.regressions[top], show, with_delta=True) if k else ["None."]) + [""]
    if flip_guard is not None:
        lines += flip_guard_section(flip_guard, flip_guard_plot)
    return "\n".join(lines)


def flip_guard_section(history: dict, plot_name: str | None = None) -> list[str]:
    """report.md lines for a training run's flip guard (its ``flip_guard.json``): NFR and accuracy per step."""
    budget = history.get("max_nfr")
    lines = ["## Flip guard during training", "",
             f"{history.get('items', '?')} held-out items, evaluated every {history.get('eval_steps', '?')} steps; "
             f"starting accuracy {history.get('accuracy_old', 0.0):.4f}; action {history.get('action')}"
             + (f", budget NFR <= {budget:g}" if budget is not None else ", no budget") + ".", ""]
    if plot_name:
        lines += [f"![flip guard: NFR and accuracy over training steps]({plot_name})", ""]
    lines += ["| step | accuracy | NFR | PFR | negative flips | within budget |", "| ---: | ---: | ---: | ---: | ---: | --- |"]
    for h in history.get("history", []):
        lines.append(f"| {h['step']} | {h['accuracy']:.4f} | {h['nfr']:.4f} | {h['pfr']:.4f} | {h['negative_flips']} | "
                     f"{'yes' if h.get('within_budget', True) else 'no'} |")
    if history.get("best"):
        lines += ["", f"Best within the budget: step {history['best']['step']} (saved to `{history['best']['path']}`)."]
    if history.get("stopped_at") is not None:
        lines += ["", f"Training stopped at step {history['stopped_at']} (NFR above the budget)."]
    return lines + [""]


_GREEN, _RED, _BLUE, _GREY = "#4c9f70", "#d1495b", "#2e86ab", "#9e9e9e"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def flip_figure(report: FlipReport):
    """The ``matplotlib`` figure of flips.png: the 2×2 old × new counts, accuracy (old, new) and NFR / PFR as
    points with their intervals and the ``--max-nfr`` budget, and (with scores) the histogram of score deltas.
    Titled with the model names and the gate's verdict."""
    s = report.summary
    panels = (["table", "rates"] if "discrete" in s else []) + (["scores"] if "scores" in s else [])
    fig = _figure(4.8 * len(panels), 4.2)
    names = s.get("models", {"old": "old", "new": "new"})
    gate = s.get("gate")
    title = f"{names['old']} → {names['new']} ({s['items']:,} items)"
    if gate is not None:
        title += f"; gate NFR <= {gate['max_nfr']:g}: {'PASSED' if gate['passed'] else 'FAILED'}"
    fig.suptitle(title, fontsize=10, color=_RED if gate is not None and not gate["passed"] else "black")
    for k, panel in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), k)
        if panel == "table":
            c = s["discrete"]["counts"]
            grid = np.array([[c["kept_correct"], c["negative_flips"]], [c["positive_flips"], c["kept_wrong"]]])
            colors = np.array([[_GREEN, _RED], [_BLUE, _GREY]])
            labels = np.array([["kept right", "negative flips"], ["positive flips", "kept wrong"]])
            for i in range(2):
                for j in range(2):
                    ax.add_patch(_rectangle((j, 1 - i), colors[i, j]))
                    ax.text(j + 0.5, 1.5 - i, f"{grid[i, j]:,}\n{labels[i, j]}", ha="center", va="center",
                            fontsize=9, color="white")
            ax.set_xlim(0, 2)
            ax.set_ylim(0, 2)
            ax.set_xticks([0.5, 1.5], ["new right", "new wrong"])
            ax.set_yticks([1.5, 0.5], ["old right", "old wrong"])
            ax.set_title(f"old × new (McNemar p = {s['discrete']['mcnemar']['p_value']:.3g})", fontsize=9)
        elif panel == "rates":
            d, ci = s["discrete"], s["discrete"].get("ci", {})
            rows = [("accuracy old", d["accuracy_old"], ci.get("accuracy_old"), _GREY),
                    ("accuracy new", d["accuracy_new"], ci.get("accuracy_new"), _GREEN),
                    ("NFR", d["nfr"], ci.get("nfr"), _RED), ("PFR", d["pfr"], ci.get("pfr"), _BLUE)]
            for y, (label, value, interval, color) in enumerate(reversed(rows)):
                if interval is not None:
                    ax.errorbar(value, y, xerr=[[value - interval[0]], [interval[1] - value]], fmt="o", color=color,
                                capsize=4, label=label)
                    ax.annotate(f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]", (value, y),
                                textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
                else:
                    ax.plot([value], [y], "o", color=color, label=label)
                    ax.annotate(f"{value:.3f}", (value, y), textcoords="offset points", xytext=(0, 7), ha="center",
                                fontsize=8)
            if gate is not None and gate["basis"] == "discrete":
                ax.axvline(gate["max_nfr"], color=_RED, linestyle="--", linewidth=1)
                ax.annotate(f"--max-nfr {gate['max_nfr']:g}", (gate["max_nfr"], 1.45), fontsize=8, color=_RED,
                            ha="left", xytext=(3, 0), textcoords="offset points")
            ax.set_yticks(range(len(rows)), [r[0] for r in reversed(rows)])
            ax.set_ylim(-0.6, len(rows) - 0.3)
            ax.set_xlim(-0.02, 1.02)
            level = s["settings"]["confidence"]
            ax.set_title(f"rates with {level:.0%} intervals" if ci else "rates (no intervals: bootstrap 0)", fontsize=9)
        else:
            delta = report.data.new.score - report.data.old.score
            counts, edges = np.histogram(delta, bins=50)
            ax.stairs(counts, edges, fill=True, color=_BLUE)
            t = s["scores"]["threshold"]
            for x in {-t, t}:
                ax.axvline(x, color=_RED, linestyle="--", linewidth=1)
            ax.set_xlabel("score delta (new - old)")
            ax.set_ylabel("items")
            ax.set_title(f"score NFR {s['scores']['nfr']:.4f}, PFR {s['scores']['pfr']:.4f}", fontsize=9)
    fig.tight_layout()
    return fig


def _rectangle(xy, color):
    from matplotlib.patches import Rectangle

    return Rectangle(xy, 1, 1, facecolor=color, edgecolor="white", linewidth=2)


def _save_figure(build, path: str | Path, name: str) -> Path | None:
    """``build()``'s figure saved at ``path``; ``None`` (with a warning naming ``name``) without matplotlib."""
    try:
        fig = build()
    except ImportError:
        warnings.warn(f"matplotlib is not installed: {name} skipped (pip install matplotlib)", stacklevel=3)
        return None
    path = Path(path)
    fig.savefig(path)
    return path


def plot_report(report: FlipReport, path: str | Path) -> Path | None:
    """flips.png (:func:`flip_figure`); ``None`` (with a warning) without matplotlib."""
    return _save_figure(lambda: flip_figure(report), path, "flips.png")


def flip_guard_figure(history: dict):
    """The figure of a flip guard history (``flip_guard.json``): accuracy (and the starting accuracy) and
    NFR / PFR over the training steps, the budget as a dashed line, the best step and the stop marked."""
    steps = [h["step"] for h in history.get("history", [])]
    fig = _figure(9.0, 3.6)
    acc_ax, nfr_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    acc_ax.plot(steps, [h["accuracy"] for h in history["history"]], "o-", color=_GREEN, label="accuracy")
    acc_ax.axhline(history.get("accuracy_old", 0.0), color=_GREY, linestyle=":", label="starting model")
    acc_ax.set_title("held-out accuracy", fontsize=9)
    nfr_ax.plot(steps, [h["nfr"] for h in history["history"]], "o-", color=_RED, label="NFR")
    nfr_ax.plot(steps, [h["pfr"] for h in history["history"]], "s-", color=_BLUE, label="PFR")
    if history.get("max_nfr") is not None:
        nfr_ax.axhline(history["max_nfr"], color=_RED, linestyle="--", linewidth=1, label=f"budget {history['max_nfr']:g}")
    nfr_ax.set_title("flip rates against the starting model", fontsize=9)
    for ax in (acc_ax, nfr_ax):
        if history.get("best"):
            ax.axvline(history["best"]["step"], color=_GREEN, linestyle="--", linewidth=1, label="best")
        if history.get("stopped_at") is not None:
            ax.axvline(history["stopped_at"], color="black", linestyle="--", linewidth=1, label="stopped")
        ax.set_xlabel("training step")
        ax.legend(fontsize=8)
    fig.suptitle(f"flip guard ({history.get('items', '?')} items, action {history.get('action')})", fontsize=10)
    fig.tight_layout()
    return fig


def plot_flip_guard(history: dict | str | Path, path: str | Path) -> Path | None:
    """flip_guard.png of a flip guard history (a dict or the path of ``flip_guard.json``); ``None`` when the
    history has no evaluation yet or matplotlib is missing."""
    if not isinstance(history, dict):
        history = json.loads(Path(history).read_text(encoding="utf-8"))
    if not history.get("history"):
        return None
    return _save_figure(lambda: flip_guard_figure(history), path, "flip_guard.png")


def write_report(report: FlipReport, out_dir: str | Path, *, show: int = 50, plot: bool = True,
                 flip_guard: str | Path | dict | None = None) -> dict[str, Path]:
    """Write flips.json, report.md and flips.png into ``out_dir``; the paths written, by name. ``flip_guard``:
    a training run's ``flip_guard.json`` (or its directory, or the dict), added to report.md with its plot."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "flips.json"}
    paths["json"].write_text(_json_text(report), encoding="utf-8")
    png = plot_report(report, out / "flips.png") if plot else None
    if png is not None:
        paths["png"] = png
    guard = guard_png = None
    if flip_guard is not None:
        guard = read_flip_guard(flip_guard)
        guard_png = plot_flip_guard(guard, out / "flip_guard.png") if plot else None
        if guard_png is not None:
            paths["flip_guard_png"] = guard_png
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text(markdown_report(report, show, "flips.png" if png is not None else None, guard,
                                                 "flip_guard.png" if guard_png is not None else None), encoding="utf-8")
    return paths


def read_flip_guard(source: str | Path | dict) -> dict:
    """A flip guard history: a dict as it is, or read from ``flip_guard.json`` (or the run directory holding it)."""
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / "flip_guard.json"
    if not path.exists():
        raise FileNotFoundError(f"no flip guard history {path} (a training run with flip_guard_data writes it)")
    return json.loads(path.read_text(encoding="utf-8"))
