"""Importers of checkpoints from other implementations (torch is optional, imported lazily)."""
