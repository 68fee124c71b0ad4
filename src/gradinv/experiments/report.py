"""What a person reads after a grid run: one self-contained ``report.html`` and a flat ``results.csv``.

Everything here works from a plain list of record dicts (one per finished cell: case x attack x seed), so it does
not depend on how the results store keeps them. Any value of a record may be missing or ``None``.

``report.html`` is a single file: no external CSS, scripts, fonts or URLs. Each cell's truth-over-reconstruction
picture and every plot are embedded as ``data:image/png;base64`` URIs, so the file can be mailed, archived or
printed on its own. All text from the records and the meta is escaped.

Stable hooks for tools and tests: ``<table id="results">`` (one ``<tr class="cell">`` per record),
``<table id="summary">`` (one ``<tr class="group">`` per group), ``<figure class="cell-image">`` per embedded
picture, ``<figure class="plot" id="plot-...">`` per plot, ``<details id="meta">`` for the grid settings.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gradinv._atomic import atomic_path

__all__ = [
    "CSV_COLUMNS",
    "defense_short",
    "defense_strength",
    "parse_spec",
    "protocol_short",
    "render_html",
    "summarize",
    "write_csv",
    "write_report",
]

#: Columns of ``results.csv``, in order.
CSV_COLUMNS: tuple[str, ...] = (
    "key",
    "status",
    "attack",
    "model",
    "data",
    "image_size",
    "batch_size",
    "protocol",
    "clients",
    "defenses",
    "seed",
    "psnr",
    "ssim",
    "label_accuracy",
    "recovered_fraction_40db",
    "dp_epsilon",
    "update_cosine",
    "utility",
    "seconds",
    "seconds_total",
    "trained_steps",
    "threads",
    "device",
    "image",
    "reason",
)

#: The parameter that measures a defense's strength, by defense name (used for the x axis of the strength plot
#: and for the short label). A defense not listed here falls back to its first numeric parameter.
MAIN_PARAMETER: dict[str, str] = {
    "noise": "std",
    "dpsgd": "noise_multiplier",
    "prune": "fraction",
    "soteria": "fraction",
    "dropout": "p",
    "mixup": "k",
    "instahide": "k",
    "pixelate": "block",
}

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_DPI = 110
_DASH = "\u2014"  # shown for a missing value


# --------------------------------------------------------------------------------------------- specs and labels


def _parse_value(text: str) -> Any:
    text = text.strip()
    low = text.lower()
    if low in ("null", "none", ""):
        return None
    if low == "true":
        return True
    if low == "false":
        return False
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_spec(spec: Any) -> tuple[str, dict[str, Any]]:
    """``"noise:std=0.01,clip=null"`` -> ``("noise", {"std": 0.01, "clip": None})``.

    A bare ``"sign"`` gives ``("sign", {})``; a mapping with a ``"name"`` key is accepted as well. Values are
    parsed as int, float, bool or None where they look like one, else kept as strings.
    """
    if isinstance(spec, Mapping):
        params = {str(k): v for k, v in spec.items() if k != "name"}
        return str(spec.get("name", "?")), params
    text = str(spec).strip()
    name, _, rest = text.partition(":")
    params: dict[str, Any] = {}
    for part in rest.split(","):
        if not part.strip():
            continue
        key, eq, value = part.partition("=")
        params[key.strip()] = _parse_value(value) if eq else True
    return name.strip(), params


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def defense_strength(spec: Any) -> tuple[str, str | None, float | None]:
    """The defense's name, its main parameter and that parameter's numeric value (``None`` where it has none)."""
    name, params = parse_spec(spec)
    main = MAIN_PARAMETER.get(name)
    if main is not None and _is_number(params.get(main)):
        return name, main, float(params[main])
    for key, value in params.items():
        if _is_number(value):
            return name, key, float(value)
    return name, None, None


def defense_short(defenses: Any) -> str:
    """A short label for a list of defense specs: names and main values, e.g. ``"noise std=0.01 + prune
    fraction=0.9"``; ``"none"`` for an empty list."""
    if not defenses:
        return "none"
    parts = []
    for spec in _as_list(defenses):
        name, key, value = defense_strength(spec)
        parts.append(name if key is None else f"{name} {key}={_fmt_g(value)}")
    return " + ".join(parts)


