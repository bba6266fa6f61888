"""Tokenizer, data sources and token datasets."""
