"""The suite's fixtures are plugins (tests/plugins/), as psycopg's are: real PostgreSQL servers and a
real Pulsar broker. Under CI=true a missing real component fails the run instead of skipping
(tests/support/env.py)."""

pytest_plugins = ["tests.plugins.fix_db", "tests.plugins.fix_pulsar"]
