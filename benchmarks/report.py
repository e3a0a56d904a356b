"""Benchmark result files: the JSON format, its Markdown and PNG renderings, and run comparison.

One run of ``kandinsky-trt bench`` produces one :class:`BenchResult`: where it ran (machine,
device, package versions), what it ran (profile, precision, backends) and one
:class:`StageResult` row per (stage, backend) with the raw latency samples, their summary,
peak memory, the speed-up over the torch baseline and the distance to the physical lower bound
(:mod:`kandinsky_trt.benchmarks.flops`). :func:`write_result` writes ``<stem>.json``,
``<stem>.md`` and ``<stem>.png``; :func:`compare_results` diffs two JSON files
(``kandinsky-trt bench --compare A.json B.json``).

Standard library + numpy; matplotlib (Agg) only for the PNG, skipped with a log line without it.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from kandinsky_trt.benchmarks.environment import (  # noqa: F401  (re-exported for the harness)
    MachineInfo,
    collect_versions,
    current_host_rss_mb,
    peak_host_rss_mb,
    reset_peak_host_rss,
)
from kandinsky_trt.runtime.contract.spec import Profile, SpecError
from kandinsky_trt.runtime.contract.errors import KandinskyTrtError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BASELINE_BACKEND = "torch"


class ReportError(KandinskyTrtError, ValueError):
    """A result file or sample list that does not fit the format."""


# ---------------------------------------------------------------- statistics


def summarize(samples_ms) -> dict:
    """``{median, p10, p90, mean, min, n}`` of latency samples in milliseconds.

    Raises:
        ReportError: no samples, or a sample that is negative or not finite.
    """
    values = np.asarray(list(samples_ms), dtype=np.float64)
    if values.size == 0:
        raise ReportError("samples_ms: expected at least one sample, found none")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ReportError(f"samples_ms: expected finite non-negative times, found {values.tolist()}")
    p10, median, p90 = np.percentile(values, [10, 50, 90])
    return {
        "median": float(median), "p10": float(p10), "p90": float(p90),
        "mean": float(values.mean()), "min": float(values.min()), "n": int(values.size),
    }


# ---------------------------------------------------------------- the result format


@dataclass(frozen=True)
class StageMeasurement:
    """What the harness measured for one (stage, backend); input of :func:`stage_result`."""

    stage: str
    backend: str
    samples_ms: tuple[float, ...]
    peak_host_rss_mb: float
    peak_device_mb: float | None = None
    lower_bound_ms: float | None = None


@dataclass(frozen=True)
class StageResult:
    """One row of a result file. ``ratio_to_baseline`` = baseline median / this median (>1:
    faster than torch); ``round_ratios``: the same ratio in each round, when the baseline and this
    row were timed in alternation (``rounds.py``; samples in round order); ``fraction_of_bound`` =
    lower bound / median (1.0 = at the physical floor)."""

    stage: str
    backend: str
    samples_ms: tuple[float, ...]
    median_ms: float
    p10_ms: float
    p90_ms: float
    peak_host_rss_mb: float
    peak_device_mb: float | None = None
    ratio_to_baseline: float | None = None
    lower_bound_ms: float | None = None
    fraction_of_bound: float | None = None
    round_ratios: tuple[float, ...] | None = None

    def to_dict(self) -> dict:
        ratios = None if self.round_ratios is None else list(self.round_ratios)
        return {**asdict(self), "samples_ms": list(self.samples_ms), "round_ratios": ratios}

    @classmethod
    def from_dict(cls, data: dict) -> "StageResult":
        ratios = data.get("round_ratios")  # absent from files written before the rounds were interleaved
        return cls(**{**data, "samples_ms": tuple(data["samples_ms"]),
                      "round_ratios": None if ratios is None else tuple(ratios)})


def stage_result(m: StageMeasurement) -> StageResult:
    """Summarise a measurement; the baseline ratio is filled by :func:`with_baseline_ratios`."""
    stats = summarize(m.samples_ms)
    bound = m.lower_bound_ms
    return StageResult(
        stage=m.stage, backend=m.backend, samples_ms=tuple(float(s) for s in m.samples_ms),
        median_ms=stats["median"], p10_ms=stats["p10"], p90_ms=stats["p90"],
        peak_host_rss_mb=m.peak_host_rss_mb, peak_device_mb=m.peak_device_mb, lower_bound_ms=bound,
        fraction_of_bound=bound / stats["median"] if bound is not None and stats["median"] > 0 else None,
    )


def with_baseline_ratios(stages, baseline: str = BASELINE_BACKEND, interleaved: bool = False) -> tuple[StageResult, ...]:
    """Fill ``ratio_to_baseline`` of every row whose stage also ran on ``baseline``; with
    ``interleaved`` (samples taken in alternating rounds) also ``round_ratios``, round by round."""
    base = {s.stage: s for s in stages if s.backend == baseline}

    def ratios(s: StageResult) -> dict:
        b = base[s.stage]
        per_round = interleaved and len(b.samples_ms) == len(s.samples_ms) and min(s.samples_ms) > 0
        return {"ratio_to_baseline": b.median_ms / s.median_ms,
                "round_ratios": tuple(x / y for x, y in zip(b.samples_ms, s.samples_ms)) if per_round else None}

    return tuple(replace(s, **ratios(s)) if s.stage in base and s.median_ms > 0 else s for s in stages)


@dataclass(frozen=True)
class BenchResult:
    """One benchmark run; ``to_dict`` is the JSON file's content."""

    machine: MachineInfo
    device: dict
    versions: dict
    profile: dict
    precision: str
    backends: tuple[str, ...]
    stages: tuple[StageResult, ...]
    created_utc: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version, "created_utc": self.created_utc,
            "machine": asdict(self.machine), "device": dict(self.device), "versions": dict(self.versions),
            "profile": dict(self.profile), "precision": self.precision, "backends": list(self.backends),
            "stages": [s.to_dict() for s in self.stages],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "BenchResult":
        """Raises ReportError for another schema version or a missing key."""
        found = data.get("schema_version") if isinstance(data, dict) else None
        if found != SCHEMA_VERSION:
            raise ReportError(f"schema_version: expected {SCHEMA_VERSION}, found {found!r}")
        try:
            return cls(
                machine=MachineInfo(**data["machine"]), device=dict(data["device"]),
                versions=dict(data["versions"]), profile=dict(data["profile"]),
                precision=data["precision"], backends=tuple(data["backends"]),
                stages=tuple(StageResult.from_dict(s) for s in data["stages"]),
                created_utc=data.get("created_utc", ""),
            )
        except (KeyError, TypeError) as err:
            raise ReportError(f"result file: missing or malformed field ({err})") from err


