"""`pg-watchdog init`: look at a server, fit a policy file, write it commented."""
