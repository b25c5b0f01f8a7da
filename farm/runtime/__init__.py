"""The only layer that imports Ray: the driver and the GPU-pinned replica actors."""
