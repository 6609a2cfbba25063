"""Statement parsing, matching and break classification (pure core)."""
