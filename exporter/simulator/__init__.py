"""The Bridge simulator: a gRPC server over a token-bucket engine driven by scenarios on a clock."""
