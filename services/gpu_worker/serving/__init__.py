"""The worker as a gRPC service: configuration, server start-up, the servicer, output streaming,
heartbeats to the registry and metrics; and the engine's own process (`engine_process` on the
gRPC side, `engine_child` on the engine's, `engine_messages` between them)."""
