"""How the ``edgepipe`` command shows things to people: progress (stages, a release's live table) and the
result tables of build, compress, bench, verify and pack. Machines read ``--json`` instead."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any


def plain(text: Any) -> str:
    """``text`` for rich output: a board's or a file's words are never read as markup (``[red]``)."""
    from rich.markup import escape

    return escape(str(text))


def get_console(stderr: bool = False) -> Any:
    import os

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    wide = None if stream.isatty() or os.environ.get("COLUMNS") else 120  # logs and pipes: no 80-column wrap
    return Console(stderr=stderr, width=wide)


class RichReporter:
    """Draws one progress line per stage on stderr."""

    def __init__(self, quiet: bool = False) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.quiet = quiet
        self.notes: list[str] = []
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description:<44}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=get_console(stderr=True),
                                 disable=quiet)

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        task = self.progress.add_task(name, total=total)
        yield lambda n=1: self.progress.advance(task, n)
        self.progress.update(task, total=total or 1, completed=total or 1)

    def note(self, message: str) -> None:
        self.notes.append(message)
        if not self.quiet:
            self.progress.console.print(f"[yellow]note:[/] {message}")


def ms(m: Any, key: str) -> str:
    return f"{getattr(m, key):.3f}" if m is not None else "-"


def build_table(result: Any) -> None:
    from rich.table import Table

    from edgepipe.harness import speedup

    t = Table(title=f"edgepipe build: {result.model}")
    metric = result.results[0].manifest.accuracy.metric if result.results else "metric"
    for col in ("target", "backend", "prec.", metric, "drop", "SQNR dB", "p50 ms", "p99 ms", "speed-up", "mem MB",
                "size KiB"):
        t.add_column(col, justify="left" if col in ("target", "backend", "prec.") else "right")
    shown_ref: set[str] = set()
    for r in result.results:
        m = r.manifest
        ref_lat, src, acc, art = m.reference_latency, m.source_onnx, m.accuracy, m.artifact
        ref_key = f"{acc.reference}{ref_lat}"
        if ref_key not in shown_ref:
            shown_ref.add(ref_key)
            mem = f"{ref_lat.peak_rss_above_baseline_mb:.1f}" if ref_lat else "-"
            t.add_row("fp32 original", "onnxruntime", "fp32", acc.format(acc.reference), "-", "-",
                      ms(ref_lat, "p50_ms"), ms(ref_lat, "p99_ms"), "1.00x" if ref_lat else "-", mem,
                      f"{src.bytes / 1024:.0f}" if src and not m.compression else "-", style="dim")
        lat = m.latency
        ratio = speedup(ref_lat, lat)
        speed = f"{ratio:.2f}x" if ratio is not None else "-"
        if lat is not None and lat.emulated:
            speed += " (emulated)"
        mem = f"{lat.peak_rss_above_baseline_mb:.1f}" if lat else "-"
        sqnr = (m.fidelity or {}).get("sqnr_db")
        t.add_row(m.name, art.backend, art.precision, acc.format(acc.value), f"{acc.drop:+.2f}",
                  f"{min(sqnr):.1f}" if sqnr else "-", ms(lat, "p50_ms"), ms(lat, "p99_ms"), speed, mem, f"{art.size_bytes / 1024:.0f}")
    console = get_console()
    console.print(t)
    console.print(f"mem MB: peak resident memory of the bench worker above its baseline; drop: how much worse "
                  f"than the original model in fp32 on {metric} (test split, in its units); SQNR dB: the worst output's "
                  "signal-to-noise ratio against the fp32 model's outputs; speed-up: reference p50 / target p50, shown only when "
                  "both were timed on the same machine; (emulated): timed under qemu-user, which proves function, "
                  "not speed.", style="dim")
    for r in result.results:
        console.print(f"released [bold]{r.manifest.name}[/] -> {r.release_dir}/", highlight=False)
    for n in result.notes:
        console.print(f"[yellow]note:[/] {n}", highlight=False)


class ReleaseLive:
    """One live table of targets x candidates on stderr while a release runs; also the stage Reporter."""

    def __init__(self, quiet: bool = False) -> None:
        from rich.live import Live

        self.quiet = quiet
        self.rows: dict[tuple[str, str], list[str]] = {}
        self.current = ""
        self.notes: list[str] = []
        self.live = Live(self._table(), console=get_console(stderr=True), refresh_per_second=4, transient=False)

    def _table(self) -> Any:
        from rich.table import Table

        t = Table(title="edgepipe release", caption=self.current or None, caption_justify="left")
        for col in ("target", "cand.", "settings", "status", "figures"):
            t.add_column(col)
        style = {"ok": "green", "misses": "yellow", "error": "red", "skipped": "dim", "running": "cyan"}
        for (target, cid), (label, status, detail) in self.rows.items():
            t.add_row(target, cid, label, f"[{style.get(status, '')}]{status}[/]", detail)
        return t

    def __enter__(self) -> ReleaseLive:
        if not self.quiet:
            self.live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.current = ""
        if not self.quiet:
            self.live.update(self._table())
            self.live.stop()

    def progress(self, target: str, cid: str, label: str, status: str, detail: str) -> None:
        self.rows[(target, cid)] = [label, status, detail]
        if not self.quiet:
            self.live.update(self._table())

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        self.current = name
        if not self.quiet:
            self.live.update(self._table())
        yield lambda n=1: None

    def note(self, message: str) -> None:
        self.notes.append(message)


def compression_table(records: list[dict[str, Any]]) -> None:
    from rich.table import Table

    t = Table(title="compression steps")
    top1 = all(r["after"].get("measure", "top1") == "top1" for r in records)
    for col in ("step", "technique", "params", "non-zero", "MACs", "top-1" if top1 else "measured"):
        t.add_column(col, justify="left" if col in ("step", "technique") else "right")
    for r in records:
        b, a = r["before"], r["after"]
        t.add_row(str(r["step"]), r["technique"], f"{b['params']:,} -> {a['params']:,}",
                  f"{b['nonzero_params']:,} -> {a['nonzero_params']:,}", f"{b['macs']:,} -> {a['macs']:,}",
                  measured(b, a, named=not top1))
    get_console().print(t)


def measured(b: dict[str, Any], a: dict[str, Any], named: bool) -> str:
    """A step's measure before -> after: top-1, the build's metric, or the worst output's SQNR to the original."""
    m = a.get("measure", "top1")
    if m == "top1":
        return ("top-1 " if named else "") + f"{b['top1']:.2%} -> {a['top1']:.2%}"
    if m == "sqnr_db":
        return f"SQNR {min(b['sqnr_db']):.1f} -> {min(a['sqnr_db']):.1f} dB"
    unit = a.get("unit") or ""
    return f"{m} {b[m]:.4g} -> {a[m]:.4g}{' ' + unit if unit else ''}"


