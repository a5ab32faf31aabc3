"""Tests of the web package (web configuration file, HTTP limits)."""
