"""The end-to-end benchmark's result files as people read them: markdown tables, the goals
checked against the figures, and a chart, all made from the JSON alone
(`extrapolate_e2e.py --render-only` remakes them)."""

from __future__ import annotations

import json
from pathlib import Path

from _common import GIB, load_text

GB = 1e9


def fmt_gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def num(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def is_reference(label: str) -> bool:
    """The start-up row is there to read the others by; it does not do the job."""
    return label.startswith("python start-up")


def table(case: dict, title: str) -> list[str]:
    """One case as a markdown table, from its JSON summary."""
    rows = case["summary"]
    repeats = max(row["repeats"] for row in rows.values())
    lines = [
        f"### {title}",
        "",
        f"{case['params'] / 1e9:.2f}B parameters, {case['checkpoint_bytes'] / GB:.2f} GB per "
        f"checkpoint; {3 * case['checkpoint_bytes'] / GB:.2f} GB moved per run (read REF + MEM, "
        f"write OUT); up to {repeats} runs of each, interleaved.",
        "",
        "| tool | time (s, median) | best (s) | all runs (s) | GB/s | × floor | peak RSS "
        "| peak anon RSS |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for label, row in rows.items():
        runs = ", ".join(f"{t:.1f}" for t in row["seconds_all"])
        if row.get("killed_by_guard"):
            runs += f" ({row['killed_by_guard']} killed: machine out of memory)"
        best = row.get("seconds_best", min(row["seconds_all"]))
        rate, ratio = (None, None) if is_reference(label) else (row["gb_per_s"], row.get("x_floor"))
        lines.append(
            f"| {label} | {num(row['seconds_median'])} | {num(best)} | {runs} | {num(rate)} | "
            f"{num(ratio)} | {fmt_gib(row['peak_rss_bytes'])} | "
            f"{fmt_gib(row['peak_rss_anon_bytes'])} |"
        )
    return lines + [""]


def agreement_lines(case: dict) -> list[str]:
    lines = []
    for tool, a in case.get("agreement", {}).items():
        lines.append(
            f"- {tool} against {a['against']}: "
            f"{a['tensors_bit_identical']}/{a['tensors']} tensors bit-identical, "
            f"{a['values_differing']} values differ, at most "
            f"{a.get('max_ulps', a.get('max_ulps_bf16'))} ulp"
        )
    return lines


def ram_gib(report: dict) -> float:
    m = report["machine"]  # results written before benchmarks/_common.py said ram_gib
    return m.get("memory_gib", m.get("ram_gib"))


def preamble(report: dict, title: str) -> list[str]:
    m = report["machine"]
    commit = report.get("git_commit") or report["versions"]["moxkit_commit"]
    note = report.get("note") or m.get("note", "")
    return [
        f"# {title}",
        "",
        f"`{report['command']}`, {report['date_utc']} UTC, α = {report['alpha']}, device "
        f"{report['device']}, moxkit at commit {commit}, mergekit "
        f"{report['versions']['mergekit']}.",
        f"Machine: {m['cpu']}, {m.get('cores_usable', m.get('cores'))} cores, {ram_gib(report)} "
        f"GiB RAM; disk `{m['disk']}`; {load_text(m)}. {note}",
        "",
        "Time is the whole subprocess (Python start-up and imports included). GB/s = bytes "
        "moved / median time. × floor: median against the fastest floor form's median. Peak "
        "RSS: summed over the process tree, polled every 10 ms, and never below the kernel's "
        "ru_maxrss (from /usr/bin/time); anon RSS leaves out mapped file pages.",
        "",
    ]


def render_main(report: dict) -> list[str]:
    cases = report["cases"]
    lines = preamble(report, "moxkit extrapolate, end to end (warm page cache)")
    for case in cases:
        doubles = case.get("doubles")
        lines += table(case, case["name"] + (" (twice the model)" if doubles else ""))
    for case in cases:
        if case.get("doubles"):
            continue
        doubled = next((c for c in cases if c.get("doubles") == case["name"]), None)
        lines += headline(case["name"], case["summary"], doubled and doubled["summary"])
        if case.get("agreement"):
            lines += ["", "Outputs compared (every tensor, bit patterns):", ""]
            lines += agreement_lines(case)
    return lines


def headline(name: str, rows: dict[str, dict], doubled: dict[str, dict] | None) -> list[str]:
    """The issues' goals, checked against what was measured (reported, not asserted)."""
    if "moxkit" not in rows:
        return []
    mox = rows["moxkit"]
    lines = ["", f"Against the goals ({name}):", ""]
    lines.append(
        f"- moxkit at {mox['x_floor']:.2f}× the I/O floor, copying the same bytes "
        "(goal: within 1.2×)"
    )
    for label, row in rows.items():
        if label.startswith("before:") and row["seconds_median"]:
            speedup = row["seconds_median"] / mox["seconds_median"]
            lines.append(
                f"- {label.removeprefix('before: ')} (same run): {row['x_floor']:.2f}× the floor; "
                f"moxkit now takes {1 / speedup:.2f}× its time"
            )
    if "mergekit" in rows:
        speedup = rows["mergekit"]["seconds_median"] / mox["seconds_median"]
        lines.append(f"- moxkit {speedup:.1f}× faster than mergekit (goal: at least 5×)")
    if "plain script" in rows:
        speedup = rows["plain script"]["seconds_median"] / mox["seconds_median"]
        lines.append(f"- the plain script takes {speedup:.1f}× moxkit's time")
    lines.append(f"- moxkit peak RSS {fmt_gib(mox['peak_rss_bytes'])} (goal: under 1 GiB)")
    if doubled and "moxkit" in doubled:
        lines.append(
            f"- twice the model: moxkit peak RSS {fmt_gib(doubled['moxkit']['peak_rss_bytes'])} "
            f"(vs {fmt_gib(mox['peak_rss_bytes'])})"
            + (f"; the plain script's went from {fmt_gib(rows['plain script']['peak_rss_bytes'])}"
               f" to {fmt_gib(doubled['plain script']['peak_rss_bytes'])}"
               if "plain script" in doubled and "plain script" in rows else "")
        )  # fmt: skip
    return lines


def render_7b(report: dict) -> list[str]:
    case = report["case"]
    rows = case["summary"]
    lines = preamble(report, "moxkit extrapolate, Llama-2-7B shapes, cold page cache")
    lines += [
        "Page cache dropped before every run, then the Python programs' own files read back "
        "(`import torch, safetensors, moxkit`, not timed): the checkpoints are cold, not the "
        "interpreter. Time includes syncing the output to disk. The floor reads MEM with cat "
        "while cp copies REF (each input byte read once; reading both first and then copying "
        "REF would read REF from disk twice, since the inputs do not fit in the page cache). "
        "moxkit runs under --max-memory 1GiB. The plain script runs once, under a guard that "
        f"kills it if the machine's available memory falls under {report['memory_guard_gib']} "
        "GiB.",
        "",
    ]
    lines += table(case, case["name"])
    mox = rows.get("moxkit", {})
    if mox.get("x_floor"):
        lines.append(
            f"- moxkit at {mox['x_floor']:.2f}× the cold-cache I/O floor (goal: within 1.5×), "
            f"peak RSS {fmt_gib(mox['peak_rss_bytes'])} (budget 1 GiB)"
        )
        lines += [
            f"- {label.removeprefix('before: ')} (same run): {row['x_floor']:.2f}× the floor, "
            f"peak RSS {fmt_gib(row['peak_rss_bytes'])}"
            for label, row in rows.items()
            if label.startswith("before:") and row.get("x_floor")
        ]
    plain = rows.get("plain script")
    if plain and plain.get("killed_by_guard"):
        lines.append(
            f"- the plain script could not run: killed when the machine ran out of memory, "
            f"at {fmt_gib(plain['peak_rss_bytes'])} RSS"
        )
    elif plain and mox.get("seconds_median"):
        lines.append(
            f"- the plain script did run: {plain['seconds_median'] / mox['seconds_median']:.1f}× "
            f"moxkit's time, peak RSS {fmt_gib(plain['peak_rss_bytes'])} of the machine's "
            f"{ram_gib(report)} GiB ({fmt_gib(plain['peak_rss_anon_bytes'])} "
            "anonymous: safetensors' load_file maps the inputs, so only OUT must fit in RAM)"
        )
    return lines + agreement_lines(case)


def bar_chart(report: dict, path: Path) -> None:
    """Median time and peak RSS per tool for the main case (and the 2x-model runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, times, rss = [], [], []
    for i, case in enumerate(report["cases"]):
        for label, row in case["summary"].items():
            if is_reference(label) or (i > 0 and label.startswith("floor")):
                continue
            labels.append(label if i == 0 else f"{label}, {case['name']}")
            times.append(row["seconds_median"])
            rss.append(row["peak_rss_bytes"] / GIB)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 0.55 * len(labels) + 1.8))
    ax_t.barh(labels, times, color="tab:blue")
    ax_t.set_xlabel("wall time, s (median)")
    ax_m.barh(labels, rss, color="tab:orange")
    ax_m.set_xlabel("peak RSS, GiB")
    ax_m.set_yticklabels([])
    ax_m.axvline(1.0, color="gray", linestyle="--", linewidth=1)
    ax_m.text(1.0, -0.6, " 1 GiB", color="gray")
    for ax, values in ((ax_t, times), (ax_m, rss)):
        ax.invert_yaxis()
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.2f}", va="center")
        ax.margins(x=0.2)
    first = report["cases"][0]["name"]
    fig.suptitle(f"moxkit extrapolate, {first}: time and peak memory ({report['date_utc']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(stem: Path) -> None:
    report = json.loads(stem.with_suffix(".json").read_text())
    lines = render_7b(report) if "case" in report else render_main(report)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if "cases" in report:
        bar_chart(report, stem.with_suffix(".png"))
    print("\n".join(lines))