def _as_list(defenses: Any) -> list:
    if not defenses:
        return []
    if isinstance(defenses, (str, Mapping)):
        return [defenses]
    return list(defenses)


def _defenses_full(defenses: Any) -> str:
    return ";".join(_spec_text(d) for d in _as_list(defenses))


def _spec_text(spec: Any) -> str:
    if isinstance(spec, Mapping):
        name, params = parse_spec(spec)
        return name + (":" + ",".join(f"{k}={_value_text(v)}" for k, v in params.items()) if params else "")
    return str(spec)


def _value_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return _fmt_g(value)
    return str(value)


def protocol_short(protocol: Any) -> str:
    """``{"name": "fedavg", "local_steps": 5, "lr": 0.1, "local_batch_size": None}`` -> ``"fedavg:local_steps=5,
    lr=0.1"`` (no spaces; unset options left out)."""
    if protocol is None:
        return ""
    if not isinstance(protocol, Mapping):
        return str(protocol)
    name = str(protocol.get("name", "?"))
    opts = [f"{k}={_value_text(v)}" for k, v in protocol.items() if k != "name" and v is not None]
    return name + (":" + ",".join(opts) if opts else "")


# --------------------------------------------------------------------------------------------------- formatting


def _num(value: Any) -> float | None:
    """A finite-or-infinite float, or None for missing / NaN / non-numeric."""
    if not _is_number(value):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _fmt_g(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}"
    return str(value)


