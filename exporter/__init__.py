"""dict-rate-limit-exporter: monitoring of DICT (Pix) rate-limit token buckets."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dict-rate-limit-exporter")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
