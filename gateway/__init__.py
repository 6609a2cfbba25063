"""The gateway: HTTP API, store, dispatcher, poller, notifier, logging, metrics and CLI."""
