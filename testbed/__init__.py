"""What tests/ and bench/ share: crafted frames (`packets`) and network-namespace
labs that always clean up (`netns`). Not part of the firewall; depends on nothing
of sami_xdp."""
