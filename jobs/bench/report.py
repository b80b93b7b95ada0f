"""The `gen bench` table: runs (medians and spreads, peak memory), ratios against targets, and
the intercept's per-call overhead, as printable lines."""

from __future__ import annotations

from typing import Any

MIB = 1 << 20


def _fig(s: dict[str, float], digits: int) -> str:
    """"median [min-max]"."""
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def _met(entry: dict[str, Any]) -> str:
    if entry["met"] is None:
        return ""
    return "met" if entry["met"] else f"MISSED by {entry['shortfall']:.1%}"


def format_report(report: dict[str, Any]) -> list[str]:
    """Lines of the bench's table.

    Args:
        report: what ``jobs.bench.run_bench`` writes as JSON.
    Returns:
        Printable lines: a header naming the machine and settings, one line per run
        (generate_wall_s and images/s as median [min-max], peak RSS per rank in MiB), one per
        comparison (ratio of medians, paired per-repeat spread, target and whether met), and the
        overhead figures if measured.
    """
    cfg, m = report["config"], report["machine"]
    size = f"{cfg['height']}x{cfg['width']} px" if cfg["height"] and cfg["width"] else "native size"
    lines = [
        f"machine: {m['cpu_cores']} cores ({m['cpu_model'] or '?'}), {m['memory_bytes'] / (1 << 30):.0f} GiB, "
        f"device {m['device']}{' ' + m['gpu'] if m.get('gpu') else ''}; torch {m['torch']}, diffusers {m['diffusers']}",
        f"settings: {cfg['model']}, {size}, {cfg['num_inference_steps']} steps, {cfg['num_prompts']} prompts, "
        f"{cfg['threads']} thread(s) per rank, median [min-max] of {cfg['repeats']} interleaved repeat(s)",
        "",
    ]  # fmt: skip
    width = max(len(n) for n in report["runs"])
    lines.append(f"{'run':{width}s}  {'generate_wall_s':>22s}  {'images/s':>20s}  peak RSS per rank (MiB)")
    for name, run in report["runs"].items():
        rss = " / ".join(f"{b / MIB:.0f}" for b in run["peak_rss_bytes_per_rank"])
        lines.append(f"{name:{width}s}  {_fig(run['generate_wall_s'], 3):>22s}  "
                     f"{_fig(run['images_per_s'], 3):>20s}  {rss}")  # fmt: skip
    lines.append("")
    width = max(len(c["name"]) for c in report["comparisons"])
    lines.append(f"{'comparison':{width}s}  {'ratio':>7s}  {'paired [min-max]':>17s}  {'target':>7s}  result")
    for c in report["comparisons"]:
        paired = f"[{c['paired']['min']:.3f}-{c['paired']['max']:.3f}]" if c["paired"] else ""
        lines.append(f"{c['name']:{width}s}  {c['ratio']:7.3f}  {paired:>17s}  {c['target'] or '':>7s}  "
                     f"{_met(c)}  ({c['what']}: {c['numerator']} vs {c['denominator']})")  # fmt: skip
    overhead = report.get("overhead")
    if overhead:
        lines.append("")
        lines.append("intercept overhead per denoiser call (wrapped forward - original forward), median [p10-p90] us:")
        for name, found in overhead.items():
            for r in found if isinstance(found, list) else [found]:
                rank = f" rank {r['rank']}" if r["ranks"] > 1 else ""
                o, i = r["overhead_us"], r["inner_us"]
                ab = ""
                if "ab" in r:
                    ab = f"; A/B stock vs intercepted: {r['ab']['difference_us_per_step']:+.0f} us/step"
                lines.append(f"  {name}{rank}: {o['median']:.0f} [{o['p10']:.0f}-{o['p90']:.0f}] us over a "
                             f"{i['median'] / 1000:.2f} ms call ({o['median'] / i['median']:.3%}; batch "
                             f"{r['batch_size']}, {r['size']} px){ab}")  # fmt: skip
    return lines
