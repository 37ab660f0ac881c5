"""The process runner's own metrics (connections by phase, their ends by reason, the descriptor
budget, failed accepts, admission, the loop's lag, suppressed log lines), read at scrape time
from the objects that keep them, in a registry of their own; ``metrics_middleware`` appends
them to whatever ``GET /metrics`` a server answers, so no metrics handler has to know them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.http import log_limits
from appliance.http.connections import REASONS
from appliance.http.limits import open_descriptors
from appliance.http.site import ACCEPT_ERRORS

if TYPE_CHECKING:
    from appliance.http.guards import Guards


class GuardCollector(Collector):
    def __init__(self, guards: Guards) -> None:
        self._guards = guards

    def collect(self) -> Iterable[Metric]:
        tracker = self._guards.tracker
        admission = self._guards.admission
        phases = GaugeMetricFamily(
            "appliance_connections",
            "inbound connections by phase (writing: an answer waiting on its client)",
            labels=["phase"],
        )
        for phase, count in tracker.by_phase().items():
            phases.add_metric([phase], count)
        phases.add_metric(["member"], tracker.members)
        yield phases
        yield CounterMetricFamily(
            "appliance_connections_opened", "inbound connections accepted", value=tracker.opened
        )
        closed = CounterMetricFamily(
            "appliance_connections_closed",
            "inbound connections ended, by reason (timeouts, shedding, refusals; other: by "
            "the client or after an answer)",
            labels=["reason"],
        )
        for reason in REASONS:
            closed.add_metric([reason], tracker.closed.get(reason, 0))
        yield closed
        budget = self._guards.budget
        limits = GaugeMetricFamily(
            "appliance_descriptors",
            "the descriptor budget: limit (soft RLIMIT_NOFILE), reserve, connection cap, open",
            labels=["what"],
        )
        if budget is not None:
            limits.add_metric(["limit"], budget.descriptors)
            limits.add_metric(["reserve"], budget.reserve)
            limits.add_metric(["cap"], budget.cap)
        held = open_descriptors()
        if held is not None:
            limits.add_metric(["open"], held)
        yield limits
        accept = CounterMetricFamily(
            "appliance_accept_errors", "failed accepts by errno (EMFILE...)", labels=["errno"]
        )
        for name, count in ACCEPT_ERRORS.counts.items():
            accept.add_metric([name], count)
        yield accept
        refused = CounterMetricFamily(
            "appliance_admission_refused",
            "inference requests refused 503 while the event loop lagged (where: answered from "
            "their bytes, or by the middleware)",
            labels=["where"],
        )
        fast = self._guards.fast.answered if self._guards.fast is not None else 0
        refused.add_metric(["bytes"], fast)
        refused.add_metric(["middleware"], admission.refused - fast)
        yield refused
        state = GaugeMetricFamily(
            "appliance_admission",
            "admission: limit and in_flight of inference requests, lag_seconds of the loop "
            "(last sample), lag_max_seconds (the largest since the last scrape), "
            "fastest_seconds (the quickest answer of the last window with answers), "
            "floor_seconds (the quickest of the last 30 s: a queue is 8x that)",
            labels=["what"],
        )
        state.add_metric(["limit"], admission.limit)
        state.add_metric(["in_flight"], admission.in_flight)
        state.add_metric(["lag_seconds"], admission.lag_s)
        state.add_metric(["lag_max_seconds"], admission.lag_max_s)
        state.add_metric(["fastest_seconds"], admission.fastest_s)
        state.add_metric(["floor_seconds"], admission.floor_s)
        admission.lag_max_s = admission.lag_s
        yield state
        repeat = log_limits.installed()
        yield CounterMetricFamily(
            "appliance_log_lines_suppressed",
            "repeated log lines not written (log_repeat_interval_s)",
            value=repeat.suppressed_total if repeat is not None else 0,
        )


def metrics_middleware(guards: Guards) -> Middleware:
    """Innermost: a 200 answer of ``GET /metrics`` gets the runner's metrics appended."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        scraped = request.path == "/metrics" and response.status == 200
        if scraped and isinstance(response, web.Response) and isinstance(response.body, bytes):
            response.body = response.body + generate_latest(guards.registry)
        return response

    return middleware
