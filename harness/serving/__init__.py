"""Serving: the streaming HTTP client, load patterns, serving figures and server launches shared by engine=openai
and bench=serve (DESIGN.md "Serving load (HTTP) metrics")."""
