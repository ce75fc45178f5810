"""Backbones as Hugging Face models. Importing this package registers them with the Auto classes."""
