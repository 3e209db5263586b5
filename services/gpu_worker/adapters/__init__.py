"""Where the worker gets adapters from: the store over gRPC (with a host-memory cache and
single-flight fetches) or local folders."""
