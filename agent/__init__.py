"""edge-agent: serves small language models on edge devices and syncs with a fleet."""

__version__ = "0.1.0"
