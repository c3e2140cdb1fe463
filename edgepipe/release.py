"""Release directories: the artifact, the ONNX it came from, the calibration record, ``manifest.json``
and ``report.html``.

Everything is written into a temporary directory beside the destination and renamed into place at the
end, so a directory named after a target is always complete.
"""

from __future__ import annotations

import dataclasses
import html
import json
import shutil
from pathlib import Path
from typing import Any

from edgepipe._fs import atomic_dir
from edgepipe._hashing import sha256_file
from edgepipe.errors import ConfigError
from edgepipe.types import Artifact, ArtifactRecord, CalibrationSet, FileRecord, Manifest, OnnxModel

MANIFEST = "manifest.json"
REPORT = "report.html"


def _file_record(p: Path, root: Path) -> FileRecord:
    return FileRecord(p.relative_to(root).as_posix(), sha256_file(p), p.stat().st_size)


def write_release(dest: Path, artifact: Artifact, onnx: OnnxModel, calibration: CalibrationSet,
                  manifest: Manifest) -> Path:
    """Write one target's release directory atomically.

    The directory gets the artifact's files (as laid out beside its main file), ``source.onnx``,
    ``calibration.json``, ``manifest.json`` (with the artifact's and the ONNX's file records filled in) and
    ``report.html``; an existing ``dest`` is replaced only once the new one is complete.

    Args:
        dest: the release directory (``<out>/<target name>``).
        artifact: the compiled artifact.
        onnx: the ONNX it was compiled from.
        calibration: the calibration set (its source, sample count and hash are recorded).
        manifest: the build's manifest (its ``artifact`` and ``source_onnx`` are set here).

    Returns:
        ``dest``.

    Raises:
        ConfigError: ``dest``'s parent or lock file cannot be created, or the lock file is a link or not a plain file.
    """
    with atomic_dir(dest) as tmp:
        art_root = artifact.path.parent
        for f in artifact.files:
            target = tmp / f.relative_to(art_root)
            target.parent.mkdir(parents=True, exist_ok=True)
            if f.is_dir():
                shutil.copytree(f, target)
            else:
                shutil.copy2(f, target)
        shutil.copy2(onnx.path, tmp / "source.onnx")
        calib = {**calibration.record(), "method": manifest.target.calibration.method}
        (tmp / "calibration.json").write_text(json.dumps(calib, indent=2) + "\n")
        files = [_file_record(tmp / f.relative_to(art_root), tmp) for f in artifact.files if f.is_file()]
        manifest = dataclasses.replace(
            manifest,
            artifact=ArtifactRecord(artifact.backend, artifact.precision, artifact.path.relative_to(art_root).as_posix(),
                                    files, sum(f.bytes for f in files), artifact.metadata),
            source_onnx=_file_record(tmp / "source.onnx", tmp),
        )
        (tmp / MANIFEST).write_text(manifest.to_json())
        (tmp / REPORT).write_text(render_report(manifest))
    return dest


def _h(v: Any) -> str:
    """``v`` as HTML text, safe in element and attribute content alike (``<>&"'`` escaped)."""
    return html.escape("" if v is None else str(v), quote=True)


def _cells(*values: Any) -> str:
    return "".join(f"<td>{_h(v)}</td>" for v in values)


def _rows(pairs: list[tuple[str, Any]]) -> str:
    return "".join(f"<tr><th>{_h(k)}</th><td>{_h(v)}</td></tr>" for k, v in pairs)


