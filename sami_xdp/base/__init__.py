"""The ground floor: where the sources are, the header's layout and constants, the
error families, address helpers and the one thread fan-out. Imports nothing of
sami_xdp above it."""
