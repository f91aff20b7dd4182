"""Logging with request ids, HTTP middleware, and Prometheus metrics."""
