"""Prometheus metrics: every service process serves its registry on its own port.

Each service defines its metrics in its own package (``services/<name>/metrics.py``) with names
``spotserve_<service>_…`` (``_total`` counters, ``_seconds`` and ``_bytes`` units). The URL a
process serves them on is advertised in its nats.micro metadata (``$SRV.INFO``) under
:data:`METRICS_URL_KEY`, so ``spotserve up`` and tests find every service's metrics, executors
started later included.

Intervals are measured on one process's clock. Where one spans two processes (e.g. the time from
admission's acceptance to the scheduler's first token), it subtracts two wall clocks and its help
text says so.
"""

from __future__ import annotations

import itertools
import socket
import urllib.request
from collections.abc import Iterable
from typing import TypeVar

import structlog
from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from shared.config import MetricsSettings

# $SRV INFO metadata keys: where a service serves its metrics (and the gateway its HTTP API).
METRICS_URL_KEY = "metrics_url"
HTTP_URL_KEY = "http_url"

# Latency buckets (seconds): a request's TTFT and end-to-end time (queueing included), and the
# gap between two tokens (one iteration, or a migration's pause).
REQUEST_LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
TOKEN_GAP_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Work that takes from milliseconds to minutes: an iteration, a plan, a model load.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)


MetricT = TypeVar("MetricT", Counter, Gauge, Histogram)


def with_labels(metric: MetricT, *values: Iterable[str]) -> MetricT:
    """Create every combination of a metric's (small, known) label values now, so that each
    series is exported at 0 from the start instead of appearing at its first event."""
    for combination in itertools.product(*values):
        metric.labels(*combination)
    return metric


def url_host(host: str) -> str:
    """The host part of a URL for a listening address (a wildcard is reached by host name)."""
    return socket.gethostname() if host in ("0.0.0.0", "::", "") else host


def start_metrics_server(settings: MetricsSettings, service: str) -> str | None:
    """Serve this process's default registry on ``settings.host:settings.port`` from a daemon
    thread; returns the URL, or None when metrics are off. A taken port falls back to a free
    one: metrics must never keep a service from serving."""
    if not settings.enabled:
        return None
    log = structlog.get_logger().bind(service=service)
    try:
        server, _thread = start_http_server(settings.port, addr=settings.host)
    except OSError as exc:
        if settings.port == 0:
            log.error("metrics.unavailable", host=settings.host, error=str(exc))
            return None
        log.warning("metrics.port_taken", port=settings.port, error=str(exc))
        server, _thread = start_http_server(0, addr=settings.host)
    url = f"http://{url_host(settings.host)}:{server.server_port}/metrics"
    log.info("metrics.serving", url=url)
    return url


def read_samples(url: str, timeout_s: float = 10.0) -> dict[str, float]:
    """A metrics page's samples, ``name{label="value",...}`` (or ``name`` without labels) ->
    value (blocking: call it from a thread in async code)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples
