"""Fixtures shared by every test folder, loaded as pytest plugins from tests/conftest.py."""
