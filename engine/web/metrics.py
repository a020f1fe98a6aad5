"""Prometheus metrics of `wecast serve`: gauges read from the database at scrape time (right across restarts and
processes), and the gateway's call latency and send outcomes measured in this process."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy.engine import Engine

from engine.errors import GatewayError
from engine.gateways.base import Gateway, LoginState
from storage import deliveries as deliveries_db
from storage import runs as runs_db
from storage.models import DeliveryStatus, RunStatus


class DatabaseCollector:
    """The delivery, queue and run gauges, plus the service's own state (login, campaign files, dispatches)."""

    def __init__(
        self,
        db: Engine,
        *,
        login_state: Callable[[], LoginState],
        file_errors: Callable[[], int],
        dispatching: Callable[[], int],
    ) -> None:
        self.db = db
        self.login_state = login_state
        self.file_errors = file_errors
        self.dispatching = dispatching

    def collect(self) -> Iterator[GaugeMetricFamily]:
        by_status = deliveries_db.counts_by_status(self.db)
        queue = deliveries_db.queue_depth(self.db)
        runs = runs_db.counts_by_status(self.db)
        deliveries = GaugeMetricFamily("wecast_deliveries", "Deliveries by status (all runs)", labels=["status"])
        for status in DeliveryStatus:
            deliveries.add_metric([status], float(by_status.get(status, 0)))
        yield deliveries
        yield GaugeMetricFamily(
            "wecast_queue_depth", "Deliveries of running runs waiting to be sent", value=float(queue)
        )
        run_family = GaugeMetricFamily("wecast_runs", "Runs by status", labels=["status"])
        for run_status in RunStatus:
            run_family.add_metric([run_status], float(runs.get(run_status, 0)))
        yield run_family
        state = self.login_state()
        login = GaugeMetricFamily("wecast_login_state", "1 for the current login state", labels=["state"])
        for each in LoginState:
            login.add_metric([each.value], 1.0 if state is each else 0.0)
        yield login
        yield GaugeMetricFamily(
            "wecast_logged_in",
            "1 when the WeCom account is logged in",
            value=1.0 if state is LoginState.LOGGED_IN else 0.0,
        )
        yield GaugeMetricFamily(
            "wecast_campaign_file_errors", "Campaign files that failed to load", value=float(self.file_errors())
        )
        yield GaugeMetricFamily(
            "wecast_dispatching_runs", "Runs being dispatched by this process", value=float(self.dispatching())
        )


def instrument_gateway(gateway: Gateway, registry: CollectorRegistry) -> None:
    """Time the gateway calls that matter (sends, contact pages) into a latency histogram, and count
    sends by outcome. The bound methods are wrapped on the instance, because the dispatcher calls the
    gateway directly and the gateway classes are not ours to change."""
    if getattr(gateway, "_wecast_instrumented", False):
        return
    latency = Histogram(
        "wecast_gateway_latency_seconds",
        "Gateway call latency",
        ["operation"],
        registry=registry,
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    )
    sends = Counter("wecast_gateway_sends", "Gateway sends by outcome (this process)", ["outcome"], registry=registry)

    def timed(name: str, method: Callable[..., Awaitable[Any]], count: bool) -> Callable[..., Awaitable[Any]]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            outcome = "sent"
            try:
                return await method(*args, **kwargs)
            except GatewayError as exc:
                outcome = exc.kind
                raise
            except BaseException:
                outcome = "error"
                raise
            finally:
                latency.labels(name).observe(time.perf_counter() - started)
                if count:
                    sends.labels(outcome).inc()

        return call

    setattr(gateway, "send_text", timed("send_text", gateway.send_text, True))  # noqa: B010 - see docstring
    setattr(gateway, "list_contacts", timed("list_contacts", gateway.list_contacts, False))  # noqa: B010
    setattr(gateway, "_wecast_instrumented", True)  # noqa: B010
