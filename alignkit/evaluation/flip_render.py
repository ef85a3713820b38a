"""The report files of a comparison: ``flips.json``, ``report.md``, ``flips.png``, and the terminal summary.

``flips.json`` holds the metrics, intervals, McNemar p-value, counts, settings and the ids of every
flipped item; ``report.md`` a summary table and the first ``show`` flipped items with id, reference, old
and new; ``flips.png`` (matplotlib, skipped with a warning when matplotlib is missing) the flip counts.
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


def format_summary(report: FlipReport) -> str:
    """A plain-text summary table for the terminal."""
    rows = summary_rows(report)
    level = report.summary["settings"]["confidence"]
    header = ("metric", "value", f"{level:.0%} CI" if report.summary["settings"]["bootstrap"] else "")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    lines = [f"{header[0]:<{widths[0]}}  {header[1]:>{widths[1]}}  {header[2]}".rstrip()]
    lines.append("-" * (sum(widths) + 4))
    lines += [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c}".rstrip() for a, b, c in rows]
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


def markdown_report(report: FlipReport, show: int = 50, plot_name: str | None = "flips.png") -> str:
    """report.md: summary table, settings, and the first ``show`` flipped items of each kind."""
    s = report.summary
    sources = ", ".join(f"{k}: `{v}`" for k, v in s["sources"].items())
    lines = ["# Negative flip report", "", f"{s['items']:,} items ({sources}); correctness: {s['settings']['correctness']}.", ""]
    lines += ["## Summary", "", "| metric | value | interval |", "| --- | ---: | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(report)]
    st = s["settings"]
    lines += ["", f"Intervals: {st['confidence']:.0%}, {st['ci_method']}. McNemar: exact two-sided binomial test "
              "on the discordant items (negative vs positive flips)." if "discrete" in s else
              f"Intervals: {st['confidence']:.0%}, {st['ci_method']}.", ""]
    if plot_name:
        lines += [f"![flip counts]({plot_name})", ""]
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
    return "\n".join(lines)


def plot_report(report: FlipReport, path: str | Path) -> Path | None:
    """flips.png: the four flip counts (and a histogram of score deltas); ``None`` without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: flips.png skipped (pip install matplotlib)", stacklevel=2)
        return None
    s = report.summary
    panels = [p for p in ("discrete", "scores") if p in s]
    fig = Figure(figsize=(5.5 * len(panels), 3.8), dpi=100)
    FigureCanvasAgg(fig)
    for k, panel in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), k)
        if panel == "discrete":
            c = s["discrete"]["counts"]
            names = ["kept correct", "negative flips", "positive flips", "kept wrong"]
            values = [c["kept_correct"], c["negative_flips"], c["positive_flips"], c["kept_wrong"]]
            bars = ax.bar(names, values, color=["#4c9f70", "#d1495b", "#2e86ab", "#9e9e9e"])
            for bar, v in zip(bars, values):
                ax.annotate(f"{v:,}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
            ax.set_ylabel("items")
            ax.set_title(f"NFR {s['discrete']['nfr']:.4f}, PFR {s['discrete']['pfr']:.4f}")
            ax.tick_params(axis="x", labelsize=8)
        else:
            delta = report.data.new.score - report.data.old.score
            counts, edges = np.histogram(delta, bins=50)
            ax.stairs(counts, edges, fill=True, color="#2e86ab")
            t = s["scores"]["threshold"]
            for x in {-t, t}:
                ax.axvline(x, color="#d1495b", linestyle="--", linewidth=1)
            ax.set_xlabel("score delta (new - old)")
            ax.set_ylabel("items")
            ax.set_title(f"score NFR {s['scores']['nfr']:.4f}, PFR {s['scores']['pfr']:.4f}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def write_report(report: FlipReport, out_dir: str | Path, *, show: int = 50, plot: bool = True) -> dict[str, Path]:
    """Write flips.json, report.md and flips.png into ``out_dir``; the paths written, by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "flips.json"}
    paths["json"].write_text(_json_text(report), encoding="utf-8")
    png = plot_report(report, out / "flips.png") if plot else None
    if png is not None:
        paths["png"] = png
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text(markdown_report(report, show, "flips.png" if png is not None else None), encoding="utf-8")
    return paths
