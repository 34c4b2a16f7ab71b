"""`pg-watchdog demo`: a throwaway server, an incident, healed; the throwaway servers."""
