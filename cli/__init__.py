"""The `bdn` command line: the only layer (with bench/) that composes more than one app."""
