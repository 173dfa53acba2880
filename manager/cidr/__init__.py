"""cidr_server: the audit-series query language and its on-disk store (pure logic, no bus)."""
