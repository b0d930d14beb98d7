"""The kernel side: compile the XDP program with bcc, pin and reopen its maps, the
bpf(2) calls, batch map I/O, attach and detach. Built on `base` only."""
