"""Packet captures on demand (Capture / ClusterCapture resources)."""
