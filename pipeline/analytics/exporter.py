"""Prometheus exposition of the collector's totals (prometheus-client).

Counters only, as Prometheus expects (rates are ``rate()`` in PromQL), named after the
conventions (https://prometheus.io/docs/practices/naming/): base unit, ``_total`` suffix,
``xtransit_`` prefix, one label per dimension:

    xtransit_tunnel_packets_total{tunnel, direction}   direction: ingress (to the customer) |
    xtransit_tunnel_bytes_total{tunnel, direction}                egress (from the customer)
    xtransit_tunnel_drops_total{tunnel, reason}        tunnel "" for drops not pinned on one
    xtransit_frames_total{reason}                      every frame the XDP program saw, by the
    xtransit_frame_bytes_total{reason}                 reason it left (node-wide)
    xtransit_packet_samples_total{tunnel, kind}        sampled headers (kind: periodic | drop)

Totals count from the collector's start (a restarted data plane does not make them go down).
"""
from __future__ import annotations

import threading
from collections import Counter
from typing import Self

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector as _PromCollector
from prometheus_client.registry import CollectorRegistry

from .collector import Collector, Tick


class SampleTotals:
    """A collector sink counting sampled headers per tunnel index and kind."""

    def __init__(self, tunnel_names: dict[int, str]) -> None:
        self.names = tunnel_names
        self.counts: Counter = Counter()
        self.lock = threading.Lock()

    def __call__(self, tick: Tick) -> None:
        with self.lock:
            for (_m, index, kind, key), n in tick.samples.items():
                if kind == "samples":
                    name = "" if index == 0 else self.names.get(index, f"index-{index}")
                    self.counts[(name, key)] += n


class Metrics(_PromCollector):
    """A prometheus_client collector reading a :class:`Collector`'s totals at scrape time."""

    def __init__(self, collector: Collector, samples: SampleTotals | None = None) -> None:
        self.collector = collector
        self.samples = samples

    def collect(self):
        snap = self.collector.snapshot()
        pk = CounterMetricFamily("xtransit_tunnel_packets",
                                 "Packets carried by a tunnel (inner packets)",
                                 labels=("tunnel", "direction"))
        by = CounterMetricFamily("xtransit_tunnel_bytes",
                                 "Bytes carried by a tunnel (inner packets, from the IP header)",
                                 labels=("tunnel", "direction"))
        for (tunnel, direction), (p, b) in sorted(snap["traffic"].items()):
            pk.add_metric((tunnel, direction), p)
            by.add_metric((tunnel, direction), b)
        dr = CounterMetricFamily("xtransit_tunnel_drops",
                                 "Packets of a tunnel that were not forwarded, by reason",
                                 labels=("tunnel", "reason"))
        for (tunnel, reason), n in sorted(snap["drops"].items()):
            dr.add_metric((tunnel, reason), n)
        fr = CounterMetricFamily("xtransit_frames",
                                 "Frames the XDP program saw, by the reason they left",
                                 labels=("reason",))
        fb = CounterMetricFamily("xtransit_frame_bytes",
                                 "Frame bytes the XDP program saw, by the reason they left",
                                 labels=("reason",))
        for reason, (p, b) in sorted(snap["reasons"].items()):
            fr.add_metric((reason,), p)
            fb.add_metric((reason,), b)
        out = [pk, by, dr, fr, fb]
        if self.samples is not None:
            sm = CounterMetricFamily("xtransit_packet_samples",
                                     "Packet headers sampled by the XDP program",
                                     labels=("tunnel", "kind"))
            with self.samples.lock:
                for (tunnel, kind), n in sorted(self.samples.counts.items()):
                    sm.add_metric((tunnel, kind), n)
            out.append(sm)
        yield from out


class Exporter:
    """The HTTP endpoint: ``/metrics`` on ``address:port`` (port 0 picks a free one; the bound
    port is in ``.port``). ``close()`` stops the server."""

    def __init__(self, collector: Collector, address: str = "127.0.0.1", port: int = 9469,
                 samples: SampleTotals | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Metrics(collector, samples))
        self.server, self.thread = start_http_server(port, addr=address, registry=self.registry)
        self.port = self.server.server_address[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
