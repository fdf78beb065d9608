"""Renderers: a Plan or a Result in, text out. Nothing here talks to a server."""
