"""summary.json: totals over the done markers and this run's per-rank stats."""

from __future__ import annotations

from typing import Any

from jobs.output.store import OutputDir, write_json


def build_summary(out: OutputDir, *, launch_wall: float, num_shards: int) -> dict[str, Any]:
    """Summarize the job and write OUT/summary.json.

    Args:
        out: the output directory.
        launch_wall: time.time() when `gen batch` started (for startup_s).
        num_shards: shards in the plan.
    Returns:
        The summary: samples_ok / samples_error over all committed shards; generate_wall_s (first
        denoising step to last decode of this run, over all ranks), startup_s (launch to first
        denoising step), images_per_s (ok images of this run / generate_wall_s); compile_s
        (``--compile``: the largest rank's torch.compile seconds, part of generate_wall_s);
        time_to_first_image_s (launch, or SLURM submission, to the first decoded image of this
        run), time_to_done_s (launch to the last shard committed in this run; None if none);
        fresh_uncond, reused_uncond, invalidations: totals over all samples' steps;
        branches: {branch: {"fresh": n, "reused": m}} per auxiliary branch (uncond, stg, ...)
        over all samples; per rank: peaks, write_s / write_wait_s (media encoding and part
        writes, and the part of them the rank waited for), cfg_exchanges / cfg_exchange_s
        (collectives within its CFG group and their seconds).
    """
    markers = out.done_markers()
    ranks = out.run_records()
    starts = [r["first_denoise_wall"] for r in ranks if r["first_denoise_wall"]]
    ends = [r["last_decode_wall"] for r in ranks if r["last_decode_wall"]]
    generate_wall_s = max(ends) - min(starts) if starts and ends else 0.0
    run_ok = sum(r["samples_ok"] for r in ranks)
    summary = {
        "samples_ok": sum(m["samples_ok"] for m in markers),
        "samples_error": sum(m["samples_error"] for m in markers),
        "fresh_uncond": sum(m.get("fresh_uncond", 0) for m in markers),
        "reused_uncond": sum(m.get("reused_uncond", 0) for m in markers),
        "branches": _branches(markers),
        "invalidations": sum(m.get("invalidations", 0) for m in markers),
        "samples_warning": sum(m.get("samples_warning", 0) for m in markers),
        "shards_done": len(markers),
        "shards_total": num_shards,
        "generate_wall_s": round(generate_wall_s, 4),
        "compile_s": round(max((r.get("compile_s") or 0.0 for r in ranks), default=0.0), 4),
        "startup_s": round(min(starts) - launch_wall, 4) if starts else 0.0,
        "images_per_s": round(run_ok / generate_wall_s, 4) if generate_wall_s > 0 else 0.0,
        "time_to_first_image_s": _since(launch_wall, [r.get("first_image_wall") for r in ranks], min),
        "time_to_done_s": _since(launch_wall, [m.get("committed_at") for m in markers
                                               if m.get("committed_at", 0) >= launch_wall], max),
        "run_samples_ok": run_ok,
        "run_samples_error": sum(r["samples_error"] for r in ranks),
        "run_samples_skipped": sum(r["samples_skipped"] for r in ranks),
        "ranks": [
            {k: r.get(k, "monolithic") for k in ("rank", "role", "dp_rank", "cfg_rank", "device", "threads", "load_s", "compile_s",
                                                 "write_s", "write_wait_s", "cfg_exchanges", "cfg_exchange_s", "samples_ok", "samples_error", "peak_rss_bytes", "peak_device_bytes")}
            for r in ranks
        ],  # fmt: skip
        "roles": _roles(ranks),
    }
    write_json(out.summary_json, summary)
    return summary


def _roles(ranks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per role of this run ("monolithic" for an unsplit one): its ranks, the largest peak RSS
    of one of its ranks and their sum (bytes), the largest peak device memory, and load_s."""
    roles: dict[str, dict[str, Any]] = {}
    for r in sorted(ranks, key=lambda r: r["rank"]):
        role = roles.setdefault(r.get("role", "monolithic"), {"ranks": 0, "peak_rss_bytes": 0, "sum_peak_rss_bytes": 0,
                                                               "peak_device_bytes": None, "load_s": 0.0})  # fmt: skip
        role["ranks"] += 1
        role["peak_rss_bytes"] = max(role["peak_rss_bytes"], r.get("peak_rss_bytes") or 0)
        role["sum_peak_rss_bytes"] += r.get("peak_rss_bytes") or 0
        if r.get("peak_device_bytes") is not None:
            role["peak_device_bytes"] = max(role["peak_device_bytes"] or 0, r["peak_device_bytes"])
        role["load_s"] = max(role["load_s"], r.get("load_s") or 0.0)
    return roles


def _branches(markers: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per-branch fresh / reused totals over done markers; a marker written before markers
    carried "branches" counts its uncond totals."""
    totals: dict[str, dict[str, int]] = {}
    for m in markers:
        branches = m.get("branches")
        if branches is None:
            branches = {"uncond": {"fresh": m.get("fresh_uncond", 0), "reused": m.get("reused_uncond", 0)}}
        for name, counts in branches.items():
            t = totals.setdefault(name, {"fresh": 0, "reused": 0})
            t["fresh"] += counts["fresh"]
            t["reused"] += counts["reused"]
    return totals


def _since(launch_wall: float, walls: list[float | None], pick) -> float | None:  # noqa: ANN001
    """Seconds from launch to pick(walls) (min or max), or None when there are none."""
    found = [w for w in walls if w]
    return round(pick(found) - launch_wall, 4) if found else None
