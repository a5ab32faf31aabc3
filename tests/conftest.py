"""The suite's fixtures are plugins (tests/plugins/), as psycopg's are: real PostgreSQL servers and a
real Pulsar broker. Under CI=true a missing real component fails the run instead of skipping
(tests/support/env.py)."""

import os

# Some tests serve gRPC in this process while the dev stack forks children with a preexec_fn (fork, not
# vfork): gRPC's fork handlers then run in the child and can kill it before exec ("epoll_wait error: Bad
# file descriptor", Prometheus never starts). Nothing here uses gRPC across a fork; read at grpc import.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

pytest_plugins = ["tests.plugins.fix_db", "tests.plugins.fix_pulsar"]
