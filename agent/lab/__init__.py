"""Lab and demo code beside the runtime: a node made of network namespaces (netlab.py)
and `fovea demo` (demo.py). The runtime never imports this package."""
