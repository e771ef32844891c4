"""The command-line clients, every client command in one place: `fovea` (fovea.py) and
`kubectl-fovea` (kubectl.py). The runtime never imports this package."""
