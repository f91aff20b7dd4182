"""The HTTP API: routers (one per resource), their dependencies, the presenters that turn jobs into JSON, and the
one place that maps the service's errors to HTTP answers."""