def measurement_table(m: Any, title: str) -> None:
    from rich.table import Table

    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "throughput_per_s", "load_ms",
              "peak_rss_above_baseline_mb", "peak_rss_mb"):
        t.add_row(k, f"{getattr(m, k):.3f}")
    t.add_row("size_bytes", str(m.size_bytes))
    t.add_row("iterations x batch", f"{m.iterations} x {m.batch}")
    if m.host:
        t.add_row("measured on", plain(m.where))
    ev = m.eval
    if ev:
        verify_rows(t, ev)
    console = get_console()
    console.print(t)
    if m.emulated:
        console.print(f"[yellow]note:[/] measured under emulation ({plain(m.emulated)}): these figures prove the artifact "
                      "runs there, not how fast; they are never a board's latency", highlight=False)


def verify_rows(t: Any, ev: dict[str, Any]) -> None:
    """The rows of a ``--verify``: the metric there (and the release's), then each output there against here."""

    def fmt(v: float, unit: str | None) -> str:
        return f"{v:.2f}%" if unit == "%" else f"{v:.4g}{' ' + unit if unit else ''}"

    on = f" on {ev['samples']} samples" + (f" of {ev['of']}" if ev.get("of", ev["samples"]) != ev["samples"] else "")
    if ev.get("top1") is not None and ev.get("metric") in ("top1", None):
        t.add_row("top-1 there", f"{ev['top1']:.2%}{on}"
                  + (f" (release: {ev['release_top1']:.2%})" if ev.get("release_top1") is not None else ""))
    elif ev.get("value") is not None:
        rel = f" (release: {fmt(ev['release_value'], ev.get('unit'))})" if ev.get("release_value") is not None else ""
        t.add_row(f"{plain(ev['metric'])} there", f"{fmt(ev['value'], ev.get('unit'))}{on}{rel}")
    if ev.get("metric_skipped"):
        t.add_row("metric", plain(ev["metric_skipped"]))
    if ev.get("note"):
        t.add_row("note", plain(ev["note"]))
    c = ev.get("comparison")
    if c:
        if c.get("here_top1") is not None:
            t.add_row("top-1 here", f"{c['here_top1']:.2%} ({plain(c['here'])})")
        for o in c.get("outputs") or []:
            sqnr = "-" if o.get("sqnr_db") is None else f"{o['sqnr_db']:.1f} dB"
            agree = f", top-1 agree {o['agreement']:.2%}" if o.get("agreement") is not None else ""
            t.add_row(f"{plain(o['name'])}: there vs here",
                      f"SQNR {sqnr}, max diff {o['max_abs_diff']:.4g}{agree}")
        if c.get("agreement") is not None:
            t.add_row("answers agree", f"{c['agreement']:.2%}")
        t.add_row("largest output difference", f"{c['max_abs_logit_diff']:.4g}")
    elif ev.get("comparison_skipped"):
        t.add_row("comparison", plain(ev["comparison_skipped"]))


