"""Running sami-xdp as a host service: the declarative host config and its
`apply`, the metrics endpoint, systemd's notify protocol. Above migrate, below
cli: an operations feature calls down the same layers as a command does."""
