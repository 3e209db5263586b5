"""The worker as a gRPC service: configuration, server start-up, the servicer, output streaming,
heartbeats to the registry and metrics."""
