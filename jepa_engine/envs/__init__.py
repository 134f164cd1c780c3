"""The built-in 2-D physical world."""
