"""The gRPC transport: servicer, authentication, access log, request guards."""
