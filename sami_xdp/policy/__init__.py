"""Firewall policy on the pinned maps: settings, protected prefixes, sessions, ACL
rules, SYN counters and bans, verdict counters. Built on `loader`; knows nothing of
other hosts."""
