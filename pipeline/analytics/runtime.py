"""Analytics as the edge runs it: collector, sampler, history and /metrics from one config.

    with Analytics.start(cfg, dataplane=dp, esp_stats=ipsec_dp.stats) as an:
        ...                      # the collector ticks once a second in its thread
        an.collector.snapshot()  # totals and current rates

``dataplane`` is the running :class:`pipeline.xdp.dataplane.Dataplane` (its maps are read
through the program's own fds; when its program was built with -DXT_FEATURE_SAMPLE the ring
buffer is drained too), or None to read the pins of a data plane run by another process
(counters only: a ring buffer is consumed where the program was loaded). ``esp_stats`` is
``IpsecDataPath.stats`` or None.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

from .collector import Collector, EspSource, XdpSource
from .exporter import Exporter, SampleTotals
from .samples import Sampler
from .store import History


@dataclass
class Analytics:
    collector: Collector
    history: History
    sampler: Sampler | None = None
    exporter: Exporter | None = None
    samples: SampleTotals | None = None
    _closed: bool = field(default=False, init=False)

    @classmethod
    def start(cls, cfg, *, dataplane=None, esp_stats: Callable[[], dict[str, Any]] | None = None,
              http: bool = True) -> Self:
        names = {t.index: t.name for t in cfg.tunnels}
        sources: list = []
        sampler = None
        if dataplane is not None:
            prog = dataplane.program
            sources.append(XdpSource(names, fds=prog.map_fds(), generation=id(prog)))
            if "-DXT_FEATURE_SAMPLE" in prog.cflags:
                sampler = Sampler(prog.bpf, cfg.analytics.sample_rate,
                                  cfg.analytics.drop_sample_limit)
        else:
            sources.append(XdpSource.for_config(cfg))
        if esp_stats is not None:
            sources.append(EspSource(esp_stats))
        history = History.for_config(cfg)
        samples = SampleTotals(names)
        collector = Collector(sources, sinks=[history, samples],
                              samplers=[sampler] if sampler else [])
        self = cls(collector, history, sampler, None, samples)
        try:
            if sampler is not None:
                sampler.start()
            collector.start()
            a = cfg.analytics
            if http and a.http_port:
                self.exporter = Exporter(collector, str(a.http_address), a.http_port, samples)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.exporter is not None:
            self.exporter.close()
        self.collector.close()
        if self.sampler is not None:
            self.sampler.close()
        self.history.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
