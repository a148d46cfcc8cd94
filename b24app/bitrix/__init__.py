"""The only code that speaks HTTP to a portal or to the OAuth server."""
