"""The test suite; one folder per product of the exporter package, fixtures in plugins/."""
