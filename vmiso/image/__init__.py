"""Disk images: qcow2 overlays and base inspection, the base store, seed ISOs, the micro guest."""
