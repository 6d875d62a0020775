"""Database layer: connections, the embedded server, migrations and every runtime query."""
