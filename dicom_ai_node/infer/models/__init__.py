"""Built-in models shipped with the package (weights come from installed wheels, never downloaded)."""
