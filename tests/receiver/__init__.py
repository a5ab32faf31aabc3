"""Tests of the receiver package."""
