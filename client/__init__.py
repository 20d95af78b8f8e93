"""flora.client: the ``flora-client`` daemon (cli, daemon, connection, sync, state) and its trainer."""
