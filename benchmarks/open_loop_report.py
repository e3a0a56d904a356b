"""The open-loop benchmark's arithmetic and outputs (``benchmarks/open_loop.py``): one rate point's
summary from its request records, the goals read off a whole run, and the JSON, Markdown and PNG.

Pure: nothing here starts a server or reads a clock, so ``tests/test_open_loop.py`` drives it on
made-up records. Percentiles and the sustainable rate are the simulation's
(:mod:`~kandinsky_trt.benchmarks.step_batching_sim`): nearest rank, and the highest rate of the grid,
below the first that misses the target, whose p99 meets it with nothing refused or left unfinished.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path

from kandinsky_trt.benchmarks.report import pyplot, write_files
from kandinsky_trt.benchmarks.step_batching_sim import percentile, sustainable_rate

log = logging.getLogger(__name__)
DONE, REFUSED, FAILED, UNFINISHED = "done", "refused", "failed", "unfinished"
STEP, REQUEST, NONE = "step-level", "request-level", "no batching"
CONTENDERS = (STEP, REQUEST, NONE)
P99_MULTIPLES = (2.0, 3.0, 5.0)  # p99 targets: these multiples of the idle p99 (all classes)
PRIMARY_MULTIPLE = 3.0
P50_10_GOAL = 1.5  # the goal: 10-step p50 under load <= 1.5x idle
GOAL_RATIO = 2.0  # the goal: step-level sustains >= 2x request-level's rate at equal p99
KEEP_UP = 0.9  # a sustainable point's achieved throughput is at least this share of the offered load...
KEEP_UP_MIN_ARRIVALS = 20  # ...judged where it has this many arrivals (fewer: one late request decides it)


def class_stats(latencies: list[float]) -> dict:
    """n, p50, p99 (nearest rank: with n < 100 the p99 is the maximum), min and max, in seconds."""
    return {"n": len(latencies), "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99),
            "min_s": min(latencies, default=None), "max_s": max(latencies, default=None)}


def summarize_point(records: list[dict], window_s: float) -> dict:
    """Counts, offered and achieved throughput and latency percentiles of one contender at one rate.

    ``records``: one per arrival (``at_s`` its scheduled time from the point's start, ``status``,
    ``latency_s`` from the scheduled arrival to the response, ``decoder_steps``). Offered = arrivals /
    window; achieved = completed / max(window, last completion), both from the point's start (the
    simulation divides by last completion - first arrival, which a point of a few arrivals inflates)."""
    done = [r for r in records if r["status"] == DONE]
    counts = {s: sum(r["status"] == s for r in records) for s in (DONE, REFUSED, FAILED, UNFINISHED)}
    span = max([window_s, *(r["at_s"] + r["latency_s"] for r in done)])
    by_class = {str(k): class_stats([r["latency_s"] for r in done if r["decoder_steps"] == k])
                for k in sorted({r["decoder_steps"] for r in records})}
    return {"arrivals": len(records), "offered_per_s": len(records) / window_s, "completed": counts[DONE],
            "refused": counts[REFUSED], "failed": counts[FAILED], "unfinished": counts[UNFINISHED],
            "throughput_per_s": len(done) / span,
            **{k: v for k, v in class_stats([r["latency_s"] for r in done]).items() if k != "n"},
            "by_decoder_steps": by_class}


def queue_mean_s(before: dict, after: dict, step: bool) -> tuple[float | None, str]:
    """Mean queue time over the point from two ``/metrics`` scrapes, and where it came from: the step
    scheduler's queue time per ended request, or Triton's queue duration per successful request (the
    time a request waits for a model instance: the dynamic batcher's queue)."""
    if step:
        num, den, source = "kandinsky_sched_queue_seconds_total", "kandinsky_sched_ended_total", "step scheduler"
        scale = 1.0
    else:
        num, den, source = "nv_inference_queue_duration_us", "nv_inference_request_success", "triton queue"
        scale = 1e-6
    d_num, d_den = after.get(num, 0.0) - before.get(num, 0.0), after.get(den, 0.0) - before.get(den, 0.0)
    return (d_num * scale / d_den if d_den > 0 else None), source


def occupancy(before: dict, after: dict) -> dict[str, float | None]:
    """Slot occupancy of the loop stages over the point: rows run / rows offered (counter deltas)."""
    out = {}
    for stage in ("prior", "decoder"):
        run = after.get(f'kandinsky_sched_rows_run_total{{stage="{stage}"}}', 0.0) - before.get(
            f'kandinsky_sched_rows_run_total{{stage="{stage}"}}', 0.0)
        offered = after.get(f'kandinsky_sched_rows_offered_total{{stage="{stage}"}}', 0.0) - before.get(
            f'kandinsky_sched_rows_offered_total{{stage="{stage}"}}', 0.0)
        out[stage] = run / offered if offered > 0 else None
    return out


def stage_use(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per scheduler stage over the point (counter deltas): calls, seconds inside them, rows run and
    offered; busy_s / calls is the mean call (step) time."""
    counters = {"calls": "calls_total", "busy_s": "busy_seconds_total", "rows_run": "rows_run_total",
                "rows_offered": "rows_offered_total"}
    out = {}
    for stage in ("encode", "prior", "decoder", "decode"):
        keys = {k: f'kandinsky_sched_{name}{{stage="{stage}"}}' for k, name in counters.items()}
        out[stage] = {k: after.get(key, 0.0) - before.get(key, 0.0) for k, key in keys.items()}
    return out


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> ``{'name{labels}': value}``; label-less metrics are keyed by their name.
    Labels are kept as Triton writes them, except ``model`` and ``version`` (one model) and the step
    scheduler's ``instance`` (the model instance), dropped: values that differ only by them are summed."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        name, brace, labels = key.partition("{")
        kept = [kv for kv in labels.rstrip("}").split(",")
                if kv and not kv.startswith(("model=", "version=", "instance="))]
        try:
            number = float(value)
        except ValueError:
            continue
        key = name + ("{" + ",".join(kept) + "}" if brace and kept else "")
        out[key] = out.get(key, 0.0) + number
    return out


# -- goals -------------------------------------------------------------------------------------------


def _eligible(points: list[dict]) -> list[dict]:
    """The points as :func:`sustainable_rate` reads them. Beyond the simulation's test (p99 within the
    target, nothing refused), a point fails if anything was left unfinished or failed, or if it did not
    keep up: achieved < :data:`KEEP_UP` x offered (a backlog growing through a short window can leave
    the window's p99 under the target), judged only with :data:`KEEP_UP_MIN_ARRIVALS` arrivals or more."""
    behind = lambda p: (p["arrivals"] >= KEEP_UP_MIN_ARRIVALS  # noqa: E731
                        and p["throughput_per_s"] < KEEP_UP * p["offered_per_s"])
    return [{"rate_per_s": p["rate_per_s"], "p99_s": p["p99_s"],
             "refused": p["refused"] + p["unfinished"] + p["failed"] + behind(p)} for p in points]


def goals(contenders: dict[str, list[dict]], idle: dict) -> dict:
    """Sustainable rate per contender at each p99 target (multiples of the idle p99), step / request-level
    ratios, and each contender's 10-step p50 under load over the idle 10-step p50."""
    targets = []
    for multiple in P99_MULTIPLES:
        target = multiple * idle["p99_s"]
        rates = {name: sustainable_rate(_eligible(points), target) for name, points in contenders.items()}
        step, request = rates.get(STEP), rates.get(REQUEST)
        targets.append({"multiple_of_idle_p99": multiple, "p99_target_s": target, "sustainable_rate_per_s": rates,
                        "step_over_request": step / request if step and request else None})
    p50_10 = {}
    for name, points in contenders.items():
        ratios = [(p["rate_per_s"], (p["by_decoder_steps"].get("10", {}).get("p50_s") or math.nan) / idle["p50_10_s"])
                  for p in points]
        within = [rate for rate, ratio in ratios if ratio <= P50_10_GOAL]
        p50_10[name] = {"ratio_by_rate": [[rate, None if math.isnan(r) else r] for rate, r in ratios],
                        "within_goal_up_to_per_s": max(within, default=None)}
    return {"at_equal_p99": targets, "p50_10_under_load_over_idle": p50_10}


def goal_text(result: dict) -> str:
    """The two goals, in words, at the primary p99 target."""
    g = result["goals"]
    primary = next(t for t in g["at_equal_p99"] if t["multiple_of_idle_p99"] == PRIMARY_MULTIPLE)
    ratio, rates = primary["step_over_request"], primary["sustainable_rate_per_s"]
    top = max(p["rate_per_s"] for p in result["contenders"][STEP])
    if rates.get(STEP) == top and rates.get(REQUEST) == top:
        verdict = "undetermined: both sustained the highest rate measured, so the grid reached neither's limit"
    else:
        bound = ">= " if rates.get(STEP) == top else ""  # step-level's limit lies above the grid
        verdict = (f"{bound}{_num(ratio)} (goal >= {GOAL_RATIO:g}: "
                   + ("met" if ratio and ratio >= GOAL_RATIO else "not met") + ")")
    parts = [f"at p99 <= {PRIMARY_MULTIPLE:g}x idle p99 ({primary['p99_target_s']:.2f} s) the sustainable rate is "
             + ", ".join(f"{n} {_num(r)} req/s" for n, r in rates.items()) + f"; step / request-level {verdict}"]
    for name, p in g["p50_10_under_load_over_idle"].items():
        up_to = p["within_goal_up_to_per_s"]
        parts.append(f"{name}: 10-step p50 <= {P50_10_GOAL:g}x idle up to "
                     + ("no measured rate" if up_to is None else f"{up_to:.3g} req/s"))
    return "; ".join(parts) + "."


# -- outputs -----------------------------------------------------------------------------------------


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _point_row(name: str, p: dict, classes: list[str]) -> str:
    cells = [name, f"{p['fraction']:g}", f"{p['rate_per_s']:.3f}", f"{p['offered_per_s']:.3f}",
             f"{p['throughput_per_s']:.3f}", f"{p['completed']}/{p['refused']}/{p['unfinished']}/{p['failed']}"]
    for k in classes:
        c = p["by_decoder_steps"].get(k, {})
        cells.append(f"{_num(c.get('p50_s'))} / {_num(c.get('p99_s'))} (n {c.get('n', 0)})")
    occ = (p.get("occupancy") or {}).get("decoder")
    cells += [_num(p["p99_s"]), _num(p.get("queue_mean_s")), _num(occ, 2), f"{p['server_cpu_s']:.0f}",
              f"{p['load_avg'][0]:.1f}-{p['load_avg'][1]:.1f}"]
    return "| " + " | ".join(cells) + " |"


def _calibration_lines(idle: dict) -> list[str]:
    lines = ["| task | prior steps | decoder steps (run) | idle latency s: min, median (max) |", "|---|---:|---:|---|"]
    for c in idle["by_combo"]:
        lines.append(f"| {c['task']} | {c['prior_steps']} | {c['decoder_steps']} ({c['decoder_steps_run']}) | "
                     f"{min(c['samples_s']):.3f}, {c['median_s']:.3f} ({max(c['samples_s']):.3f}) |")
    return lines


def _run_health_lines(result: dict) -> list[str]:
    """How closely the sender kept the schedule, how long servers took to go quiet, what they logged."""
    points = [p for ps in result["contenders"].values() for p in ps]
    lag = max((p.get("send_lag_max_s", 0.0) for p in points), default=0.0)
    quiet = max((max(p.get("quiet_wait_s", [0.0])) for p in points), default=0.0)
    lines = [f"Run health: the sender's largest lag behind the schedule {lag:.3f} s; longest wait for a quiet server "
             f"around a point {quiet:.1f} s; server exit codes {result.get('server_exit_codes')}."]
    for name, problems in (result.get("server_problems") or {}).items():
        lines += [f"- {name} server logged after startup: " + ("nothing alarming" if not problems else
                                                                 "; ".join(f"`{line[:160]}`" for line in problems[:3]))]
    errors = sorted({e for p in points for e in p.get("errors", [])})
    return lines + (["- error answers: " + "; ".join(f"`{e[:160]}`" for e in errors[:5])] if errors else [])


def _goals_lines(result: dict) -> list[str]:
    cfg, names = result["config"], list(result["contenders"])
    lines = ["", "## Goals", "",
             "Sustainable rate (req/s): the highest rate of the grid, below the first that fails, whose p99 over all "
             "classes is within the target with nothing refused, unfinished or failed and, at points of "
             f"{KEEP_UP_MIN_ARRIVALS} arrivals or more, achieved >= {KEEP_UP:g} x offered. Targets: multiples of "
             f"the step server's idle p99 (all calibration samples); the goal check uses {PRIMARY_MULTIPLE:g}x.", "",
             "| p99 target | " + " | ".join(names) + " | step / request |", "|" + "---|" * (len(names) + 2)]
    for t in result["goals"]["at_equal_p99"]:
        cells = [_num(t["sustainable_rate_per_s"][n]) for n in names] + [_num(t["step_over_request"])]
        target = f"{t['multiple_of_idle_p99']:g}x idle p99 = {t['p99_target_s']:.2f} s"
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    lines += ["", "10-step p50 under load / idle 10-step p50, by rate:", "",
              "| contender | " + " | ".join(f"{f:g}x" for f in cfg["fractions"]) + " |",
              "|" + "---|" * (len(cfg["fractions"]) + 1)]
    for name, p in result["goals"]["p50_10_under_load_over_idle"].items():
        lines.append(f"| {name} | " + " | ".join(_num(r, 2) for _, r in p["ratio_by_rate"]) + " |")
    return lines


def render_markdown(result: dict) -> str:
    m, w, idle, cfg = result["machine"], result["workload"], result["idle"], result["config"]
    a = result["artifacts"]
    classes = [str(k) for k in w["decoder_steps"]]
    lines = [f"# Open-loop serving: step-level vs request-level vs no batching ({a['label']})", "",
             f"Machine: {result['machine_label']} ({m['cpu_model']}, {m['cores']} cores, {m['ram_gb']} GiB; host "
             f"{m['hostname']}). Created {result['created_utc']}. Artifacts: {a['precision']}, profiles "
             f"{a['profiles']}, backend ort on CPU.", "",
             *[f"- {note}" for note in result["notes"]], "",
             "## Calibration (step server, one request at a time)", "", *_calibration_lines(idle), "",
             f"Mean service time (mean over the combinations of each one's "
             f"{idle.get('service_estimate', 'median')} sample) "
             f"{idle['mean_service_s']:.3f} s -> saturation {idle['saturation_per_s']:.3f} req/s; "
             f"idle p50 of 10-step requests {idle['p50_10_s']:.3f} s, idle p99 (all) {idle['p99_s']:.3f} s. "
             f"Rates: {', '.join(f'{f:g}' for f in cfg['fractions'])} x saturation.", "",
             "## Per contender and rate", "",
             "Counts are completed/refused/unfinished/failed. Latency p50 / p99 in seconds from the scheduled "
             "arrival to the response, per decoder-step class (n = completed in the class); p99 is nearest rank "
             "(the maximum for n < 100). Queue: mean seconds per request (step server: its scheduler's queue "
             "metric; the others: Triton's queue duration). Occupancy: decoder rows run / rows offered (step "
             "server only). CPU: seconds the server's process tree used over the point. Load: the host's 1-min "
             "load average at the point's start and end.", "",
             "| contender | x sat | rate/s | offered/s | achieved/s | counts | "
             + " | ".join(f"{k}-step p50 / p99" for k in classes)
             + " | p99 all | queue s | occupancy | CPU s | load |", "|" + "---|" * (11 + len(classes))]
    for name, points in result["contenders"].items():
        lines += [_point_row(name, p, classes) for p in points]
    lines += _goals_lines(result)
    lines += ["", f"Goals: {goal_text(result)}", "", *_run_health_lines(result), ""]
    if result.get("findings"):
        lines += ["## Findings", "", *[f"- {f}" for f in result["findings"]], ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    plt = pyplot(path)
    if plt is None:
        return False
    classes = ("10", "100")
    fig, axes = plt.subplots(1, len(classes) + 1, figsize=(15, 4.2))
    for i, name in enumerate(result["contenders"]):
        points, color = result["contenders"][name], f"C{i}"
        offered = [p["offered_per_s"] for p in points]
        for ax, k in zip(axes, classes):
            for q, style in (("p50_s", "-"), ("p99_s", "--")):
                ax.plot(offered, [p["by_decoder_steps"].get(k, {}).get(q) or math.nan for p in points], style,
                        marker="o", color=color, label=f"{name} {q[:3]}")
        axes[-1].plot(offered, [p["throughput_per_s"] for p in points], marker="o", color=color, label=name)
    for ax, k in zip(axes, classes):
        ax.axhline(result["idle"]["p50_10_s"] if k == "10" else result["idle"]["by_class_p50_s"].get(k, math.nan),
                   color="grey", linestyle=":", label="idle p50 (step server)")
        ax.set(title=f"{k}-step requests", xlabel="offered load (req/s)", ylabel="latency (s)", yscale="log")
    top = max(max(p["offered_per_s"] for p in ps) for ps in result["contenders"].values())
    axes[-1].plot([0, top], [0, top], color="grey", linestyle=":", label="achieved = offered")
    axes[-1].set(title="throughput", xlabel="offered load (req/s)", ylabel="completed req/s")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"{result['artifacts']['label']}, {result['machine_label']}: open loop (one run, noisy host)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(result: dict, out: Path, stem: str) -> list[Path]:
    return write_files(result, out, stem, render_markdown(result), plot)


def idle_summary(samples: list[dict]) -> dict:
    """Calibration samples (``task``, ``prior_steps``, ``decoder_steps``, ``decoder_steps_run``,
    ``latency_s``) -> per-combination medians and minima, the mean service time over the combinations
    (each is equally likely in the workload) of each one's *fastest* sample (on a shared host the least
    disturbed), the saturation rate 1 / mean, idle 10-step p50 and idle p99 (over all samples)."""
    combos: dict[tuple, list[float]] = {}
    runs: dict[tuple, int] = {}
    for s in samples:
        key = (s["task"], s["prior_steps"], s["decoder_steps"])
        combos.setdefault(key, []).append(s["latency_s"])
        runs[key] = s["decoder_steps_run"]
    by_combo = [{"task": k[0], "prior_steps": k[1], "decoder_steps": k[2], "decoder_steps_run": runs[k],
                 "median_s": statistics.median(v), "min_s": min(v), "samples_s": v}
                for k, v in sorted(combos.items())]
    mean = statistics.fmean(c["min_s"] for c in by_combo)
    latencies = [s["latency_s"] for s in samples]
    by_class = {str(k): percentile([s["latency_s"] for s in samples if s["decoder_steps"] == k], 0.5)
                for k in sorted({s["decoder_steps"] for s in samples})}
    return {"by_combo": by_combo, "service_estimate": "fastest", "mean_service_s": mean, "saturation_per_s": 1.0 / mean,
            "p50_10_s": by_class.get("10"), "p99_s": percentile(latencies, 0.99), "by_class_p50_s": by_class}


def main(argv=None) -> None:
    """``python -m kandinsky_trt.benchmarks.open_loop_report STEM.json``: the goals, Markdown and PNG again
    from the JSON's points (after its ``findings`` were written by hand, or the goals' definition changed)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.split(":")[0])
    parser.add_argument("json", type=Path)
    args = parser.parse_args(argv)
    if args.json.suffix != ".json" or not args.json.is_file():
        parser.error(f"json: expected an existing STEM.json written by open_loop.py, found {str(args.json)!r}")
    result = json.loads(args.json.read_text())
    result["goals"] = goals(result["contenders"], result["idle"])
    for path in write_results(result, args.json.parent, args.json.stem):
        print(path)


if __name__ == "__main__":
    main()
