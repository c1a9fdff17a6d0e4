"""The gRPC and REST transports and the API-key access rules they share; the only callers of the core."""
