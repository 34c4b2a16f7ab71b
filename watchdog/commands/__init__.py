"""The command line and the commands; the service never imports from here."""
