"""Network analytics: per-tunnel rates over time, drops by reason, sampled packet headers.

    collector.py  counters of the data path (XDP per-CPU maps, native ESP per-SA counters) read
                  once a second, summed with numpy, turned into rates; counter resets handled
    samples.py    packet samples from bpf/sample.h's ring buffer (drained in batches by the
                  native pipeline._ring), per-minute top talkers/ports
    sample_batch.py  a drained batch parsed and counted with numpy (no per-sample Python)
    store.py      rolling SQLite history (1-second and 1-minute points), bounded in size
    exporter.py   Prometheus exposition over HTTP
    plot.py       PNG of a tunnel's history (matplotlib)
"""
