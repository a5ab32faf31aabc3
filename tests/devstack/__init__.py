"""Tests of the devstack package."""
