"""Runtime backends, one per file, all behind the protocol in base.py."""
