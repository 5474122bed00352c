"""Tandem as long-running services: cloud, device fleet, replayer (see docs/services.md).

Each service is a worker object with ``run()``/``stop()`` plus an HTTP app exposing
``/healthz`` and ``/metrics``; they talk only through transport topics and the
candidate HTTP API.
"""
