"""Tests of the bridge package."""
