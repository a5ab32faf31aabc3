"""The Bridge: its gRPC contract (``proto/``) and the client the exporter polls it with."""
