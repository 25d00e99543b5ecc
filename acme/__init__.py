"""The stack's ACME client: Debian's lego in a loop that issues, renews and installs nginx's
certificate (acme/README.md)."""
