"""accllm: the user-facing face of the toolflow (CLI, YAML configuration, the end-to-end flow)."""

__version__ = "0.1.0"
