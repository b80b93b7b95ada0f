"""Pure parts of `gen bench`: run order, medians and spreads, ratios, targets, run plan, table."""

from __future__ import annotations

import pytest

from jobs.bench.report import format_report
from jobs.bench.stats import Target, best, compare, interleave, paired_ratios, spread
from jobs.bench.suite import BenchConfig, comparisons, plan_runs
from jobs.errors import JobError


def test_interleave_runs_every_name_once_per_repeat_in_order() -> None:
    assert interleave(["A", "B", "C"], 2) == [(0, "A"), (0, "B"), (0, "C"), (1, "A"), (1, "B"), (1, "C")]
    assert interleave(["A"], 1) == [(0, "A")]
    with pytest.raises(ValueError, match="repeats 0"):
        interleave(["A"], 0)
    with pytest.raises(ValueError, match="duplicate"):
        interleave(["A", "A"], 1)


def test_spread_median_quartiles_and_extremes() -> None:
    s = spread([3.0, 1.0, 2.0, 10.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 10.0 and s["n"] == 4
    assert s["q1"] == 1.75 and s["q3"] == 4.75
    one = spread([7.0])
    assert one == {"median": 7.0, "min": 7.0, "max": 7.0, "q1": 7.0, "q3": 7.0, "n": 1}
    with pytest.raises(ValueError):
        spread([])


def test_paired_ratios() -> None:
    assert paired_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    with pytest.raises(ValueError, match="numerators"):
        paired_ratios([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-positive"):
        paired_ratios([1.0], [0.0])


@pytest.mark.parametrize(
    ("op", "value", "ratio", "met", "shortfall"),
    [
        (">=", 1.85, 1.85, True, 0.0),
        (">=", 1.85, 1.665, False, 0.1),
        (">", 1.0, 1.0, False, 0.0),  # not met, but by nothing
        (">", 1.0, 1.01, True, 0.0),
        ("<=", 0.8, 0.8, True, 0.0),
        ("<=", 0.8, 0.88, False, 0.1),
    ],
)
def test_target_met_and_shortfall(op: str, value: float, ratio: float, met: bool, shortfall: float) -> None:
    t = Target(op=op, value=value)
    assert t.met(ratio) is met
    assert t.shortfall(ratio) == pytest.approx(shortfall)
    assert t.describe() == f"{op} {value:g}"


def test_target_rejects_unknown_operator() -> None:
    with pytest.raises(ValueError, match="operator"):
        Target(op="==", value=1.0)


def test_compare_ratio_of_medians_and_paired_spread() -> None:
    c = compare("x", [10.0, 12.0, 11.0], [5.0, 8.0, 5.5], what="w", target=Target(op=">=", value=1.85))
    assert c["ratio"] == pytest.approx(11.0 / 5.5)
    assert c["paired"]["min"] == pytest.approx(1.5) and c["paired"]["max"] == pytest.approx(2.0)
    assert c["met"] is True and c["shortfall"] == 0.0 and c["target"] == ">= 1.85"
    plain = compare("y", [1.0], [2.0], what="w")
    assert plain["met"] is None and plain["target"] is None and plain["ratio"] == 0.5


def test_best_takes_the_highest_median() -> None:
    assert best({"b2": [1.0, 5.0, 1.1], "b4": [2.0, 2.0, 2.0]}) == "b4"
    with pytest.raises(ValueError):
        best({})


def test_plan_runs_sweep_bounded_by_prompts_and_no_duplicates() -> None:
    names = [r.name for r in plan_runs(BenchConfig(num_prompts=4, batch_sizes=(2, 4, 8)))]
    assert names == ["plain loop", "gen b1", "gen b2", "gen b4", "gen b4 cfg2", "gen b4 gate0.5",
                     "gen b4 gate-cos0.99", "gen b4 cfg2 gate0.5", "accelerate b1", "accelerate b4",
                     "gen b1 dp2", "gen b4 dp2"]  # fmt: skip
    four = {r.name: r for r in plan_runs(BenchConfig(gpus=4, cfg_gate_cosine=None))}
    assert four["gen b4 dp2"].gpus == 2 and four["gen b4 dp2"].cfg_parallel_size == 1
    assert four["gen b4 cfg2"].gpus == 4 and four["gen b4 cfg2"].cfg_parallel_size == 2
    assert "gen b8" in four and not any("cos" in n for n in four)
    assert four["accelerate b4"].kind == "plain" and four["accelerate b4"].gpus == 4
    assert four["gen b1 dp4"].gpus == 4 and four["gen b1 dp4"].cfg_parallel_size == 1
    one = [r.name for r in plan_runs(BenchConfig(gpus=1))]
    assert not any("cfg2" in n or "accelerate" in n for n in one)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("gpus", 3, "--gpus 3"), ("repeats", 0, "--repeats 0"), ("height", 100, "--height 100"),
     ("guidance_scale", 1.0, "--guidance-scale"), ("cfg_gate_step", 1.0, "--cfg-gate-step"),
     ("batch_sizes", (0,), "--batch-sizes")],
)  # fmt: skip
def test_bench_config_rejects_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(JobError, match=message):
        BenchConfig(**{field: value})


def _figures(config: BenchConfig) -> dict[str, list[dict]]:
    """Synthetic per-repeat figures: walls by a known factor of the batch-4 baseline."""
    walls = {"plain loop": 20.0, "gen b1": 19.0, "gen b2": 16.0, "gen b4": 10.0, "gen b8": 12.0,
             "gen b4 cfg2": 5.0, "gen b4 gate0.5": 7.5, "gen b4 gate-cos0.99": 6.0,
             "gen b4 cfg2 gate0.5": 4.0, "accelerate b1": 12.0, "accelerate b4": 9.0,
             "gen b1 dp2": 10.0, "gen b4 dp2": 6.0}  # fmt: skip
    figures = {}
    for run in plan_runs(config):
        w = walls[run.name]
        figures[run.name] = [{"generate_wall_s": w * f, "images_per_s": 16 / (w * f),
                              "peak_rss_bytes": [500 << 20] * run.gpus, "peak_device_bytes": [0] * run.gpus}
                             for f in (1.0, 1.1, 0.9)]  # fmt: skip
    return figures


def test_comparisons_ratios_and_targets() -> None:
    config = BenchConfig(num_prompts=16)
    found = {c["name"]: c for c in comparisons(config, _figures(config))}
    assert found["gen vs plain, batch 1"]["ratio"] == pytest.approx(20 / 19)
    assert found["gen vs plain, batch 1"]["met"] is True
    assert found["gen vs plain, best batch"]["numerator"] == "gen b4"
    assert found["gen vs plain, best batch"]["ratio"] == pytest.approx(2.0)
    assert found["cfg parallel"]["ratio"] == pytest.approx(2.0) and found["cfg parallel"]["met"]
    assert found["gate 0.5"]["ratio"] == pytest.approx(0.75) and found["gate 0.5"]["met"]
    assert found["adaptive gate"]["ratio"] == pytest.approx(0.6) and found["adaptive gate"]["met"] is None
    assert found["cfg parallel + gate"]["ratio"] == pytest.approx(2.5)
    assert found["gen vs accelerate, batch 1"]["ratio"] == pytest.approx(1.2)
    assert found["gen vs accelerate, best batch"]["numerator"] == "gen b4 dp2"
    assert found["gen vs accelerate, best batch"]["ratio"] == pytest.approx(2.0)
    assert found["gen vs accelerate, best batch"]["met"] is True
    assert found["gen vs accelerate, same batch"]["ratio"] == pytest.approx(1.5)
    assert found["gen vs accelerate, same batch"]["met"] is None
    assert all(c["paired"]["min"] == pytest.approx(c["ratio"]) for c in found.values())


def test_format_report_lists_runs_comparisons_and_misses() -> None:
    from jobs.bench.suite import _report

    config = BenchConfig(num_prompts=16)
    figures = _figures(config)
    figures["gen b4 gate0.5"] = [{**r, "generate_wall_s": r["generate_wall_s"] * 1.2} for r in figures["gen b4 gate0.5"]]
    report = _report(config, plan_runs(config), figures, None,
                     {"cpu_cores": 2, "cpu_model": "x", "memory_bytes": 1 << 34, "device": "cpu",
                      "torch": "t", "diffusers": "d"}, 1.0)  # fmt: skip
    text = "\n".join(format_report(report))
    assert "gen b4 cfg2" in text and "500 / 500" in text
    assert "gate 0.5" in text and "MISSED by 12.5%" in text  # 0.9 against <= 0.8
    assert report["runs"]["gen b4"]["generate_wall_s"]["median"] == pytest.approx(10.0)