@contextlib.contextmanager
def status(quiet: bool, label: str) -> Iterator[None]:
    if quiet:
        yield
        return
    with get_console(stderr=True).status(label):
        yield


def pack_table(report: Any) -> None:
    from rich.table import Table

    t = Table(title="archive size per stage (bytes; ratio vs dense)")
    for col in ("tensor", "weights", "non-zero", "values", "dense", "pruned", "shared", "Huffman", "layout"):
        t.add_column(col, justify="left" if col in ("tensor", "layout") else "right")
    for r in report.tensors:
        if r["dense"] < 1024:
            continue
        n = max(1, r["dense"] // 4)
        t.add_row(r["name"], f"{n:,}", f"{r['nonzero'] / n:.1%}", str(r["values"] or "-"), f"{r['dense']:,}",
                  f"{r['pruned']:,}", f"{r['shared']:,}", f"{r['huffman']:,}", r["layout"])
    s = report.stages
    t.add_row("all tensors", "", "", "", f"{s['dense']:,}", f"{s['pruned']:,}", f"{s['shared']:,}",
              f"{s['huffman']:,}", "", style="bold")
    t.add_row("ratio", "", "", "", "1.0x", f"{s['dense'] / s['pruned']:.1f}x", f"{s['dense'] / s['shared']:.1f}x",
              f"{s['dense'] / s['huffman']:.1f}x", f"file {s['dense'] / s['archive']:.1f}x", style="bold")
    get_console().print(t)
    get_console().print("dense: fp32 as stored in memory; pruned: non-zeros with fixed-width relative offsets; "
                     "shared: + fixed-width codebook indices; Huffman: what the archive stores (plus a "
                     f"{report.header_bytes:,}-byte header and a 32-byte hash). Tensors under 1 KiB not listed.",
                     style="dim")
