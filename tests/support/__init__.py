"""Helpers the tests import: paths and tools, certificates, a TCP proxy, receiver and stack helpers."""
