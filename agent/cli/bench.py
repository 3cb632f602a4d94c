"""`edge-agent bench ALIAS`: measure a model's variants on this device, store the results
for selection, and show them as a table, JSON or a plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import click

from agent.cli.common import Context, emit_json, human_bytes, json_option, registry
from agent.cli.guard import guarded

if TYPE_CHECKING:
    from registry.bench import BenchRow

pass_ctx = click.make_pass_decorator(Context)


@click.command("bench")
@click.argument("alias")
@click.option("--variants", "which", default=None, metavar="all|NAME[,NAME...]",
              help="Variants to measure: 'all' installed ones, or names (default: the one "
                   "selection picks).")
@click.option("--plot", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write a PNG: size vs. speed, marker by quality.")
@json_option
@pass_ctx
@guarded("models:write", resource=lambda kw: f"model:{kw['alias']}")
def bench(ctx: Context, alias: str, which: str | None, plot: Path | None, as_json: bool) -> None:
    """Measure load time, speed, memory and quality of a model's variants here."""
    from tqdm import tqdm

    from agent.runtime.bench import bench_variants
    from agent.runtime.resolver import ModelResolver
    from registry.bench import results

    settings = ctx.settings
    with registry(ctx) as reg:
        resolver = ModelResolver(settings, reg)
        hw = resolver.fingerprint()
        names = {s.name for s in reg.variant_specs(alias)}
        if which is None:
            chosen = {resolver.resolve(alias).variant}
        elif which == "all":
            chosen = names
        else:
            chosen = set(which.split(","))
            if chosen - names:
                raise click.BadParameter(
                    f"{alias} has no variant {', '.join(sorted(chosen - names))}",
                    param_hint="--variants")
        with tqdm(total=len(chosen), desc=f"bench {alias}", unit="variant",
                  disable=as_json or None) as bar:
            begun: list[str] = []

            def started(name: str) -> None:
                if begun:  # the previous variant is done
                    bar.update(1)
                begun.append(name)
                bar.set_postfix_str(name)

            bench_variants(resolver, alias, chosen, on_start=started)
            bar.update(1)
        rows = [r for r in results(reg, alias, hw) if r.variant in chosen]
    if plot is not None:
        write_plot(rows, plot, alias)
    if as_json:
        emit_json({"alias": alias, "fingerprint": hw,
                   "results": [r.model_dump(mode="json") for r in rows]})
        return
    _print_table(rows, hw)
    if plot is not None:
        click.echo(f"plot: {plot}")


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def _print_table(rows: list[BenchRow], hw: str) -> None:
    click.echo(f"hardware {hw}")
    click.echo(f"{'VARIANT':<24} {'SIZE':>9} {'LOAD s':>7} {'PP t/s':>8} {'GEN t/s':>8} "
               f"{'EMB/s':>7} {'PEAK RSS':>9} {'PPL':>8} {'AGREE':>7}")
    for r in rows:
        m = r.measured
        click.echo(
            f"{r.variant:<24} {human_bytes(r.file_size):>9} {m.load_seconds:>7.2f} "
            f"{_fmt(m.prompt_tps, '.1f'):>8} {_fmt(m.generation_tps, '.1f'):>8} "
            f"{_fmt(m.embeddings_per_second, '.1f'):>7} {human_bytes(m.peak_rss):>9} "
            f"{_fmt(m.perplexity, '.3f'):>8} {_fmt(m.agreement, '.4f'):>7}"
        )
    tokens = sorted({int(r.details["perplexity_tokens"]) for r in rows
                     if r.details.get("perplexity_tokens") is not None})
    if tokens:
        click.echo(f"perplexity over {', '.join(str(t) for t in tokens)} tokens of "
                   "the Declaration of Independence (public domain)")


def write_plot(rows: list[BenchRow], path: Path, alias: str) -> None:
    """Size (x) against speed (y); each variant's marker by its quality rank (best first:
    circle, square, triangle, ...), colour by the quality figure, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lm = any(r.measured.perplexity is not None for r in rows)

    def quality(r: BenchRow) -> float:
        m = r.measured
        q = m.perplexity if lm else m.agreement
        return q if q is not None and math.isfinite(q) else math.nan

    ordered = sorted(rows, key=lambda r: quality(r) if lm else -quality(r))
    markers = "os^Dvp*hX"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    qs = [quality(r) for r in ordered]
    finite = [q for q in qs if math.isfinite(q)] or [0.0]
    norm = matplotlib.colors.Normalize(min(finite), max(finite) if max(finite) > min(finite)
                                       else min(finite) + 1)
    cmap = matplotlib.colormaps["viridis_r" if lm else "viridis"]
    for i, r in enumerate(ordered):
        m = r.measured
        speed = m.generation_tps if lm else m.embeddings_per_second
        x = (r.file_size or 0) / 1e6
        y = speed or 0.0
        q = qs[i]
        ax.scatter([x], [y], marker=markers[i % len(markers)], s=120,
                   color=cmap(norm(q)) if math.isfinite(q) else "grey",
                   edgecolors="black", label=f"{r.variant} ({'ppl' if lm else 'agree'} "
                   f"{_fmt(q, '.3f' if lm else '.4f')})")
        ax.annotate(r.quantization, (x, y), textcoords="offset points", xytext=(6, 6))
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("generation tokens/s" if lm else "embeddings/s")
    ax.set_title(f"{alias}: size vs. speed, marker by quality (best: circle)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax,
                 label="perplexity (lower is better)" if lm else "agreement with reference")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
