"""Development tooling, never shipped: the demo stack, embedded servers, child processes, fast rules."""
