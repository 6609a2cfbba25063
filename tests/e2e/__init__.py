"""End-to-end tests: the gateway and sandbox banks as real processes over loopback."""
