"""`edge-agent models ...`: import, list, show, rm, pull and select models."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from agent.cli.common import (
    AgentGroup,
    Context,
    call,
    emit_json,
    human_bytes,
    json_option,
    print_rows,
    registry,
    root_option,
)
from agent.cli.guard import guarded
from agent.terminal import printable
from registry.service import ImportResult, ModelInfo

if TYPE_CHECKING:
    from agent.runtime.resolver import ModelResolver
    from registry.catalog import CatalogModel, FleetLink, Reachability
    from registry.selection import Selection

pass_ctx = click.make_pass_decorator(Context)


@click.group(cls=AgentGroup)
def models() -> None:
    """Manage the models installed on this device."""


@models.command("import")
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@click.option("--alias", help="Name apps use for the model (default: from the file).")
@click.option("--move", is_flag=True, help="Move the file into the store instead of copying.")
@click.option(
    "--task",
    type=click.Choice(["chat", "completion", "embedding"]),
    default=None,
    help="What the model does, when the file does not say.",
)
@json_option
@pass_ctx
@guarded("models:write", resource=lambda kw: f"model:{kw['alias'] or kw['path'].name}")
def import_(
    ctx: Context, path: Path, alias: str | None, move: bool, task: str | None, as_json: bool
) -> None:
    """Import a GGUF or ONNX file, or an ONNX model folder (model.onnx with its weights,
    tokenizer, genai_config.json); the metadata is read from the files themselves."""
    from tqdm import tqdm
    if path.is_dir():
        size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    else:
        size = path.stat().st_size if path.is_file() else 0
    with (
        registry(ctx, create=True) as reg,
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            desc=f"importing {path.name}",
            disable=as_json or None,
            leave=False,
        ) as bar,
    ):
        result = reg.import_file(
            path,
            alias=alias,
            move=move,
            progress=bar.update,
            task=task,  # type: ignore[arg-type]
        )
    _print_result(result, as_json, "imported", "already present:")


@models.command("list")
@click.option("--available", is_flag=True,
              help="List the catalog instead: every model this agent knows by name, its task "
                   "and variants, whether it is installed, and which source could install it "
                   "on this device now.")
@json_option
@pass_ctx
def list_(ctx: Context, available: bool, as_json: bool) -> None:
    """List installed models (with --available: the models that can be installed)."""
    if available:  # a new user's first look: a home that does not exist is just empty
        if not ctx.settings.state.db.is_file():
            _list_available(ctx, [], as_json)
            return
        with registry(ctx) as reg:
            _list_available(ctx, reg.list_models(), as_json)
        return
    with registry(ctx) as reg:
        rows = reg.list_models()

    def line(m: ModelInfo) -> str:
        size = sum(v.file_size or 0 for v in m.variants)
        names = ",".join(v.name for v in m.variants)
        return (f"{m.alias:<24} {m.task:<11} {_params(m.parameter_count):>8} {names:<28} "
                f"{human_bytes(size):>9}")

    print_rows(rows, as_json, rows, line,
               empty="no models installed (try: edge-agent models pull smollm2-135m; "
                     "`edge-agent models list --available` lists what can be installed)",
               header=f"{'ALIAS':<24} {'TASK':<11} {'PARAMS':>8} {'VARIANTS':<28} {'SIZE':>9}")


def fleet_link(ctx: Context) -> FleetLink:
    """This device's fleet link as the agent knows it (enrollment read without creating
    anything; a broker configured), for the registry, which does not read enrollment."""
    from agent.sync import enroll
    from registry.catalog import FleetLink

    e = enroll.status(ctx.settings.home)
    return FleetLink(state=e.state, fleet=e.fleet,
                     device_id=None if e.device_id == "unknown" else e.device_id,
                     broker=ctx.settings.sync.broker_host is not None)


def _variants_text(entry: CatalogModel) -> str:
    """e.g. 'gguf F16 Q8_0 Q4_K_M@cuda | onnx int4': every variant, grouped by format."""
    groups: dict[str, list[str]] = {}
    for v in entry.variants:
        groups.setdefault(v.format, []).append(
            v.quantization + ("" if v.target == "cpu" else f"@{v.target}"))
    return " | ".join(f"{fmt} {' '.join(qs)}" for fmt, qs in groups.items())


def _list_available(ctx: Context, installed: list[ModelInfo], as_json: bool) -> None:
    """The catalog view: per alias its task, its variants, what is installed, and whether a
    source is reachable from this device now; an alias with none says so plainly."""
    from registry.catalog import load_catalog, reachability

    link = fleet_link(ctx)
    have = {m.alias: {v.name for v in m.variants} for m in installed}
    entries = [(m, reachability(m, link)) for m in load_catalog().models]
    if as_json:
        emit_json([_available_json(m, r, have.get(m.alias)) for m, r in entries])
        return
    click.echo(f"{'ALIAS':<24} {'TASK':<11} {'PARAMS':>8}  {'INSTALLED':<10} REACHABLE NOW")
    for m, r in entries:
        mine = have.get(m.alias)
        state = "-" if mine is None else ("yes" if mine >= {v.name for v in m.variants}
                                          else f"{len(mine)} of {len(m.variants)}")
        click.echo(f"{m.alias:<24} {m.task:<11} {_params(m.parameter_count):>8}  "
                   f"{state:<10} {', '.join(r.sources) or 'no source reachable'}")
        click.echo(f"{'':<4}{_variants_text(m)}")
    unreachable = [m.alias for m, r in entries if not r.reachable and m.alias not in have]
    if unreachable:
        click.echo(
            f"\nno source is reachable from this device for {', '.join(unreachable)}. To "
            "install one: import a GGUF or ONNX file of it (`edge-agent models import FILE "
            "--alias ALIAS`), or enroll this device in a fleet (`edge-agent device enroll "
            "--fleet NAME`) and deploy it from the controller; `edge-agent models pull ALIAS` "
            "says what would work for that model."
        )


def _available_json(m: CatalogModel, r: Reachability, mine: set[str] | None) -> dict[str, Any]:
    return {
        "alias": m.alias, "name": m.name, "task": m.task, "default": m.default,
        "parameter_count": m.parameter_count, "context_length": m.context_length,
        "license": m.license, "installed": mine is not None,
        "reachable": r.reachable, "sources": list(r.sources),
        "remedies": [] if r.reachable else r.remedies(),
        "variants": [
            {"name": v.name, "format": v.format, "quantization": v.quantization,
             "target": v.target, "file_size": v.file_size, "sha256": v.sha256,
             "installed": v.name in (mine or set()),
             "package": v.name in r.package_variants, "upstream": v.source.upstream}
            for v in m.variants
        ],
    }


def _params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


@models.command("show")
@click.argument("alias")
@json_option
@pass_ctx
def show(ctx: Context, alias: str, as_json: bool) -> None:
    """Show one model, its variants and its history."""
    with registry(ctx) as reg:
        info = reg.get(alias)
        events = reg.events(alias)
    if as_json:
        data = info.model_dump(mode="json")
        data["events"] = [e.model_dump(mode="json") for e in events]
        emit_json(data)
        return
    _print_model(info)
    click.echo("history (UTC):")
    for e in events:
        click.echo(printable(f"  {e.time:%Y-%m-%d %H:%M} {e.describe()}"))


def _print_model(m: ModelInfo) -> None:
    click.echo(f"{m.alias}: {m.task} model, architecture {m.architecture or '-'}")
    click.echo(f"  parameters {_params(m.parameter_count)}, context {m.context_length or '-'}")
    click.echo(f"  license {m.license or '-'}, source {m.source}")
    for v in m.variants:
        template = "chat template" if v.has_chat_template else "no chat template"
        click.echo(
            f"  variant {v.name}: {v.format} {v.quantization} on {v.target}, "
            f"{human_bytes(v.file_size)}, {template}, sha256 {v.sha256}"
        )


@models.command("rm")
@click.argument("alias")
@click.option("--force", is_flag=True, help="Remove even while a running agent uses it.")
@pass_ctx
@guarded("models:write", resource=lambda kw: f"model:{kw['alias']}")
def rm(ctx: Context, alias: str, force: bool) -> None:
    """Remove a model; its files go when no other model uses them, and a running agent
    stops serving it."""
    loaded = _loaded(ctx)
    with registry(ctx) as reg:
        shared = reg.shared_with(alias)
        mine = reg.blobs(alias)
        removed = reg.remove(alias, force=force, in_use=None if loaded is None
                             else lambda a: loaded.get(a) in mine)
    kept = f"; its file stays: also installed as {', '.join(shared)}" if shared else ""
    click.echo(f"removed {alias} ({len(removed)} file(s) deleted{kept})")
    if loaded is not None:
        _unload_removed(ctx, alias, mine)


def _loaded(ctx: Context) -> dict[str, str] | None:
    """alias -> sha256 of what the running agent has loaded; None when no agent answers
    (the CLI works without one: the registry's leases still tell a loaded file). The
    sha256 tells this home's model from a same-named one of an agent serving another."""
    from agent.errors import ClientError

    try:
        rows = call(ctx, "GET", "/agent/v1/loaded", timeout=10)["models"]
    except ClientError:
        return None
    return {str(r["alias"]): str(r["sha256"]) for r in rows}


def _unload_removed(ctx: Context, alias: str, blobs: set[str]) -> None:
    """Have the running agent drop `alias` now that the registry has forgotten it: a
    loaded model was served after `rm --force` until the agent restarted. Asked after the
    removal (a request may have loaded it meanwhile); the registry no longer resolves the
    alias, so nothing loads it again (404 model_not_found)."""
    from agent.errors import ClientError

    try:
        if (_loaded(ctx) or {}).get(alias) not in blobs:
            return
        done = call(ctx, "POST", f"/agent/v1/models/{alias}/unload", {}, timeout=120)
    except ClientError as exc:
        click.echo(f"edge-agent: warning: the running agent may still serve {alias} until "
                   f"it restarts: unloading it failed ({exc})", err=True)
        return
    if done.get("unloaded"):
        click.echo(f"unloaded {alias} from the running agent")


@models.command("pull")
@click.argument("alias")
@json_option
@pass_ctx
@guarded("models:write", resource=lambda kw: f"model:{kw['alias']}")
def pull(ctx: Context, alias: str, as_json: bool) -> None:
    """Install a catalog model from a source available on this device."""
    from tqdm import tqdm  # CLI-only: the daemon does not import it

    from registry.catalog import load_catalog, reachability
    from registry.errors import NoSourceAvailable

    link = fleet_link(ctx)
    entry = load_catalog().find(alias)
    if entry is not None:  # refused before a home is created for nothing
        reach = reachability(entry, link)
        if not reach.package_variants:
            raise NoSourceAvailable(reach.pull_refusal())

    with registry(ctx, create=True) as reg, tqdm(unit="B", unit_scale=True,
                                                 desc=f"verifying {alias}",
                                                 disable=as_json or None, leave=False) as bar:
        result = reg.pull(alias, progress=bar.update, fleet=link)
    _print_result(result, as_json, "installed", "already installed:")


def _print_result(result: ImportResult, as_json: bool, created: str, present: str) -> None:
    if as_json:
        emit_json(result)
        return
    verb = created if result.created else present
    click.echo(f"{verb} {result.model.alias} ({result.variant}, sha256 {result.sha256[:12]})")
    if result.same_file_as:
        click.echo(f"the same file is installed as {', '.join(result.same_file_as)} "
                   "(stored once)")


@models.command("select")
@click.argument("alias")
@click.option("--explain", is_flag=True, help="List every candidate with its verdict.")
@root_option("Judge against the hardware captured under this directory instead of this device.")
@json_option
@pass_ctx
def select(ctx: Context, alias: str, explain: bool, root: Path | None, as_json: bool) -> None:
    """Choose the best variant of a model for this device, and say why. A catalog model
    that is not installed is judged from the catalog's figures (sizes, quantizations,
    formats), so the answer comes before any download."""
    from agent.runtime.resolver import ModelResolver
    from registry.errors import ModelNotFound

    reach: Reachability | None = None
    with registry(ctx) as reg:
        resolver = ModelResolver(ctx.settings, reg, root)
        try:
            sel = resolver.selection(alias)
        except ModelNotFound:
            sel, reach = _catalog_selection(ctx, resolver, alias)
    if as_json:
        emit_json(sel)
        return
    chosen = sel.chosen
    if reach is None:
        click.echo(f"{alias}: {chosen.name} ({chosen.quantization} on {chosen.target})")
    else:
        file = f"a {human_bytes(chosen.file_size)} file, " if chosen.file_size else ""
        click.echo(f"{alias} is not installed; from the catalog, this device would run "
                   f"{chosen.name} ({chosen.quantization} on {chosen.target}): {file}about "
                   f"{human_bytes(sel.estimated_memory)} in memory of a "
                   f"{human_bytes(sel.budget)} budget")
        click.echo(f"  source: {', '.join(reach.sources)} (`edge-agent models pull {alias}`)"
                   if reach.package_variants else
                   f"  source: {', '.join(reach.sources) or 'none reachable from this device'}"
                   f" (`edge-agent models pull {alias}` says what would make one reachable)")
    if explain:
        for c in sel.candidates:
            click.echo(f"  {c.variant.name:<32} {c.label:<10} {'; '.join(c.reasons)}")


def _catalog_selection(
    ctx: Context, resolver: ModelResolver, alias: str
) -> tuple[Selection, Reachability]:
    """What selection would choose among the catalog's variants of a model that is not
    installed: the same engine, profile and policy as for an installed one."""
    from registry.catalog import load_catalog, reachability
    from registry.errors import ModelNotFound
    from registry.selection import select as choose

    entry = load_catalog().find(alias)
    if entry is None:
        raise ModelNotFound(f"no model named {alias!r} is installed or in the catalog "
                            "(`edge-agent models list --available` lists the catalog)")
    specs = resolver.measured(alias, list(entry.specs()))
    sel = choose(specs, resolver.profile(), resolver.policy_for(entry.task), model_alias=alias)
    return sel, reachability(entry, fleet_link(ctx))


@models.command("load")
@click.argument("alias")
@click.option("--keep-alive", default=None, help="Seconds or '5m'; negative: forever.")
@pass_ctx
def load(ctx: Context, alias: str, keep_alive: str | None) -> None:
    """Load a model in the running agent now."""
    body = {"keep_alive": keep_alive} if keep_alive is not None else {}
    m = call(ctx, "POST", f"/agent/v1/models/{alias}/load", body)
    click.echo(f"loaded {m['alias']} ({m['variant']}, {human_bytes(m['memory_bytes'])})")


@models.command("unload")
@click.argument("alias")
@pass_ctx
def unload(ctx: Context, alias: str) -> None:
    """Unload a model from the running agent."""
    r = call(ctx, "POST", f"/agent/v1/models/{alias}/unload", {})
    click.echo(f"unloaded {alias}" if r["unloaded"] else f"{alias} was not loaded")


@models.command("quantize")
@click.argument("alias")
@click.option("--to", "to", required=True,
              help="Target: a GGUF type (Q4_0, Q5_1, Q8_0, Q4_K_M, ...) or int8 (ONNX).")
@click.option("--from", "source", default=None,
              help="Variant to start from (default: the highest-precision one of that format).")
@json_option
@pass_ctx
@guarded("models:write", resource=lambda kw: f"model:{kw['alias']}")
def quantize(ctx: Context, alias: str, to: str, source: str | None, as_json: bool) -> None:
    """Make a new variant of a model on this device, and show every variant's size."""
    import tempfile

    from tqdm import tqdm

    from agent.errors import QuantizeError
    from agent.runtime import quantize as q
    from agent.runtime.llama import default_threads
    from registry.types import BITS_PER_WEIGHT, quality_rank

    fmt = q.target_format(to)
    with registry(ctx) as reg:
        info = reg.get(alias)
        target = to.upper() if fmt == "gguf" else to.lower()
        if any(v.format == fmt and v.quantization == target for v in info.variants):
            raise QuantizeError(f"{alias} already has a {fmt} {target} variant")
        pool = [v for v in info.variants if v.format == fmt and v.sha256]
        if source is not None:
            pool = [v for v in pool if v.name == source]
        if not pool:
            raise QuantizeError(f"{alias} has no installed {fmt} variant"
                                + (f" named {source}" if source else "") + " to start from")
        src = max(pool, key=lambda v: (quality_rank(v.quantization), v.file_size or 0))
        task: Any = info.task
        path = reg.materialize(alias, src.name)
        with tempfile.TemporaryDirectory(dir=reg.store.tmp_dir, prefix="quantize-") as work:
            if fmt == "gguf":
                params = info.parameter_count or 0
                expected = int(params * BITS_PER_WEIGHT.get(target, 8.0) / 8) or (
                    src.file_size or 1)
                out = Path(work) / f"{alias}-{target}.gguf"
                with tqdm(total=expected, unit="B", unit_scale=True, leave=False,
                          desc=f"{src.quantization} -> {target}", disable=as_json or None) as bar:
                    q.quantize_gguf(path, out, target, threads=ctx.settings.runtime.threads
                                    or default_threads(), expected_size=expected,
                                    progress=bar.update)
                result = reg.import_file(out, alias=alias, move=True, task=task)
            else:
                side = [path.with_name(n) for n in src.files if not n.endswith(".data")]
                with tqdm(total=1, leave=False, desc=f"{src.quantization} -> int8",
                          disable=as_json or None) as bar:
                    out = q.quantize_onnx_int8(path, Path(work) / "model", side)
                    bar.update(1)
                result = reg.import_file(out.parent if side else out, alias=alias, move=True,
                                         task=task)
        reg.record_event(alias, "quantized", variant=result.variant, source=src.name)
        report = size_report(reg.get(alias))
    if as_json:
        emit_json({"variant": result.variant, "source": src.name, "sha256": result.sha256,
                   "sizes": report})
        return
    click.echo(f"created {alias} {result.variant} from {src.name} (sha256 {result.sha256[:12]})")
    _print_sizes(report)


def size_report(info: ModelInfo) -> list[dict[str, object]]:
    """Each variant's bytes on disk and its reduction against the largest, largest first."""
    sized = sorted((v for v in info.variants if v.file_size), key=lambda v: -(v.file_size or 0))
    largest = sized[0].file_size if sized else 0
    return [
        {"variant": v.name, "format": v.format, "quantization": v.quantization,
         "bytes": v.file_size, "bits_per_weight": v.bits_per_weight,
         "reduction_pct": round(100 * (1 - (v.file_size or 0) / largest), 1) if largest else 0.0}
        for v in sized
    ]


def _print_sizes(report: list[dict[str, object]]) -> None:
    click.echo(f"{'VARIANT':<28} {'QUANT':<8} {'SIZE':>10} {'BPW':>6} {'VS LARGEST':>11}")
    for r in report:
        bpw = r["bits_per_weight"]
        cut = "largest" if r["reduction_pct"] == 0 else f"-{r['reduction_pct']}%"
        click.echo(f"{r['variant']!s:<28} {r['quantization']!s:<8} "
                   f"{human_bytes(r['bytes'])!s:>10} "  # type: ignore[arg-type]
                   f"{bpw if bpw is not None else '-'!s:>6} {cut:>11}")