def fidelity_rows(fid: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The fidelity to fp32 as report rows: SQNR per output, and the flip rate where outputs are class scores.

    Args:
        fid: a manifest's ``fidelity`` (``sqnr_db``, ``flip_rate``, ``confident_flip_rate``, ...), or ``None``.

    Returns:
        ``(label, text)`` rows; none without ``fid``.
    """
    if not fid:
        return []
    rows = [("SQNR vs fp32 (test, per output)", ", ".join(f"{v:.1f} dB" for v in fid.get("sqnr_db") or []))]
    if fid.get("flip_rate") is not None:
        conf = fid.get("confident_flip_rate")
        rows.append(("top-1 flips vs fp32 (test)", f"{fid['flip_rate']:.2f}% of samples; "
                     + (f"{conf:.2f}% of the {fid.get('confident_samples')} confident ones (fp32 margin > "
                        f"{fid.get('margin')})" if conf is not None else "no confident samples")))
    return rows


def render_report(m: Manifest) -> str:
    """A self-contained HTML page of one release's manifest: for people; the manifest is for machines.

    Every value is HTML-escaped; there are no network assets.

    Args:
        m: the manifest, with its ``artifact`` set (as :func:`write_release` sets it).

    Returns:
        The page: summary (figures, fidelity, latency and speed-up), budgets, files, stages and tools.
    """
    t, acc, lat, ref, a = m.target, m.accuracy, m.latency, m.reference_latency, m.artifact
    assert a is not None
    summary = [
        ("target", f"{t.name}: {t.description}"),
        ("backend / precision", f"{a.backend} / {a.precision}"),
        (f"{acc.metric} (artifact)", f"{acc.format(acc.value)} on {acc.samples} held-out test samples"),
        (f"{acc.metric} (original model, fp32)", f"{acc.format(acc.reference)} (drop {acc.drop:+.4g})"),
        ("size", f"{a.size_bytes:,} bytes"),
    ]
    if acc.validation_value is not None:
        summary.append((f"{acc.metric} on validation (choices)", f"{acc.format(acc.validation_value)} on "
                        f"{acc.validation_samples} samples (drop {acc.validation_drop or 0.0:+.4g})"))
    if acc.compressed is not None:
        summary.append(("compressed model, fp32 (validation)", acc.format(acc.compressed)))
    summary += fidelity_rows(m.fidelity)
    if m.candidate:
        summary.append(("search candidate", ", ".join(f"{k}={v}" for k, v in m.candidate.items())))
    if acc.evaluated_on:
        summary.append((f"{acc.metric} measured on", acc.evaluated_on))
    if m.bench_skipped:
        summary.append(("not benchmarked", m.bench_skipped))
    if lat:
        from edgepipe.harness import speedup, where

        summary += [("latency measured on", where(lat)),
                    ("latency p50 / p90 / p99", f"{lat.p50_ms:.3f} / {lat.p90_ms:.3f} / {lat.p99_ms:.3f} ms"),
                    ("throughput", f"{lat.throughput_per_s:.1f} / s at batch {lat.batch}"),
                    ("peak memory above baseline", f"{lat.peak_rss_above_baseline_mb:.1f} MB")]
        ratio = speedup(ref, lat)
        if ratio is not None:
            summary.append(("speed-up vs fp32 reference", f"{ratio:.2f}x (both timed on {where(lat)})"))
        elif ref:
            summary.append(("speed-up vs fp32 reference", f"not shown: the fp32 reference was timed on {where(ref)}"))
    budgets = [(k, f"{'ok' if b.ok else 'MISSED'}: {b.value:.3f} (limit {b.limit})") for k, b in m.budgets.items()]
    files = [(f.name, f"{f.bytes:,} bytes, sha256 {f.sha256}") for f in a.files]
    stages = [(s.name, "skipped: " + s.skipped if s.skipped else f"output sha256 {s.output_sha256}") for s in m.stages]
    tools = list(m.tools.items())
    sections = [("Summary", summary), ("Budgets", budgets), ("Files", files), ("Stages", stages), ("Tools", tools)]
    body = "".join(f"<h2>{name}</h2><table>{_rows(rows)}</table>" for name, rows in sections if rows)
    title = _h(f"edgepipe release: {t.name}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
            "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;width:100%}"
            "th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}"
            "th{width:16em;color:#444}td{font-family:monospace;word-break:break-all}</style></head>"
            f"<body><h1>{title}</h1>{body}</body></html>\n")


def read_manifest(release_dir: Path) -> Manifest:
    """The manifest of a release directory.

    Args:
        release_dir: the release directory.

    Returns:
        Its ``manifest.json``, read.

    Raises:
        ConfigError: the manifest cannot be read, is too large, is not one edgepipe wrote, or its target was
            edited after the build.
    """
    return Manifest.read(release_dir / MANIFEST)


def artifact_from_release(path: Path) -> Artifact | None:
    """If ``path`` is a release directory (or a file in one), the artifact its manifest names.

    Every file the manifest names must be one plain name of a regular file in the directory (no ``/``,
    ``..`` or link out of it): a crafted manifest cannot make edgepipe read, copy or upload a file
    from elsewhere.

    Args:
        path: a directory, or a file whose directory is looked at.

    Returns:
        The artifact (main file, every file, metadata), or ``None`` when there is no ``manifest.json`` or
        it names no artifact.

    Raises:
        ConfigError: the manifest is not one edgepipe wrote, or names a file that is not a plain name of a
            regular file in the directory (naming the file and the manifest).
    """
    root = path if path.is_dir() else path.parent
    mf = root / MANIFEST
    if not mf.is_file():
        return None
    try:
        a = Manifest.read(mf).artifact
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ConfigError(f"{str(mf)!r} is not a manifest edgepipe wrote ({type(e).__name__}: {e}); rebuild the "
                          "release") from None
    if a is None:
        return None
    names = [a.file, *(f.name for f in a.files)]
    files = [_release_file(root, name, mf) for name in names]
    return Artifact(a.backend, a.precision, files[0], files[1:], a.metadata)


def _release_file(root: Path, name: Any, manifest: Path) -> Path:
    """``root / name`` when ``name`` is one plain path component naming a regular file inside ``root``."""
    import os

    plain = (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
             and not os.path.isabs(name))
    p = root / name if plain else None
    if p is None or not p.is_file() or not p.resolve().is_relative_to(root.resolve()):
        raise ConfigError(f"{str(manifest)!r} names the file {name!r}, which is not a plain file name of a regular "
                          f"file inside {str(root)!r} (no '/', '..' or link out of it); the manifest is damaged or "
                          "crafted: rebuild the release")
    return p


# ---------------------------------------------------------------------------------------------------------
# a whole release: index.json, SHA256SUMS and report.html over every target

INDEX = "index.json"
SUMS = "SHA256SUMS"
INDEX_SCHEMA = 3  # 2: the metric by name and unit, figures in its units, SQNR and flip rate per candidate;
#                  3: the finalists re-timed together (``finalists``)


def release_index(result: Any) -> dict[str, Any]:
    """``index.json``: every target's status, choice, figures and every rejected candidate with why.

    It holds no wall times or cache counts, so the same inputs (and cached measurements) give the same
    bytes; those are printed by the CLI and returned in the result.

    Args:
        result: the :class:`edgepipe.pipeline.search.ReleaseResult` of a release.

    Returns:
        ``{"schema", "model", "search", "search_sha256", "targets"}``; per target its status, backend,
        reason, budgets, release directory, chosen candidate id, metric, reference figures, every candidate
        with ``why``, and the finalists' re-timing.
    """
    targets: dict[str, Any] = {}
    for o in result.outcomes:
        t = o.target
        entry: dict[str, Any] = {"status": o.status, "backend": t.backend, "reason": o.reason,
                                 "budgets": {k: v for k, v in dataclasses.asdict(t.budgets).items() if v is not None},
                                 "release_dir": f"{t.name}/" if o.release_dir else None,
                                 "chosen": o.chosen.candidate.id if o.chosen else None}
        first = next((x.result for x in o.tried if x.result is not None), None)
        if first is not None:
            acc, ref_lat = first.manifest.accuracy, first.manifest.reference_latency
            entry["metric"] = {"name": acc.metric, "unit": acc.unit, "higher_is_better": acc.higher_is_better}
            entry["reference"] = {"validation": acc.validation_reference, "test": acc.reference,
                                  "p50_ms": ref_lat.p50_ms if ref_lat else None,
                                  "emulated": ref_lat.emulated if ref_lat else None}
        cands = []
        for x in o.tried:
            d = x.to_dict()
            fin = o.retiming.score() if o.retiming is not None else {}
            if o.chosen is not None and x is o.chosen:
                d["why"] = ("chosen: fastest of the finalists re-timed together (median of per-round ratios; ties "
                            "within noise: smaller, then more accurate)" if fin else
                            "chosen: fastest qualifying (ties within noise: smaller, then more accurate)")
            elif x.candidate.id in fin:
                d["why"] = (f"finalist: {fin[x.candidate.id]:.3f}x the fastest per round when re-timed together "
                            "(or tied within noise and larger or less accurate)")
            elif x.result is None:
                d["why"] = f"could not be built: {x.error}"
            elif not x.qualifies:
                d["why"] = "misses " + ", ".join(f"{k} ({m['value']:.3g} > {m['limit']})" for k, m in x.misses().items())
            else:
                d["why"] = "qualifies, but slower, larger or less accurate than the chosen one"
            cands.append(d)
        entry["candidates"] = cands
        entry["finalists"] = _finalists(o, result.space.noise)
        targets[t.name] = entry
    return {"schema": INDEX_SCHEMA, "model": result.model, "search": result.space.to_dict(),
            "search_sha256": result.space.sha256, "targets": targets}


def _finalists(o: Any, noise: float) -> dict[str, Any] | None:
    """The finalists' interleaved re-timing for index.json: ids, per-round p50, the median ratio each,
    and whether they are within noise of each other (then the choice among them is size or accuracy)."""
    if o.retiming is None:
        return {"ids": [], "skipped": o.retime_skipped} if o.retime_skipped else None
    d = o.retiming.to_dict()
    ratios = sorted(d["ratio"].values())
    d["within_noise"] = len(ratios) > 1 and ratios[1] <= ratios[0] * (1 + noise)
    return d


def _svg(fig: Any) -> str:
    import io

    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    a, b = text.find("<metadata>"), text.find("</metadata>")
    return text[:a] + text[b + len("</metadata>"):] if a >= 0 and b > a else text


def _charts(name: str, entry: dict[str, Any]) -> str:
    """Accuracy-vs-latency scatter with the Pareto front and budget lines, and a size chart (inline SVG)."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "edgepipe"  # stable element ids: same inputs, same bytes
    import matplotlib.pyplot as plt

    cands = [c for c in entry["candidates"] if c.get("validation") is not None]
    if not cands:
        return "<p>No candidate could be built, so there is nothing to chart.</p>"
    budgets, ref = entry["budgets"], entry.get("reference") or {}
    metric = entry.get("metric") or {"name": "top1", "unit": "%", "higher_is_better": True}
    unit = metric["unit"] or "value"
    timed = all(c["p50_ms"] is not None for c in cands)
    out = []
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    xs = [c["p50_ms"] if timed else c["size_bytes"] / 1024 for c in cands]
    ys = [c["validation"] for c in cands]
    colors = ["tab:green" if c["qualifies"] else "tab:red" for c in cands]
    ax.scatter(xs, ys, c=colors, s=36, zorder=3, label="candidates (green: within budgets)")
    front = sorted((x, y) for x, y, c in zip(xs, ys, cands, strict=True) if c["pareto"])
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="tab:blue", zorder=2, label="Pareto front")
    for x, y, c in zip(xs, ys, cands, strict=True):
        ax.annotate(c["id"] + (" (chosen)" if c["id"] == entry["chosen"] else ""), (x, y), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    drop = budgets.get("max_metric_drop", budgets.get("max_accuracy_drop"))
    if ref.get("validation") is not None and drop is not None:
        sign = -1 if metric["higher_is_better"] else 1
        ax.axhline(ref["validation"] + sign * drop, color="grey", ls=":",
                   label=f"{metric['name']} budget ({'-' if sign < 0 else '+'}{drop} {unit})")
    if timed and "max_latency_ms" in budgets:
        ax.axvline(budgets["max_latency_ms"], color="grey", ls="-.", label="latency budget")
    ax.set_xlabel("p50 latency (ms)" if timed else "artifact size (KiB); latency not measured here")
    ax.set_ylabel(f"validation {metric['name']} ({unit})")
    ax.set_title(f"{name}: {metric['name']} vs {'latency' if timed else 'size'}")
    ax.legend(fontsize=7, loc="lower right")
    out.append(_svg(fig))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.4, 0.5 + 0.28 * len(cands)))
    ax.barh([c["id"] for c in cands], [c["size_bytes"] / 1024 for c in cands], color=colors)
    if "max_size_mb" in budgets:
        ax.axvline(budgets["max_size_mb"] * 1e6 / 1024, color="grey", ls=":", label="size budget")
        ax.legend(fontsize=7)
    ax.set_xlabel("artifact size (KiB)")
    ax.set_title(f"{name}: size per candidate")
    ax.invert_yaxis()
    out.append(_svg(fig))
    plt.close(fig)
    return "".join(f"<figure>{s}</figure>" for s in out)


