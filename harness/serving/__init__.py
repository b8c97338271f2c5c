"""Serving: the streaming HTTP client, load patterns, serving figures and server launches shared by engine=openai
and bench=serve (docs/metrics.md, "A server under load")."""
