"""Compile, pin, reopen and attach the XDP firewall."""