def _sqnr(c: dict[str, Any]) -> str:
    """A candidate's fidelity in one cell: the worst output's SQNR, and the top-1 flip rate where there is one."""
    db = c.get("sqnr_db")
    if not db:
        return "-"
    flips = c.get("flip_rate")
    return f"{min(db):.1f}" + (f" / {flips:.2f}%" if flips is not None else "")


def _emu(c: dict[str, Any]) -> str:
    return f" (emulated by {c['emulated']}: function, not speed)" if c.get("emulated") else ""


def _finalists_table(f: dict[str, Any] | None) -> str:
    """The finalists' re-timing: per finalist, each round's p50, the median ratio and its spread."""
    if not f:
        return ""
    if not f.get("ids"):
        return f"<p>{_h(f.get('skipped') or '')}</p>"
    head = "".join(f"<th>round {k + 1}</th>" for k in range(f["rounds"]))
    rows = "".join("<tr>" + _cells(i, *(f"{v:.3f}" for v in f["p50_ms"][i]), f"{f['ratio'][i]:.3f}x",
                                   f"{f['spread'][i][0]:.3f}–{f['spread'][i][1]:.3f}") + "</tr>" for i in f["ids"])
    note = " They are within noise of each other." if f.get("within_noise") else ""
    return (f"<p>Finalists re-timed together on {_h(f['where'])}: {f['rounds']} interleaved rounds of "
            f"{f['iterations']} calls each, p50 ms per round; the choice compares the median of per-round ratios to "
            f"the round's fastest.{_h(note)}</p><table><tr><th>finalist</th>{head}<th>median ratio</th>"
            f"<th>spread</th></tr>{rows}</table>")


