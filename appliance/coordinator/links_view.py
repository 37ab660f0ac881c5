"""The ring's links as the coordinator knows them: its own (to every node) and what each node
reports of its links to the others, by node id; for ``GET /v2/cluster``, placement and the
choice of a sequence's chain."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from appliance.coordinator.cluster import Member
from appliance.coordinator.placement import LinkFigure
from appliance.ring.links import LinkTable

COORDINATOR = "coordinator"  # the coordinator's end of its links to the nodes


def _figure(report: dict[str, Any]) -> LinkFigure | None:
    latency, throughput = report.get("latency_s"), report.get("throughput_bps")
    if not isinstance(latency, int | float) or latency < 0:
        return None
    fast = isinstance(throughput, int | float) and throughput > 0
    return LinkFigure(float(latency), float(throughput) if fast and throughput else None)


def _reports(members: Iterable[Member], own: LinkTable) -> list[tuple[str, dict[str, Any]]]:
    out = [(COORDINATOR, link) for link in own.report()]
    out += [(m.node_id, link) for m in members for link in m.links]
    return out


def link_figures(members: Iterable[Member], own: LinkTable) -> dict[tuple[str, str], LinkFigure]:
    """(from, to) node ids -> the link's figures, for links to current members' addresses."""
    members = list(members)
    by_address: dict[str, str] = {m.address: m.node_id for m in members}
    out: dict[tuple[str, str], LinkFigure] = {}
    for source, report in _reports(members, own):
        target = by_address.get(str(report.get("to")))
        figure = _figure(report)
        if target is not None and figure is not None and target != source:
            out[(source, target)] = figure
    return out


def links_view(members: Iterable[Member], own: LinkTable) -> list[dict[str, Any]]:
    """Every link with figures, for GET /v2/cluster: from, to (node ids), to_address, latency
    in ms, throughput in Mbit/s, and how it was measured."""
    members = list(members)
    by_address: dict[str, str] = {m.address: m.node_id for m in members}
    rows = []
    for source, report in _reports(members, own):
        address = str(report.get("to"))
        if address not in by_address:
            continue  # a member gone, or one that came back at another address
        rows.append(
            {
                "from": source,
                "to": by_address[address],
                "to_address": address,
                "latency_ms": _ms(report.get("latency_s")),
                "throughput_mbit_s": _mbit(report.get("throughput_bps")),
                "calls": report.get("calls", 0),
                "network_s": report.get("network_s", 0.0),
                "bytes": report.get("bytes", 0),
                "probe_latency_ms": _ms(report.get("probe_latency_s")),
                "probe_throughput_mbit_s": _mbit(report.get("probe_throughput_bps")),
            }
        )
    return sorted(rows, key=lambda r: (r["from"] != COORDINATOR, r["from"], r["to"]))


def _ms(value: Any) -> float | None:
    return round(value * 1e3, 3) if isinstance(value, int | float) else None


def _mbit(value: Any) -> float | None:
    return round(value * 8e-6, 1) if isinstance(value, int | float) else None
