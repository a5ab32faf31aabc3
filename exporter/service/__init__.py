"""The exporter service: poller, derivation, collector, self-metrics and HTTP endpoints, wired by ``app``."""
