"""What every command's HTTP servers share: the web configuration file (TLS, basic auth), limits."""