def new_result(profile: dict, precision: str, stages, device_name: str = "cpu") -> BenchResult:
    """A result for this machine and environment; ``backends`` in the order the stages name them."""
    stages = tuple(stages)
    return BenchResult(
        machine=MachineInfo.collect(), device={"name": device_name}, versions=collect_versions(),
        profile=dict(profile), precision=precision,
        backends=tuple(dict.fromkeys(s.backend for s in stages)), stages=stages,
        created_utc=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def load_result(path) -> BenchResult:
    """Read a result JSON file. Raises ReportError (unreadable, not JSON, wrong schema)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ReportError(f"{path}: expected a readable result JSON file ({err})") from err
    return BenchResult.from_dict(data)


# ---------------------------------------------------------------- renderings


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:{spec}}{suffix}"


def render_markdown(result: BenchResult) -> str:
    """A table with one row per (stage, backend): median, p10–p90, speed-up, bound, % of bound."""
    profile = ", ".join(f"{k}={v}" for k, v in result.profile.items())
    versions = ", ".join(f"{k} {v}" for k, v in result.versions.items())
    m = result.machine
    lines = [
        f"# Benchmark: {result.device.get('name', 'cpu')}, {result.precision}",
        "",
        f"- profile: {profile}",
        f"- machine: {m.hostname} ({m.cpu_model}, {m.cores} cores, {m.ram_gb} GB RAM)",
        f"- versions: {versions}",
        f"- run: {result.created_utc or 'unknown'}; baseline for the speed-up: `{BASELINE_BACKEND}`",
        "",
        "| stage | backend | median ms | min–max ms | n | vs torch | per round | lower bound ms | % of bound "
        "| peak host MB | peak device MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in result.stages:
        lines.append(
            f"| {s.stage} | {s.backend} | {s.median_ms:.3f} | {min(s.samples_ms):.3f}–{max(s.samples_ms):.3f} | "
            f"{len(s.samples_ms)} | {_fmt(s.ratio_to_baseline, '.2f', '×')} | {_ratio_range(s.round_ratios)} | "
            f"{_fmt(s.lower_bound_ms, '.3f')} | "
            f"{_fmt(None if s.fraction_of_bound is None else 100 * s.fraction_of_bound, '.1f', ' %')} | "
            f"{_fmt(s.peak_host_rss_mb, '.0f')} | {_fmt(s.peak_device_mb, '.0f')} |"
        )
    lines += ["", "vs torch = torch median / this median; per round = the lowest and highest of that ratio "
              "over the rounds, in which the backends took turns. % of bound = lower bound / median: the share "
              "of the physical floor reached (fp16 dense tensor peak and DRAM bandwidth, see benchmarks/flops.py)."]
    return "\n".join(lines + _reference_bound_lines(result.device)) + "\n"


def _ratio_range(ratios) -> str:
    return "—" if not ratios else f"{min(ratios):.2f}–{max(ratios):.2f}×"


def _reference_bound_lines(device: dict) -> list[str]:
    """The floor of each network on a named GPU, listed beside figures measured elsewhere (a CPU)."""
    bounds = device.get("lower_bound_ms") or {}
    if not bounds:
        return []
    gpu = device.get("reference_gpu", "the reference GPU")
    lines = ["", f"Physical floor per call on {gpu} at this profile (max of FLOPs / fp16 dense peak and "
             "bytes / bandwidth), for scale; not a fraction of figures measured on another device:", "",
             "| network | lower bound ms |", "|---|---:|"]
    return lines + [f"| {name} | {ms:.3f} |" for name, ms in bounds.items()]


def _draw_bars(ax, result: BenchResult, stages: list[str]) -> None:
    rows = {(s.stage, s.backend): s for s in result.stages}
    width = 0.8 / max(len(result.backends), 1)
    for i, backend in enumerate(result.backends):
        offset = (i - (len(result.backends) - 1) / 2) * width
        placed = [(j + offset, rows[(st, backend)]) for j, st in enumerate(stages) if (st, backend) in rows]
        ax.bar(
            [x for x, _ in placed], [r.median_ms for _, r in placed], width, label=backend, capsize=2,
            yerr=[[r.median_ms - r.p10_ms for _, r in placed], [r.p90_ms - r.median_ms for _, r in placed]],
        )
    bounds = {s.stage: s.lower_bound_ms for s in result.stages if s.lower_bound_ms}
    for n, (j, stage) in enumerate((j, st) for j, st in enumerate(stages) if st in bounds):
        ax.hlines(bounds[stage], j - 0.45, j + 0.45, colors="black", linewidth=2,
                  label="lower bound" if n == 0 else None)


def pyplot(png_path):
    """``matplotlib.pyplot`` on the Agg backend (no display on benchmark machines), or None (logged)
    when matplotlib is not importable: every benchmark's PNG is optional."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not importable: %s not written", png_path)
        return None
    return plt


def write_files(result: dict, out_dir, stem: str, markdown: str, plot) -> list[Path]:
    """A benchmark's ``<stem>.json`` (``result``), ``<stem>.md`` (``markdown``) and ``<stem>.png``
    (``plot(result, path)``, False where matplotlib is absent: then no PNG is listed) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    paths[1].write_text(markdown, encoding="utf-8")
    return paths + ([out / f"{stem}.png"] if plot(result, out / f"{stem}.png") else [])


def plot_result(result: BenchResult, png_path) -> bool:
    """Grouped bars (stage × backend) of the median with p10–p90 whiskers and the lower bound as
    a black tick; log scale when the medians span more than 30×. False when matplotlib is absent."""
    plt = pyplot(png_path)
    if plt is None:
        return False
    stages = list(dict.fromkeys(s.stage for s in result.stages))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(stages) + 2), 4.5))
    _draw_bars(ax, result, stages)
    medians = [s.median_ms for s in result.stages if s.median_ms > 0]
    if medians and max(medians) / min(medians) > 30:
        ax.set_yscale("log")
    ax.set_xticks(range(len(stages)), stages, rotation=20, ha="right")
    ax.set_ylabel("ms per call (median, p10–p90)")
    ax.set_title(f"{result.device.get('name', 'cpu')} · {result.precision} · "
                 + ", ".join(f"{k}={v}" for k, v in result.profile.items()))
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return True


def default_stem(result: BenchResult) -> str:
    """``<device>_<profile name>_<precision>_<UTC time>``, file-name safe, e.g.
    ``nvidia-h100-80gb-hbm3_b1_512x512_cfg_fp16_20260101t120000z``."""
    device = "".join(c if c.isalnum() else "-" for c in result.device.get("name", "cpu")).strip("-")
    try:
        profile = Profile(**result.profile).name
    except (TypeError, SpecError):  # a profile dict of another shape: still a usable name
        profile = "_".join(str(v) for v in result.profile.values())
    stamp = result.created_utc.replace("-", "").replace(":", "") or "undated"
    return f"{device}_{profile}_{result.precision}_{stamp}".lower()


def write_result(result: BenchResult, out_dir, stem: str | None = None) -> tuple[Path, Path, Path | None]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` (None when matplotlib is absent)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or default_stem(result)
    json_path, md_path, png_path = out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"
    json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(result), encoding="utf-8")
    return json_path, md_path, png_path if plot_result(result, png_path) else None


# ---------------------------------------------------------------- comparison


@dataclass(frozen=True)
class ComparisonRow:
    stage: str
    backend: str
    median_a_ms: float
    median_b_ms: float

    @property
    def change(self) -> float:
        """Relative change of B against A: +0.2 = B is 20 % slower."""
        return (self.median_b_ms - self.median_a_ms) / self.median_a_ms if self.median_a_ms > 0 else math.inf


@dataclass(frozen=True)
class ComparisonReport:
    """Per (stage, backend) medians of run A and run B. A row regresses when B is slower than A by
    more than ``threshold`` (relative)."""

    a_path: str
    b_path: str
    threshold: float
    rows: tuple[ComparisonRow, ...]
    only_in_a: tuple[tuple[str, str], ...] = field(default=())
    only_in_b: tuple[tuple[str, str], ...] = field(default=())

    def is_regression(self, row: ComparisonRow) -> bool:
        return row.change > self.threshold

    @property
    def regressions(self) -> tuple[ComparisonRow, ...]:
        return tuple(r for r in self.rows if self.is_regression(r))

    def to_markdown(self) -> str:
        lines = [
            f"# Comparison: B = `{self.b_path}` against A = `{self.a_path}`",
            "",
            f"Regression: B slower than A by more than {100 * self.threshold:.1f} %.",
            "",
            "| stage | backend | median A ms | median B ms | change | verdict |",
            "|---|---|---:|---:|---:|---|",
        ]
        for r in self.rows:
            verdict = ("**regression**" if self.is_regression(r)
                       else "improvement" if r.change < -self.threshold else "same")
            lines.append(f"| {r.stage} | {r.backend} | {r.median_a_ms:.3f} | {r.median_b_ms:.3f} | "
                         f"{100 * r.change:+.1f} % | {verdict} |")
        for label, keys in (("only in A", self.only_in_a), ("only in B", self.only_in_b)):
            if keys:
                lines += ["", f"{label}: " + ", ".join(f"{s}/{b}" for s, b in keys)]
        lines += ["", f"{len(self.regressions)} regression(s) in {len(self.rows)} compared row(s)."]
        return "\n".join(lines) + "\n"


def compare_results(a_path, b_path, threshold: float = 0.05) -> ComparisonReport:
    """Compare the medians of two result files row by row (matched on stage and backend).

    Raises:
        ReportError: a file that cannot be read, or a negative threshold.
    """
    if not threshold >= 0:
        raise ReportError(f"threshold: expected a relative change >= 0, found {threshold!r}")
    a = {(s.stage, s.backend): s for s in load_result(a_path).stages}
    b = {(s.stage, s.backend): s for s in load_result(b_path).stages}
    rows = tuple(ComparisonRow(k[0], k[1], a[k].median_ms, b[k].median_ms) for k in a if k in b)
    return ComparisonReport(
        a_path=str(a_path), b_path=str(b_path), threshold=threshold, rows=rows,
        only_in_a=tuple(k for k in a if k not in b), only_in_b=tuple(k for k in b if k not in a),
    )
