"""Rendering: a Plan, a status or a Result in, text out (text, JSON, Markdown, Mermaid, DOT).

Pure functions; nothing here talks to a server or writes a file.
"""
