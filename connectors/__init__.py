"""Bank connectors: the `BankConnector` protocol, its error tree, the plugin registry and
one folder per bank protocol. Connectors never touch the database."""
