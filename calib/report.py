"""The calibration report: one row per dense layer and per expert projection; table, JSON, PNG.

Row fields: ``layer``, ``kind``, ``rank``, ``layout``, ``alpha``, ``refine_steps``, ``tokens``, ``fallbacks``,
``rtn_error`` / ``final_error`` (relative output errors of the decomposition, dynamic activation ranges),
``residual_quant`` (``rtn`` / ``gptq``; experts: ``gptq k/E`` when k of E experts got GPTQ), ``branch_params``
(expert rows: the group's branch parameters; the rank column is each layer's rank, allocated or uniform),
``seconds``, and from the calibration pipeline: ``stats_bytes`` (bytes of the layer's calibration statistics),
``act_range`` (``"static"`` / ``"dynamic"``) and ``input_amax`` (the static range ``max|x/s|``: a float for
a dense layer, one value per local expert for an expert projection; ``None`` where dynamic). An expert
projection's row also has ``experts``: per expert ``{"expert", "tokens", "alpha", "rtn_error",
"final_error"}`` (the expert's own errors; the row's are the activation-weighted totals).

The report as a whole (:meth:`CalibReport.to_dict`, ``report.json``) names the model, the weight and
activation formats, the rank and the expert layouts; ``report.png`` carries them in its title, a bar per
layer (RTN vs SVDQuant) and, for expert groups, a second panel with one marker per expert; legends sit
outside the axes, right of them, so they never cover a bar.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lora.io.atomic import atomic_write_file
from svdq.solvers.shared_basis import AUTO


def short_name(layer: str) -> str:
    """``decoder.layers.3.self_attention.linear_qkv`` → ``L3.attn.qkv`` (for narrow tables and plots)."""
    for long, short in (
        ("decoder.layers.", "L"),
        (".self_attention.", ".attn."),
        (".mlp.experts.", ".experts."),
        ("linear_", ""),
    ):
        layer = layer.replace(long, short)
    return layer


def dense_row(name: str, result) -> dict:
    """Row of a dense layer from an :class:`svdq.SVDQResult`."""
    return {
        "layer": name,
        "kind": "dense",
        "rank": result.rank,
        "layout": "-",
        "alpha": result.alpha,
        "refine_steps": result.refine_steps,
        "tokens": result.n_tokens,
        "fallbacks": "weight-only" if result.weight_only else "",
        "rtn_error": result.rtn_error,
        "final_error": result.final_error,
        "residual_quant": result.residual_quant,
        "seconds": result.seconds,
    }


def summary_row(name: str, summary: dict) -> dict:
    """Row of a plain-torch layer from its ``SVDQLinear.svdq_summary``."""
    return {
        "layer": name,
        "kind": "dense",
        "rank": summary["rank"],
        "layout": "-",
        "alpha": summary["alpha"],
        "refine_steps": len(summary["step_errors"]) - 1,
        "tokens": summary["n_tokens"],
        "fallbacks": "weight-only" if summary["weight_only"] else "",
        "rtn_error": summary["rtn_error"],
        "final_error": summary["final_error"],
        "residual_quant": summary.get("residual_quant", "rtn"),
        "seconds": summary["seconds"],
        "act_range": summary.get("act_range", "dynamic"),
        "input_amax": summary.get("input_amax"),
    }


def act_range_label(amax) -> str:
    """``"static"`` if any range is set (a float or a list with a float), else ``"dynamic"``."""
    values = amax if isinstance(amax, list | tuple) else [amax]
    return "static" if any(v is not None for v in values) else "dynamic"


def _amax_cell(amax) -> str:
    if isinstance(amax, list | tuple):
        values = [v for v in amax if v is not None]
        if not values:
            return "-"
        text = f"{min(values):.3g}-{max(values):.3g}" if len(values) > 1 else f"{values[0]:.3g}"
        return text + ("*" if len(values) < len(amax) else "")  # *: some experts stay dynamic
    return "-" if amax is None else f"{amax:.3g}"


def expert_row(name: str, projection: str, result) -> dict:
    """Row of one expert projection from an :class:`svdq.solvers.expert_group.MoEGroupResult`."""
    alphas = sorted({a for a in result.alphas if a is not None})
    return {
        "layer": f"{name}.linear_{projection}",
        "kind": f"experts {projection}",
        "rank": result.rank,
        "layout": result.layout,
        "alpha": alphas[0] if len(alphas) == 1 else (f"{alphas[0]:.1f}-{alphas[-1]:.1f}" if alphas else None),
        "refine_steps": result.refine_steps,
        "tokens": int(sum(result.n_tokens)),
        "fallbacks": ",".join(f"expert {g}: no tokens" for g in result.fallback_experts),
        "rtn_error": result.rtn_error,
        "final_error": result.final_error,
        "residual_quant": result.summary()["residual_quant"] if result.residual_quants else "rtn",
        "branch_params": result.num_params,
        "seconds": result.seconds,
        "layout_figures": result.layout_figures,
        "experts": [
            {
                "expert": int(e),
                "tokens": int(n),
                "alpha": a,
                "rtn_error": float(rtn),
                "final_error": float(fin),
            }
            for e, n, a, rtn, fin in zip(
                result.expert_indices, result.n_tokens, result.alphas, result.rtn_errors, result.final_errors
            )
        ],
    }


@dataclass
class CalibReport:
    """Rows (dicts, see :func:`dense_row` / :func:`expert_row`), the SVDQ config and timings."""

    rows: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    layout: str | dict = AUTO
    seconds: float = 0.0
    # layer name → SVDQResult / MoEGroupResult (tensors; not written to JSON)
    results: dict = field(default_factory=dict, repr=False)
    mode: str = "all"  # "all" targets in one pass, or "layerwise"
    act_range: str = "dynamic"
    # peak bytes of calibration statistics alive at once (one pass: all targets, or one layer's)
    peak_stats_bytes: int = 0
    model: str = ""  # the model source (e.g. "tiny", "hf:DIR"), for titles

    def residual_quant_line(self) -> str:
        """One line: which residual quantizer the layers got (expert groups: per expert)."""
        layers = experts = n_experts = 0
        for r in self.rows:
            q = str(r.get("residual_quant", "rtn"))
            layers += q != "rtn"
            if r["kind"].startswith("experts") and q.startswith("gptq "):
                k, n = (int(v) for v in q.split()[1].split("/"))
                experts, n_experts = experts + k, n_experts + n
        part = f" (in the expert groups using it: {experts} of {n_experts} experts)" if n_experts else ""
        return (
            f"residual quantization: GPTQ in {layers} of {len(self.rows)} layers{part}, round-to-nearest "
            "elsewhere (GPTQ needs residual_quant 'gptq' / 'auto', ≥ 4 tokens per input channel, lower error)"
        )

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "weight_format": self.config.get("weight_format"),
            "act_format": self.config.get("act_format"),
            "rank": self.config.get("rank"),
            "rows": self.rows,
            "config": self.config,
            "layout": self.layout,
            "seconds": self.seconds,
            "mode": self.mode,
            "act_range": self.act_range,
            "peak_stats_bytes": self.peak_stats_bytes,
        }

    def write_json(self, path) -> Path:
        """Atomic write (temp file + rename)."""
        text = json.dumps(self.to_dict(), indent=2, default=str)
        return atomic_write_file(path, lambda tmp: tmp.write_text(text))

    def table(self):
        """A ``rich`` table of the rows."""
        from rich.table import Table

        t = Table(title=f"svdq calibration ({self.mode}, {self.seconds:.1f} s)")
        fallbacks = any(r["fallbacks"] for r in self.rows)
        t.add_column("layer", no_wrap=True)
        for col in ("rank", "layout", "α", "steps", "tokens", "RTN", "ours", "x/s amax"):
            t.add_column(col, justify="left" if col == "layout" else "right", no_wrap=True)
        if fallbacks:
            t.add_column("fallbacks")
        for r in self.rows:
            cells = [
                short_name(r["layer"]),
                str(r["rank"]),
                r["layout"],
                str(r["alpha"]),
                str(r["refine_steps"]),
                str(r["tokens"]),
                f"{r['rtn_error']:.3f}",
                f"{r['final_error']:.3f}",
                _amax_cell(r.get("input_amax")),
            ]
            t.add_row(*cells, *([r["fallbacks"]] if fallbacks else []))
        return t

    def print(self) -> None:
        from rich.console import Console

        console = Console()
        Console(width=max(console.width, 110)).print(self.table())

    def title(self) -> str:
        """``model — W nvfp4 / A nvfp4, rank 16, layout fc1=shared-down, fc2=auto (all)``."""
        layout = self.layout
        if isinstance(layout, dict):
            layout = ", ".join(f"{k}={v}" for k, v in layout.items())
        cfg = self.config
        return (
            f"{self.model or 'model'} — W {cfg.get('weight_format')} / A {cfg.get('act_format')}, "
            f"rank {cfg.get('rank')}, layout {layout} ({self.mode})"
        )

    def figure(self):
        """The matplotlib figure of :meth:`plot_png` (Agg backend): ``(figure, layer axes, expert axes or
        None)``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups = [r for r in self.rows if r.get("experts")]
        names = [short_name(r["layer"]) for r in self.rows]
        width = max(6.0, 0.5 * len(names)) + 2.0  # + the legend column on the right
        fig, axes = plt.subplots(
            2 if groups else 1,
            1,
            figsize=(width, 7.5 if groups else 4.5),
            squeeze=False,
            layout="constrained",
        )
        ax = axes[0, 0]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [r["rtn_error"] for r in self.rows], width=0.4, label="RTN")
        ax.bar([i + 0.2 for i in x], [r["final_error"] for r in self.rows], width=0.4, label="SVDQuant")
        ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("relative output error")
        ax.set_title("per layer (expert groups: activation-weighted total)", fontsize=9)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        ex = None
        if groups:
            ex = axes[1, 0]
            for i, r in enumerate(groups):
                n = len(r["experts"])
                offs = [(j - (n - 1) / 2) * min(0.6 / max(n, 1), 0.08) for j in range(n)]
                ex.scatter(
                    [i - 0.15 + o for o in offs],
                    [e["rtn_error"] for e in r["experts"]],
                    marker="o",
                    facecolors="none",
                    edgecolors="C0",
                    label="RTN, one per expert" if i == 0 else None,
                )
                ex.scatter(
                    [i + 0.15 + o for o in offs],
                    [e["final_error"] for e in r["experts"]],
                    marker="D",
                    color="C1",
                    label="SVDQuant, one per expert" if i == 0 else None,
                )
            labels = [short_name(r["layer"]) for r in groups]
            ex.set_xticks(range(len(groups)), labels, rotation=60, ha="right")
            ex.tick_params(axis="x", labelsize=7)
            ex.set_xlim(-0.6, len(groups) - 0.4)
            ex.set_ylabel("relative output error")
            ex.set_title("per expert", fontsize=9)
            ex.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        fig.suptitle(self.title(), fontsize=10)
        return fig, ax, ex

    def plot_png(self, path) -> Path | None:
        """:meth:`figure` written to ``path`` atomically (needs matplotlib; returns None without it)."""
        try:
            import matplotlib.pyplot as plt

            fig, _, _ = self.figure()
        except ImportError:
            return None
        path = Path(path)
        try:
            atomic_write_file(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
        finally:
            plt.close(fig)
        return path
