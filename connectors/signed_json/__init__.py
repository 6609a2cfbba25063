"""The `signed_json` bank protocol: a generic host-to-host JSON API with HMAC-SHA256 or
RSA-SHA256 signatures, configured per funder (`connector.py`, `wire.py`), and a sandbox bank
speaking any such configuration (`sandbox.py`) for tests and demos."""
