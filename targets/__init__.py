"""Exporters: they lower a GraphModule to a deployable file, never rewrite it."""
