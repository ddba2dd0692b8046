"""One module per subcommand; each imports heavy libraries inside its function body."""
