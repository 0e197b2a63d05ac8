"""User commands that are not DVC stages: ``matting predict`` and ``matting export``."""