def _fmt(value: Any, kind: str) -> str:
    """Display text for a metric (missing -> an em dash)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _DASH
    if not _is_number(value):
        return str(value)
    v = float(value)
    if math.isinf(v):
        return "\u221e" if v > 0 else "-\u221e"
    if kind == "int":
        return str(int(v)) if v.is_integer() else f"{v:g}"
    if kind == "db":
        return f"{v:.2f}"
    if kind == "ssim":
        return f"{v:.3f}"
    if kind == "pct":
        return f"{100 * v:.0f}%"
    if kind == "sec":
        return f"{v:.1f}" if v < 100 else f"{v:.0f}"
    return f"{v:.3g}"


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _median(values: Iterable[Any]) -> float | None:
    nums = [v for v in (_num(x) for x in values) if v is not None]
    return statistics.median(nums) if nums else None


def _sort_part(value: Any) -> tuple:
    if value is None:
        return (2, 0.0, "")
    if _is_number(value):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _record_order(rec: Mapping[str, Any]) -> tuple:
    return tuple(
        _sort_part(v)
        for v in (
            rec.get("attack"),
            rec.get("model"),
            rec.get("data"),
            rec.get("batch_size"),
            protocol_short(rec.get("protocol")),
            rec.get("clients"),
            _defense_order(rec.get("defenses")),
            rec.get("seed"),
            rec.get("key"),
        )
    )


def _defense_order(defenses: Any) -> str:
    # undefended first, then by name, then by strength (numerically, via a zero-padded key)
    if not defenses:
        return ""
    parts = []
    for spec in _as_list(defenses):
        name, _, value = defense_strength(spec)
        parts.append(f"{name}:{'' if value is None else f'{value:+024.12f}'}")
    return "~" + "+".join(parts)


# ------------------------------------------------------------------------------------------------------ summary


_GROUP_FIELDS = ("attack", "model", "data", "batch_size", "protocol", "clients", "defenses")


def _group_key(rec: Mapping[str, Any]) -> tuple:
    return (
        rec.get("attack"),
        rec.get("model"),
        rec.get("data"),
        rec.get("batch_size"),
        protocol_short(rec.get("protocol")),
        rec.get("clients"),
        _defenses_full(rec.get("defenses")),
    )


def summarize(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (attack, model, data, batch size, protocol, clients, defenses) group: medians over the seeds of
    the cells that finished ("ok"), and the counts of cells by status.

    ``"defenses"`` is the short label, ``"defenses_spec"`` the full specs joined with ``";"`` (what groups)."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for rec in sorted(records, key=_record_order):
        groups.setdefault(_group_key(rec), []).append(rec)
    rows = []
    for key, recs in groups.items():
        ok = [r for r in recs if r.get("status") == "ok"]
        row = dict(zip(_GROUP_FIELDS, key, strict=True))
        row.update(
            defenses=defense_short(recs[0].get("defenses")),
            defenses_spec=key[-1],
            cells=len(recs),
            ok=len(ok),
            declined=sum(r.get("status") == "declined" for r in recs),
            failed=sum(r.get("status") == "failed" for r in recs),
            psnr=_median(r.get("psnr") for r in ok),
            ssim=_median(r.get("ssim") for r in ok),
            label_accuracy=_median(r.get("label_accuracy") for r in ok),
            recovered_fraction_40db=_median(r.get("recovered_fraction_40db") for r in ok),
            dp_epsilon=_median(r.get("dp_epsilon") for r in recs),
            utility=_median(r.get("utility") for r in recs),
            seconds=_median(r.get("seconds") for r in ok),
        )
        rows.append(row)
    return rows


# -------------------------------------------------------------------------------------------------------- plots


def _new_figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _png_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.08)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _varying(records: Sequence[Mapping[str, Any]], fields: Iterable[str]) -> list[str]:
    """The fields among ``fields`` that take more than one value across ``records``."""
    out = []
    for field in fields:
        values = {_context_value(r, field, exact=True) for r in records}
        if len(values) > 1:
            out.append(field)
    return out


def _context_value(rec: Mapping[str, Any], field: str, *, exact: bool = False) -> str:
    if field == "protocol":
        return protocol_short(rec.get("protocol"))
    if field == "defenses":
        return _defenses_full(rec.get("defenses")) if exact else defense_short(rec.get("defenses"))
    value = rec.get(field)
    return "" if value is None else str(value)


def _context_label(rec: Mapping[str, Any], fields: Sequence[str]) -> str:
    parts = []
    for field in fields:
        value = _context_value(rec, field)
        parts.append(f"B={value}" if field == "batch_size" else value)
    return ", ".join(p for p in parts if p)


def _log_scale(xs: Iterable[float]) -> bool:
    xs = [x for x in xs if x is not None]
    return bool(xs) and min(xs) > 0 and max(xs) / min(xs) >= 20


def _plot_batch(ok: Sequence[Mapping[str, Any]]) -> str | None:
    """PSNR against batch size, one line per attack (split further by whatever else varies), medians over
    seeds; None when fewer than two batch sizes carry a PSNR. Where the undefended cells alone span two batch sizes
    only they are drawn (the strength plot shows the defenses), so the lines stay few."""
    rows = [r for r in ok if _num(r.get("psnr")) is not None and _is_number(r.get("batch_size"))]
    if len({r["batch_size"] for r in rows}) < 2:
        return None
    title = "Reconstruction quality against batch size"
    undefended = [r for r in rows if not _as_list(r.get("defenses"))]
    if len(undefended) < len(rows) and len({r["batch_size"] for r in undefended}) >= 2:
        rows, title = undefended, title + " (undefended)"
    context = _varying(rows, ("model", "data", "protocol", "clients", "defenses"))
    lines: dict[str, dict[int, list[float]]] = {}
    for r in sorted(rows, key=_record_order):
        label = str(r.get("attack"))
        extra = _context_label(r, context)
        if extra:
            label += f" ({extra})"
        lines.setdefault(label, {}).setdefault(r["batch_size"], []).append(_num(r["psnr"]))
    fig = _new_figure(6.4, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for label, points in lines.items():
        xs = sorted(points)
        ax.plot(xs, [statistics.median(points[x]) for x in xs], marker="o", label=label)
    xs_all = sorted({r["batch_size"] for r in rows})
    if _log_scale(xs_all):
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs_all)
    ax.set_xticklabels([str(x) for x in xs_all])
    ax.minorticks_off()
    ax.set_xlabel("batch size")
    ax.set_ylabel("PSNR (dB), median over seeds")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _png_data_uri(fig)


def _plot_defense(ok: Sequence[Mapping[str, Any]]) -> str | None:
    """PSNR against each defense's main parameter: one panel per defense name, one line per attack (split by
    whatever else varies) with the undefended PSNR as a dotted level. None unless defenses vary and some defense
    has a numeric strength."""
    rows = [r for r in ok if _num(r.get("psnr")) is not None]
    if len({_defenses_full(r.get("defenses")) for r in rows}) < 2:
        return None
    context = _varying(rows, ("model", "data", "batch_size", "protocol", "clients"))
    # a defense's other parameters that take several values (noise clip, say) split its lines
    others: dict[str, dict[str, set[str]]] = {}
    for r in rows:
        for spec in _as_list(r.get("defenses")):
            name, params = parse_spec(spec)
            main = defense_strength(spec)[1]
            for key, value in params.items():
                if key != main:
                    others.setdefault(name, {}).setdefault(key, set()).add(_value_text(value))
    # panel (defense name, parameter) -> line label -> x -> psnrs
    panels: dict[tuple[str, str], dict[str, dict[float, list[float]]]] = {}
    baseline: dict[str, list[float]] = {}
    for r in sorted(rows, key=_record_order):
        label = str(r.get("attack"))
        extra = _context_label(r, context)
        if extra:
            label += f" ({extra})"
        defenses = _as_list(r.get("defenses"))
        if not defenses:
            baseline.setdefault(label, []).append(_num(r["psnr"]))
            continue
        if len(defenses) != 1:
            continue  # a stack of defenses has no single strength
        name, param, value = defense_strength(defenses[0])
        if param is None or value is None or math.isnan(value):
            continue
        params = parse_spec(defenses[0])[1]
        split = [f"{k}={_value_text(params.get(k))}" for k, vs in sorted(others.get(name, {}).items()) if len(vs) > 1]
        line = label + (f" [{', '.join(split)}]" if split else "")
        panels.setdefault((name, param), {}).setdefault(line, {}).setdefault(value, []).append(_num(r["psnr"]))
    if not panels:
        return None
    n = len(panels)
    fig = _new_figure(min(4.2 * n, 13.0), 3.8)
    colors: dict[str, Any] = {}
    palette = [f"C{i}" for i in range(10)]
    axes = [fig.add_subplot(1, n, i + 1) for i in range(n)]
    for ax, ((name, param), lines) in zip(axes, sorted(panels.items()), strict=True):
        xs_all: list[float] = []
        for label, points in lines.items():
            color = colors.setdefault(label, palette[len(colors) % len(palette)])
            xs = sorted(points)
            xs_all += xs
            ax.plot(xs, [statistics.median(points[x]) for x in xs], marker="o", color=color, label=label)
            base = label.split(" [", 1)[0]
            if base in baseline:
                ax.axhline(statistics.median(baseline[base]), color=color, linestyle=":", linewidth=1)
        if _log_scale(xs_all):
            ax.set_xscale("log")
        ax.set_xlabel(f"{name} {param}")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[0].set_ylabel("PSNR (dB), median over seeds")
    fig.suptitle("Reconstruction quality against defense strength (dotted: undefended)", fontsize=10)
    return _png_data_uri(fig)


def _plot_utility(summary: Sequence[Mapping[str, Any]]) -> str | None:
    """Privacy-utility scatter: x = median PSNR of a group, y = its utility; None unless some group has both."""
    points = [s for s in summary if s["utility"] is not None and s["psnr"] is not None]
    if not points:
        return None
    fig = _new_figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    attacks = sorted({str(s["attack"]) for s in points})
    for i, attack in enumerate(attacks):
        mine = [s for s in points if str(s["attack"]) == attack]
        ax.scatter([s["psnr"] for s in mine], [s["utility"] for s in mine], color=f"C{i % 10}", label=attack)
        for s in mine:
            ax.annotate(
                str(s["defenses"]), (s["psnr"], s["utility"]), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
    ax.margins(0.12)
    ax.set_xlabel("PSNR (dB), median over seeds  \u2190 more private")
    ax.set_ylabel("utility (held-out accuracy)")
    ax.set_title("Privacy against utility")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _png_data_uri(fig)


# ------------------------------------------------------------------------------------------------------- images


def _display_size(png: bytes) -> tuple[int, int] | None:
    """Width and height to show a PNG at: its own size from the IHDR chunk, scaled up by a whole factor (at most
    4, pixels kept sharp) while it is under ~160 px tall, so a batch of 32 px images stays legible."""
    if len(png) < 24 or png[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    if width <= 0 or height <= 0:
        return None
    scale = max(1, min(4, 160 // height, 1200 // width))
    return width * scale, height * scale


def _cell_image(root: Path, rel: Any) -> tuple[str | None, str | None]:
    """(data URI, None) for a readable PNG under ``root``, else (None, why not)."""
    if not rel:
        return None, None
    root = Path(root)
    path = Path(str(rel))
    path = path if path.is_absolute() else root / path
    try:
        resolved = path.resolve()
        if not resolved.is_relative_to(root.resolve()):
            return None, f"image {rel} lies outside the report folder"
        data = resolved.read_bytes()
    except OSError as exc:
        return None, f"image {rel} could not be read ({exc.strerror or type(exc).__name__})"
    if not data.startswith(_PNG_MAGIC):
        return None, f"image {rel} is not a PNG"
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii"), None


# --------------------------------------------------------------------------------------------------------- html


_CSS = """
:root { color-scheme: light; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.5em;
       color: #111; background: #fff; }
h1 { font-size: 1.6em; margin: 0 0 .3em; }
h2 { font-size: 1.25em; margin: 1.6em 0 .5em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; margin: 1.2em 0 .4em; }
.counts span { display: inline-block; margin-right: 1em; padding: .1em .5em; border-radius: 3px; }
.counts .ok { background: #e3f4e3; } .counts .declined { background: #fff3cd; } .counts .failed { background: #f8d7da; }
details { margin: .6em 0; } summary { cursor: pointer; font-weight: 600; }
table { border-collapse: collapse; font-size: 12px; margin: .4em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.status-declined td { background: #fffbea; } tr.status-failed td { background: #fdf0f1; }
td.reason { font-style: italic; color: #555; }
table.kv td:first-child { font-weight: 600; }
code { font-size: 11px; }
.figs { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; }
figure.cell-image { border: 1px solid #ddd; padding: 4px; background: #fafafa; }
figure.cell-image img { image-rendering: pixelated; max-width: 100%; height: auto; display: block; }
figure.plot img { max-width: 100%; }
figcaption { font-size: 11px; color: #333; max-width: 40em; }
p.note { color: #a33; font-size: 12px; }
@media print {
  body { margin: 0; font-size: 10px; }
  th { position: static; }
  tr, figure { break-inside: avoid; page-break-inside: avoid; }
  details { display: block; } details > * { display: block; }
}
"""

_RESULT_HEADERS = (
    "attack",
    "model",
    "data",
    "batch",
    "protocol",
    "clients",
    "defenses",
    "seed",
    "status",
    "PSNR (dB)",
    "SSIM",
    "label acc.",
    "recovered \u226540 dB",
    "\u03b5",
    "seconds",
)


def _td(value: Any, kind: str | None = None, title: str | None = None) -> str:
    attrs = ' class="num"' if kind else ""
    if title:
        attrs += f' title="{_e(title)}"'
    return f"<td{attrs}>{_e(_fmt(value, kind) if kind else (_DASH if value is None else value))}</td>"


def _anchor(rec: Mapping[str, Any], index: int) -> str:
    key = rec.get("key")
    text = str(key) if key else f"row{index}"
    return "cell-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def _results_table(records: Sequence[Mapping[str, Any]], anchors: Mapping[int, str]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in _RESULT_HEADERS)
    rows = []
    for rec in records:
        status = rec.get("status")
        status_text = _e(status if status is not None else "?")
        if id(rec) in anchors:
            status_text = f'<a href="#{anchors[id(rec)]}">{status_text}</a>'
        cells = [
            _td(rec.get("attack")),
            _td(rec.get("model")),
            _td(rec.get("data")),
            _td(rec.get("batch_size"), "int"),
            _td(protocol_short(rec.get("protocol")) or None),
            _td(rec.get("clients"), "int"),
            _td(defense_short(rec.get("defenses")), title=_defenses_full(rec.get("defenses")) or None),
            _td(rec.get("seed"), "int"),
            f"<td>{status_text}</td>",
        ]
        if status == "ok":
            cells += [
                _td(rec.get("psnr"), "db"),
                _td(rec.get("ssim"), "ssim"),
                _td(rec.get("label_accuracy"), "pct"),
                _td(rec.get("recovered_fraction_40db"), "pct"),
                _td(rec.get("dp_epsilon"), "g"),
            ]
        else:
            reason = rec.get("reason") or "(no reason recorded)"
            cells.append(f'<td class="reason" colspan="5">{_e(reason)}</td>')
        cells.append(_td(rec.get("seconds"), "sec"))
        key_attr = f' data-key="{_e(rec.get("key"))}"' if rec.get("key") else ""
        cls = "cell status-" + "".join(c for c in str(status) if c.isalnum())
        rows.append(f'<tr class="{cls}"{key_attr}>' + "".join(cells) + "</tr>")
    return f'<table id="results"><thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(rows) + "\n</tbody></table>"


def _summary_table(summary: Sequence[Mapping[str, Any]]) -> str:
    headers = (
        "attack",
        "model",
        "data",
        "batch",
        "protocol",
        "clients",
        "defenses",
        "cells ok / all",
        "PSNR (dB)",
        "SSIM",
        "label acc.",
        "recovered \u226540 dB",
        "\u03b5",
        "utility",
        "seconds",
    )
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    rows = []
    for s in summary:
        counts = f"{s['ok']} / {s['cells']}"
        if s["declined"] or s["failed"]:
            counts += f" ({s['declined']} declined, {s['failed']} failed)"
        cells = [
            _td(s["attack"]),
            _td(s["model"]),
            _td(s["data"]),
            _td(s["batch_size"], "int"),
            _td(s["protocol"] or None),
            _td(s["clients"], "int"),
            _td(s["defenses"], title=s["defenses_spec"] or None),
            f'<td class="num">{_e(counts)}</td>',
            _td(s["psnr"], "db"),
            _td(s["ssim"], "ssim"),
            _td(s["label_accuracy"], "pct"),
            _td(s["recovered_fraction_40db"], "pct"),
            _td(s["dp_epsilon"], "g"),
            _td(s["utility"], "pct"),
            _td(s["seconds"], "sec"),
        ]
        rows.append('<tr class="group">' + "".join(cells) + "</tr>")
    return f'<table id="summary"><thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(rows) + "\n</tbody></table>"


def _kv_table(mapping: Mapping[str, Any], table_id: str | None = None) -> str:
    ident = f' id="{_e(table_id)}"' if table_id else ""
    rows = []
    for key, value in mapping.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
        rows.append(f"<tr><td>{_e(key)}</td><td><code>{_e(text)}</code></td></tr>")
    return f'<table class="kv"{ident}>' + "".join(rows) + "</table>"


def _environment(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    env: dict[str, Any] = {}
    for field in ("device", "threads"):
        values = sorted({str(r.get(field)) for r in records if r.get(field) is not None})
        if values:
            env[field] = ", ".join(values)
    versions = sorted(
        {json.dumps(r.get("versions"), sort_keys=True, default=str) for r in records if r.get("versions")}
    )
    if versions:
        env["versions"] = " | ".join(versions)
    totals = [_num(r.get("seconds_total")) for r in records]
    totals = [t for t in totals if t is not None]
    if totals:
        env["seconds_total (sum over cells)"] = f"{sum(totals):.0f}"
    return env


def _caption(rec: Mapping[str, Any]) -> str:
    parts = [
        str(rec.get("attack")),
        f"{rec.get('model')}",
        f"B={rec.get('batch_size')}",
        f"defenses: {defense_short(rec.get('defenses'))}",
        f"seed {rec.get('seed')}",
        f"PSNR {_fmt(rec.get('psnr'), 'db')} dB",
    ]
    return " \u00b7 ".join(parts)


def render_html(
    records: Sequence[Mapping[str, Any]],
    *,
    root: str | os.PathLike[str],
    title: str,
    meta: Mapping[str, Any] | None = None,
) -> str:
    """The report as one self-contained HTML document.

    ``root`` is the folder the records' ``"image"`` paths are relative to; a missing or unreadable picture is
    named in a note instead of failing the report.
    """
    root = Path(root)
    records = sorted((dict(r) for r in records), key=_record_order)
    statuses = [r.get("status") for r in records]
    n_ok = statuses.count("ok")
    n_declined = statuses.count("declined")
    n_failed = statuses.count("failed")
    n_other = len(records) - n_ok - n_declined - n_failed
    ok = [r for r in records if r.get("status") == "ok"]
    summary = summarize(records)

    # pictures first: the results table links to the ones that exist
    anchors: dict[int, str] = {}
    figures: list[tuple[str, str]] = []  # (group label, html)
    notes: list[str] = []
    for i, rec in enumerate(records):
        uri, why = _cell_image(root, rec.get("image"))
        size = _display_size(base64.b64decode(uri.partition(",")[2][:64])) if uri else None
        dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
        if why:
            notes.append(f"{_caption(rec)}: {why}")
        if uri is None:
            continue
        anchor = _anchor(rec, i)
        if anchor in anchors.values():  # a repeated key: ids must stay unique
            anchor += f"-{i}"
        anchors[id(rec)] = anchor
        group = " \u00b7 ".join(
            str(x)
            for x in (
                rec.get("attack"),
                rec.get("model"),
                rec.get("data"),
                f"B={rec.get('batch_size')}",
                protocol_short(rec.get("protocol")),
            )
        )
        figures.append(
            (
                group,
                f'<figure class="cell-image" id="{_e(anchor)}"><img src="{uri}"{dims} alt="{_e(_caption(rec))}">'
                f"<figcaption>{_e(_caption(rec))}</figcaption></figure>",
            )
        )

    plots = []
    for ident, caption, uri in (
        ("plot-batch", "PSNR against batch size (median over seeds).", _plot_batch(ok)),
        ("plot-defense", "PSNR against defense strength (median over seeds).", _plot_defense(ok)),
        ("plot-utility", "Privacy-utility: median PSNR against utility per group.", _plot_utility(summary)),
    ):
        if uri is not None:
            plots.append(
                f'<figure class="plot" id="{ident}"><img src="{uri}" alt="{_e(caption)}">'
                f"<figcaption>{_e(caption)}</figcaption></figure>"
            )

    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f'<header><h1 id="title">{_e(title)}</h1>',
        '<p class="counts" id="counts">'
        f'<span class="total">{len(records)} cells</span>'
        f'<span class="ok">{n_ok} ok</span>'
        f'<span class="declined">{n_declined} declined</span>'
        f'<span class="failed">{n_failed} failed</span>'
        + (f'<span class="other">{n_other} other</span>' if n_other else "")
        + "</p>",
    ]
    if meta:
        out.append(f'<details id="meta"><summary>Grid settings</summary>{_kv_table(meta)}</details>')
    env = _environment(records)
    if env:
        out.append(f'<details id="environment"><summary>Environment</summary>{_kv_table(env)}</details>')
    out.append("</header>")

    out.append('<section id="summary-section"><h2>Summary</h2>')
    out.append(
        "<p>Medians over seeds of the cells that finished, per attack, model, data, batch size, protocol, "
        "clients and defenses.</p>"
    )
    out.append(_summary_table(summary) + "</section>")

    if plots:
        out.append('<section id="plots"><h2>Plots</h2><div class="figs">' + "".join(plots) + "</div></section>")

    out.append('<section id="results-section"><h2>Results</h2>')
    out.append("<p>One row per cell. Hover a defense for its full spec; a status links to its picture.</p>")
    out.append(_results_table(records, anchors) + "</section>")

    out.append('<section id="images"><h2>Reconstructions</h2>')
    if figures:
        out.append("<p>Each picture: the true batch above its reconstruction.</p>")
        current = None
        for group, fig_html in figures:
            if group != current:
                if current is not None:
                    out.append("</div>")
                out.append(f'<h3>{_e(group)}</h3><div class="figs">')
                current = group
            out.append(fig_html)
        out.append("</div>")
    else:
        out.append("<p>No pictures.</p>")
    for note in notes:
        out.append(f'<p class="note">{_e(note)}</p>')
    out.append("</section></body></html>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------- csv


def _csv_value(rec: Mapping[str, Any], column: str) -> str:
    value = rec.get(column)
    if column == "defenses":
        return _defenses_full(value)
    if column == "protocol":
        return protocol_short(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str, sort_keys=True)
    return str(value)


def write_csv(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """One row per cell with the columns :data:`CSV_COLUMNS`; defenses joined with ``";"``, protocol as
    ``name:option=value,...``, empty for missing values. Written atomically."""
    target = Path(path)
    with atomic_path(target) as tmp, open(tmp, "x", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for rec in sorted(records, key=_record_order):
            writer.writerow([_csv_value(rec, c) for c in CSV_COLUMNS])
    return target


def write_report(
    root: str | os.PathLike[str],
    records: Sequence[Mapping[str, Any]],
    *,
    title: str,
    meta: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``root/report.html`` and ``root/results.csv`` (each atomically); return their paths."""
    root = Path(root)
    page = render_html(records, root=root, title=title, meta=meta)
    html_path = root / "report.html"
    with atomic_path(html_path) as tmp, open(tmp, "x", encoding="utf-8") as fh:
        fh.write(page)
    csv_path = write_csv(records, root / "results.csv")
    return html_path, csv_path
