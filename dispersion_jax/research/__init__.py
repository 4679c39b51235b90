"""Research and measurement tools: they use the library and are never used by it."""
