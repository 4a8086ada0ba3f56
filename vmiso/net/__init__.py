"""Host networking for guests (bridges, taps, filters, addresses)."""
