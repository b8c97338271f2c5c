"""What a throughput costs: `cost.per_hour` (the price of the machine, or of one GPU, per hour, in
`cost.currency`) turned into a price per million output tokens and per thousand correct answers.

A machine at P per hour that produces R output tokens per second costs P / 3600 / R per token, so P / 3.6e-3 / R per
million; every throughput figure of the point gets its price, keyed like the figure. A price per GPU is multiplied
by the GPUs the point used (none on a CPU point: the price is then the machine's, and the result says so).
"""

from __future__ import annotations

from typing import Any

from harness.stats import summarize

# figure -> (the price figure it gives, the amount priced: tokens or answers per unit of the figure)
PRICED = {
    "output_tok_s": ("cost_per_mtok", 1e6),  # per million output tokens at the level's (or batch's) throughput
    "decode_tok_s": ("cost_per_mtok_one_stream", 1e6),  # one stream alone on the machine: the dearest case
    "goodput_rps": ("cost_per_1k_good", 1e3),  # per thousand requests that met every SLO
    "correct_goodput_rps": ("cost_per_1k_correct", 1e3),  # per thousand answers that also passed their checks
}


def cost_figures(
    metrics: dict[str, dict[str, Any]], per_hour: float, currency: str, per: str, gpus: int
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The price figures of a point's throughput figures, and how they were priced (for details.cost)."""
    machines = gpus if per == "gpu" and gpus else 1
    hourly = per_hour * machines
    out: dict[str, dict[str, Any]] = {}
    for key, stat in metrics.items():
        name, bracket, case = key.partition("[")
        if name not in PRICED or not stat.get("mean"):
            continue  # a throughput of zero has no price: the figure is absent, never infinite
        priced, amount = PRICED[name]
        out[f"{priced}{bracket}{case}"] = summarize([hourly / 3600 / stat["mean"] * amount], f"{currency}")
    how = {"per_hour": per_hour, "currency": currency, "per": per, "hourly": hourly}
    if per == "gpu":
        how["gpus"] = gpus
        if not gpus:
            how["note"] = "cost.per=gpu on a point that used no GPU: the price was taken as the machine's"
    return out, how
