"""Tests of the history package."""
