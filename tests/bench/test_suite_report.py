"""bench/suite_report.py's table: "x Ray" is taken against the better of Ray Serve's two
ingresses at each concurrency (the most req/s, and separately the lowest p99), on rows made up
here."""

from __future__ import annotations

from pathlib import Path

from bench.suite_report import best_peer, write_report


def _row(system: str, concurrency: int, rps: float, p99: float) -> dict[str, object]:
    return {"system": system, "model": "demo", "tokens": 16, "body": "raw",
            "concurrency": concurrency, "throughput_rps": rps, "p50_ms": p99 / 2,
            "p99_ms": p99, "failures": 0}  # fmt: skip


def test_the_peer_is_the_faster_ingress_for_throughput_and_the_steadier_for_p99() -> None:
    default = [_row("Ray Serve + @serve.batch", 1, 50.0, 20.0), _row("x", 32, 100.0, 300.0)]
    haproxy = [_row("h", 1, 40.0, 15.0), _row("h", 32, 200.0, 400.0)]
    fastest, steadiest = best_peer(default + haproxy)
    assert fastest[1] is default[0] and fastest[32] is haproxy[1]
    assert steadiest[1] is haproxy[0] and steadiest[32] is default[1]
    assert best_peer([]) == ({}, {})


def test_the_table_divides_by_the_better_ingress(tmp_path: Path) -> None:
    rows = [
        _row("appliance node", 32, 400.0, 100.0),
        _row("Ray Serve + @serve.batch", 32, 50.0, 600.0),
        _row("Ray Serve + @serve.batch, HAProxy ingress", 32, 100.0, 800.0),
        _row("Ray Serve", 32, 500.0, 50.0),  # unbatched: never the peer
    ]
    report = {"points": rows, "limits": {"demo/16": 500.0}, "ray": {}, "when": "now",
              "cpus": 2, "threads": 2}  # fmt: skip
    text = write_report(report, tmp_path).read_text()
    node = next(line for line in text.splitlines() if line.startswith("| appliance node"))
    cells = [c.strip() for c in node.strip("|").split("|")]
    assert cells[6:9] == ["0.80", "4.00", "0.17"]  # x limit, x Ray (req/s) 400/100, p99 100/600
    assert cells[9:11] == ["-", "-"]  # a report from before the suite measured CPU
    assert "better of its two ingresses" in text


def test_a_new_run_replaces_its_own_sections_whatever_their_figures(tmp_path: Path) -> None:
    rows = [_row("appliance node", 32, 400.0, 100.0)]
    report = {"points": rows, "limits": {"demo/16": 500.0}, "ray": {}, "when": "then",
              "cpus": 2, "threads": 2}  # fmt: skip
    doc = write_report(report, tmp_path)
    doc.write_text(doc.read_text() + "\n## Hot path (MLP)\n\nkept\n")
    report["limits"] = {"demo/16": 600.0}  # another run: the section's title changes
    text = write_report(report, tmp_path).read_text()
    assert text.count("## demo, 16 tokens") == 1 and "limit 600.0 rows/s" in text
    assert text.count("## Hot path (MLP)") == 1 and "kept" in text


def test_the_cores_each_side_kept_busy_sit_beside_the_figures(tmp_path: Path) -> None:
    rows = [{**_row("appliance node", 32, 400.0, 100.0), "generator_cores": 0.214,
             "server_cores": 1.5}]  # fmt: skip
    report = {"points": rows, "limits": {"demo/16": 500.0}, "ray": {}, "when": "now",
              "cpus": 2, "threads": 2}  # fmt: skip
    text = write_report(report, tmp_path).read_text()
    header = next(line for line in text.splitlines() if line.startswith("| system"))
    assert "| generator cores | server cores | failed |" in header
    node = next(line for line in text.splitlines() if line.startswith("| appliance node"))
    assert [c.strip() for c in node.strip("|").split("|")][9:12] == ["0.21", "1.50", "0"]
