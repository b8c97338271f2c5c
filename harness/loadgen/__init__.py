"""The load client: the streaming HTTP client, load patterns, serving figures, server launches and the plan of which
server a point talks to, shared by engine=openai and bench=serve (docs/metrics.md, "A server under load").
Distinct from harness.server, the OpenAI-compatible server the harness itself runs."""