def render_release_report(index: dict[str, Any]) -> str:
    """The release's report.html: per target, the charts and a table of every candidate (no network assets).

    Every value from the index (names, recipes, figures, what a board said) is HTML-escaped.

    Args:
        index: what :func:`release_index` returns.

    Returns:
        The page: a summary table, then per target its charts (inline SVG: the metric against latency, or
        against size where latency was not measured, and the size per candidate), its candidates and the
        finalists' re-timing.
    """
    parts = []
    summary = []
    for name, e in index["targets"].items():
        chosen = next((c for c in e["candidates"] if c["id"] == e["chosen"]), None)
        metric = (e.get("metric") or {}).get("name", "")
        fig = (f"{metric} {chosen['test']:.4g}", (f"{chosen['p50_ms']:.3f}" + _emu(chosen)) if chosen["p50_ms"]
               else "-", _sqnr(chosen), f"{chosen['size_bytes']:,}") if chosen else ("-", "-", "-", "-")
        summary.append(f"<tr>{_cells(name, e['status'], e['chosen'] or '-', *fig, e['reason'] or '')}</tr>")
        rows = "".join(
            "<tr>" + _cells(c["id"], c["recipe"], ", ".join(f"{k}={v}" for k, v in sorted(c["settings"].items())),
                            "" if c.get("validation") is None else format(c["validation"], ".4g"), _sqnr(c),
                            "" if c.get("p50_ms") is None else format(c["p50_ms"], ".3f") + _emu(c),
                            "" if c.get("size_bytes") is None else format(c["size_bytes"], ","), c["why"]) + "</tr>"
            for c in e["candidates"])
        charts = _charts(name, e) if e["candidates"] else f"<p>{_h(e['reason'] or '')}</p>"
        parts.append(f"<h2>{_h(name)} ({_h(e['backend'])}): {_h(e['status'])}</h2>{charts}"
                     f"<table><tr><th>id</th><th>recipe</th><th>settings</th><th>val {_h(metric)}</th>"
                     "<th>SQNR dB / flips</th><th>p50 ms</th>"
                     f"<th>bytes</th><th>why</th></tr>{rows}</table>{_finalists_table(e.get('finalists'))}")
    head = ("<table><tr><th>target</th><th>status</th><th>chosen</th><th>test metric</th><th>p50 ms</th>"
            f"<th>SQNR dB / flips</th><th>bytes</th><th>note</th></tr>{''.join(summary)}</table>")
    title = _h(f"edgepipe release: {index['model']}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
            "body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse;width:100%}"
            "th,td{border-bottom:1px solid #ddd;padding:3px 6px;text-align:left;font-size:90%}"
            "figure{display:inline-block;margin:0.5em}</style></head>"
            f"<body><h1>{title}</h1><p>Search space {_h(index['search']['name'])} "
            f"(sha256 {_h(str(index['search_sha256'])[:16])}). Each target is judged by the model's metric on the "
            "validation split (choices) and on the test split (reported); budgets are against the original model "
            "in fp32, in the metric's units. SQNR and flips compare each artifact's outputs with the fp32 model's "
            "on the test split.</p>"
            f"{head}{''.join(parts)}</body></html>\n")


def write_sums(root: Path) -> Path:
    """``SHA256SUMS`` over every released file under ``root`` (not the ``.work`` area), ``sha256sum -c`` format.

    Files under a hidden path (any part starting with ``.``) are left out; the file is written atomically.

    Args:
        root: the release root.

    Returns:
        The path of the ``SHA256SUMS`` written.
    """
    from edgepipe._fs import write_text_atomic

    lines = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and rel.as_posix() != SUMS:
            lines.append(f"{sha256_file(p)}  {rel.as_posix()}")
    write_text_atomic(root / SUMS, "\n".join(lines) + "\n")
    return root / SUMS


def write_release_index(result: Any) -> None:
    """Write ``index.json``, ``report.html`` and then ``SHA256SUMS`` (last: it covers the other two).

    Args:
        result: the :class:`edgepipe.pipeline.search.ReleaseResult`; the files go into its ``out``.
    """
    from edgepipe._fs import write_text_atomic

    index = release_index(result)
    write_text_atomic(result.out / INDEX, json.dumps(index, indent=2, default=str) + "\n")
    write_text_atomic(result.out / REPORT, render_release_report(index))
    write_sums(result.out)
