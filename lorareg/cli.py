"""The `lorareg` command: parse arguments, call the API, print text or --json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import click

from . import __version__, api
from .errors import InputError, LoraregError
from .registry import get_registry


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """Every lorareg error becomes one line on stderr and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LoraregError as e:
            _fail(str(e).splitlines()[0] if str(e) else e.__class__.__name__, e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except MemoryError:
            _fail("out of memory", 1)
        except OSError as e:
            _fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "), 1)
        except Exception as e:  # noqa: BLE001 - a bug must still not print a traceback at users
            if os.environ.get("LORAREG_DEBUG"):
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            _fail(f"unexpected {e.__class__.__name__}: {first} (set LORAREG_DEBUG=1 for a traceback; please report it)", 70)


def _emit(as_json: bool, payload, text: str) -> None:
    if as_json:
        click.echo(json.dumps(payload, indent=2, sort_keys=False, default=str))
    else:
        click.echo(text)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lorareg")
def main() -> None:
    """Detect, convert and port LoRA adapters between key formats and base models."""


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--format", "format_", help="Read as this format instead of detecting it.")
@click.option("--family", help="Read against this family instead of detecting it.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path: Path, format_: Optional[str], family: Optional[str], as_json: bool) -> None:
    """Show a LoRA's format, family, adapter type, ranks and alphas."""
    info = api.inspect(path, format=format_, family=family)
    lines = [
        f"{info.path}",
        f"  format      {info.format} ({info.variant})",
        f"  family      {info.family}  confidence {info.confidence:.2f}"
        + (f"  (also fits: {', '.join(f for f in info.fitting_families if f != info.family)})" if len(info.fitting_families) > 1 else ""),
        f"  type        {info.adapter_type}",
        f"  components  {', '.join(info.components)}",
        f"  modules     {info.num_modules} ({info.num_tensors} tensors, {', '.join(info.dtypes)})",
        f"  ranks       {_counts(info.ranks)}",
        f"  alphas      {_counts(info.alphas)}",
    ]
    if info.unmapped_keys:
        lines.append(f"  unmapped    {len(info.unmapped_keys)} tensors:")
        lines += [f"    {k}: {v}" for k, v in list(info.unmapped_keys.items())[:10]]
        if len(info.unmapped_keys) > 10:
            lines.append(f"    ... and {len(info.unmapped_keys) - 10} more (see --json)")
    if info.nonfinite:
        lines.append(f"  WARNING     {len(info.nonfinite)} tensors hold NaN/Inf: " + ", ".join(n["name"] for n in info.nonfinite[:5]))
    lines.append("  evidence")
    lines += [f"    - {e}" for e in info.evidence]
    if info.metadata:
        lines.append(f"  metadata    {len(info.metadata)} entries: " + ", ".join(sorted(info.metadata)[:12]))
    _emit(as_json, info.model_dump(), "\n".join(lines))


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--to", "to", required=True, help="Target format id (see `lorareg formats`).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output file (or folder for peft).")
@click.option("--variant", help="Variant of the target format (default: the format's first writable one).")
@click.option("--family", help="Family of the input, if detection is ambiguous.")
@click.option("--rank", type=click.IntRange(min=1), help="Refactor LoHa/LoKr/full modules to plain LoRA of this rank.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--allow-unmapped", is_flag=True, help="Convert even if some tensors map to no module (they are listed as dropped).")
@click.option("--allow-nonfinite", is_flag=True, help="Convert even if factors hold NaN/Inf.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def convert(path, to, output, variant, family, rank, force, allow_unmapped, allow_nonfinite, as_json) -> None:
    """Convert a LoRA to another key format (exact for plain LoRA)."""
    report = api.convert(
        path, output, to=to, variant=variant, family=family, rank=rank, force=force,
        allow_unmapped=allow_unmapped, allow_nonfinite=allow_nonfinite,
    )
    lines = [
        f"{path} ({report.source_format}) -> {output} ({report.target_format}), family {report.family}",
        f"  modules {report.modules_in} -> {report.modules_out}, tensors {report.tensors_in} -> {report.tensors_out}",
    ]
    for r in report.refactored:
        lines.append(f"  refactored {r.module}: {r.from_type} -> {r.to_type} rank {r.rank}, relative error {r.relative_error:.3g}")
    for d in report.dropped:
        lines.append(f"  dropped {d.item}: {d.reason}")
    _emit(as_json, report.model_dump(), "\n".join(lines))


@main.command()
@click.option("--json", "as_json", is_flag=True)
def families(as_json: bool) -> None:
    """List the model families the registry knows."""
    reg = get_registry()
    rows = []
    for fam in sorted(reg.families.values(), key=lambda f: f.id):
        rows.append(
            {
                "id": fam.id,
                "name": fam.spec.name,
                "kind": fam.spec.kind,
                "components": {cid: len(c.modules) for cid, c in fam.components.items()},
                "default_repo": fam.spec.hub.default_repo,
                "aliases": fam.spec.aliases.model_dump(),
            }
        )
    text = "\n".join(
        f"{r['id']:<14} {r['name']:<36} " + ", ".join(f"{c}:{n}" for c, n in r["components"].items()) for r in rows
    )
    _emit(as_json, rows, text)


@main.command()
@click.option("--json", "as_json", is_flag=True)
def formats(as_json: bool) -> None:
    """List the LoRA key formats the registry reads and writes."""
    reg = get_registry()
    rows = []
    for fmt in sorted(reg.formats.values(), key=lambda f: f.id):
        rows.append(
            {
                "id": fmt.id,
                "title": fmt.spec.title,
                "container": fmt.spec.container,
                "writable": fmt.spec.writable,
                "variants": [v.id + (" (read only)" if v.spec.read_only else "") for v in fmt.variants],
            }
        )
    text = "\n".join(
        f"{r['id']:<14} {'read/write' if r['writable'] else 'read only':<10} {r['title']}  [{', '.join(r['variants'])}]"
        for r in rows
    )
    _emit(as_json, rows, text)


def _push_options(f):
    for opt in reversed([
        click.option("--private", is_flag=True, help="Create the repo private (if it does not exist yet)."),
        click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch."),
        click.option("--revision", metavar="BRANCH", help="Branch to push to (created from main if missing)."),
        click.option("--commit-message", help="Commit title (default: 'Upload ported LoRA ...')."),
        click.option("--instance-prompt", help="Trigger words for the card (default: from the LoRA's metadata)."),
    ]):
        f = opt(f)
    return f


@main.command()
@click.argument("lora", type=click.Path(path_type=Path))
@click.option("--source-model", help="Base model the LoRA was trained on: a diffusers/transformers folder, a .safetensors checkpoint, or a Hub id org/name[@rev].")
@click.option("--target-model", help="Base model to port to (same kinds of reference).")
@click.option("--to", "to", help="Target family, if it differs from the LoRA's (see `lorareg pairs`).")
@click.option("--method", default="auto", show_default=True, help="auto (copy where shapes match, align where they differ), copy, lora-x, prolora, prolora-full, align. "
              "On bench/fidelity copy/auto recovers 76-91% of a retrained LoRA's gain, prolora-full within 1 point, "
              "lora-x/prolora/align 9-66%; see docs/methods.md.")
@click.option("--rank-k", type=click.IntRange(min=1), help="Size k of the singular subspaces (default: min(320, min(m, n) / 4) per layer).")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="Skip layers whose subspace similarity is below this (0.5 separates unrelated models: bench/fidelity "
              "measured < 0.3 for an unrelated model, >= 0.79 for related checkpoints and distillations).")
@click.option("--rank", type=click.IntRange(min=1), help="Output rank (default: the source's).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--dtype", help="Output dtype (default: the input's): fp16, bf16, fp32.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output file (or folder for peft).")
@click.option("--format", "format_", help="Output key format (default: the input's).")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--no-align", is_flag=True, help="Do not re-pair distilled blocks by similarity; pair block i with block i.")
@click.option("--refine", type=click.Choice(["distill"]), help="After projecting, refine the LoRA on the target: distill = data-free self-distillation from source model + LoRA (language models and diffusion UNets; needs both models).")
@click.option("--steps", "refine_steps", type=click.IntRange(min=0), default=100, show_default=True, help="--refine: optimizer steps.")
@click.option("--samples", "refine_samples", type=click.IntRange(min=1), default=64, show_default=True, help="--refine: sequences (LM) or latents (UNet) generated by the source model + LoRA.")
@click.option("--sample-length", "refine_sample_length", type=click.IntRange(min=2), default=128, show_default=True, help="--refine, LM: tokens per sample.")
@click.option("--prompts", "refine_prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="--refine, UNet: prompts, one per line (default: the LoRA's trigger phrase and ss_tag_frequency tags, else the empty prompt).")
@click.option("--latent-size", "refine_latent_size", type=click.IntRange(min=4), help="--refine, UNet: side of the teacher's latents (default: the UNet's sample_size, e.g. 128 for SDXL).")
@click.option("--sampler-steps", "refine_sampler_steps", type=click.IntRange(min=1), default=8, show_default=True, help="--refine, UNet: DDIM steps the teacher takes to make each latent.")
@click.option("--noisings", "refine_noisings", type=click.IntRange(min=1), default=4, show_default=True, help="--refine, UNet: random timesteps each latent is noised at.")
@click.option("--guidance", "refine_guidance", type=click.FloatRange(min=0), default=5.0, show_default=True, help="--refine, UNet: classifier-free guidance of the teacher's sampler (text-conditioned UNets).")
@click.option("--batch", "refine_batch", type=click.IntRange(min=1), help="--refine: batch size (default 16 for LMs, 4 for UNets).")
@click.option("--lr", "refine_lr", type=click.FloatRange(min=0, min_open=True), help="--refine: learning rate (default 2e-3 for LMs, 1e-3 for UNets).")
@click.option("--seed", "refine_seed", type=int, default=0, show_default=True, help="--refine: seed of the samples and the batch order.")
@click.option("--budget-seconds", "refine_budget_seconds", type=click.FloatRange(min=0), help="--refine: stop training after this many seconds (sampling included).")
@click.option("--force-unrelated", is_flag=True, help="--refine even if the base models look unrelated (it would then retrain the LoRA on synthetic data, not port it).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--push", "push_to", metavar="REPO", help="Upload the result (weights, README.md, report.json) to this Hub repo in one commit.")
@_push_options
def port(lora, source_model, target_model, to, method, rank_k, threshold, rank, device, dtype, output, format_, force, no_align,
         refine, refine_steps, refine_samples, refine_sample_length, refine_prompts, refine_latent_size, refine_sampler_steps, refine_noisings,
         refine_guidance, refine_batch, refine_lr, refine_seed, refine_budget_seconds, force_unrelated, as_json,
         push_to, private, create_pr, revision, commit_message, instance_prompt) -> None:
    """Port a LoRA to another base model, training-free; writes the LoRA and a report.json."""
    from .port import port as run_port
    from .refine.conditioning import read_prompts

    if not push_to and (private or create_pr or revision or commit_message or instance_prompt):
        raise InputError("--private, --create-pr, --revision, --commit-message and --instance-prompt need --push")
    result = run_port(
        lora, source_model=source_model, target_model=target_model, to=to, method=method,
        rank_k=rank_k, threshold=threshold, rank=rank, device=device, dtype=dtype, output=output,
        format=format_, force=force, align_blocks=not no_align, progress=not as_json,
        refine=refine, refine_steps=refine_steps, refine_samples=refine_samples, refine_sample_length=refine_sample_length,
        refine_lr=refine_lr, refine_seed=refine_seed, refine_budget_seconds=refine_budget_seconds, force_unrelated=force_unrelated,
        refine_prompts=read_prompts(refine_prompts) if refine_prompts else None, refine_latent_size=refine_latent_size,
        refine_sampler_steps=refine_sampler_steps, refine_noisings=refine_noisings, refine_guidance=refine_guidance, refine_batch=refine_batch,
    )
    text = result.summary + f"\n  report {result.report_path}"
    if not push_to:
        _emit(as_json, result.report.model_dump(), text)
        return
    from .hub import push as run_push

    pushed = run_push(result, push_to, private=private, create_pr=create_pr, revision=revision,
                      commit_message=commit_message, instance_prompt=instance_prompt, command=_command_line())
    _emit(as_json, {**result.report.model_dump(), "push": pushed.model_dump()}, text + "\n" + _push_text(pushed))


def _command_line() -> str:
    """This command with the options given (in canonical order), local paths cut to their names."""
    import shlex

    ctx = click.get_current_context()
    args = [ctx.command_path.split()[-1] if ctx.command_path else "port"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value is False or (not isinstance(param, click.Argument) and value == param.default):
            continue
        shown = _public_arg(value)
        if isinstance(param, click.Argument):
            args.append(shown)
        elif getattr(param, "is_flag", False):
            args.append(param.opts[-1])
        else:
            args += [param.opts[-1], shown]
    return shlex.join(["lorareg", *args])


def _public_arg(value) -> str:
    text = str(value)
    if text.startswith("hf:"):
        return text if text.startswith("hf://") else "hf://" + text[4:]
    if isinstance(value, Path) or text.startswith(("/", "~", "./", "../")):
        return Path(text).name if (Path(text).is_absolute() or text.startswith(("~", "./", "../")) or Path(text).exists()) else text
    return text


def _push_text(pushed) -> str:
    if pushed.pr_url:
        return f"  pushed {len(pushed.files)} files: opened {pushed.pr_url}"
    if not pushed.changed:
        return f"  nothing to push: {pushed.repo_id}@{pushed.revision} already holds these files ({pushed.commit_oid})"
    return f"  pushed {len(pushed.files)} files to {pushed.repo_id}@{pushed.revision}: {pushed.commit_url}"


@main.command("push")
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("repo_id")
@_push_options
@click.option("--license", "license_", help="License id for the card (default: the source LoRA's, when known).")
@click.option("--json", "as_json", is_flag=True)
def push_cmd(path, repo_id, private, create_pr, revision, commit_message, instance_prompt, license_, as_json) -> None:
    """Upload a `lorareg port` output (file or PEFT folder) with a model card and report.json, in one commit."""
    from .hub import push as run_push

    pushed = run_push(path, repo_id, private=private, create_pr=create_pr, revision=revision,
                      commit_message=commit_message, instance_prompt=instance_prompt, license=license_)
    _emit(as_json, pushed.model_dump(), _push_text(pushed).strip())


@main.group()
def basis() -> None:
    """Manage the cache of base-model singular bases."""


@basis.command("build")
@click.argument("model")
@click.option("--family", required=True, help="Family of the model (see `lorareg families`).")
@click.option("--component", "components", multiple=True, help="Only these components (repeatable).")
@click.option("--match", help="Only modules whose name contains this text (e.g. attn).")
@click.option("--rank-k", type=click.IntRange(min=1), help="Subspace size k (default: per-layer default).")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def basis_build(model, family, components, match, rank_k, device, as_json) -> None:
    """Compute and cache the top-k bases of a model's 2-D weights ahead of any port."""
    from .bases_cli import build_bases

    stats = build_bases(model, family, list(components) or None, match, rank_k, device, progress=not as_json)
    _emit(as_json, stats, f"{stats['modules']} modules: {stats['cached']} already cached, {stats['built']} built in {stats['seconds']:.1f} s -> {stats['cache']}")


@main.command()
@click.argument("source")
@click.argument("target")
@click.option("--component", help="Only this source component.")
@click.option("--all", "show_all", is_flag=True, help="Every module, not only attention and MLP projections.")
@click.option("--json", "as_json", is_flag=True)
def pairs(source: str, target: str, component: Optional[str], show_all: bool, as_json: bool) -> None:
    """Show which target module each source module maps to, with shapes and the rule used."""
    from .resolve import resolve_pairs

    reg = get_registry()
    src = reg.family(source)
    modules = [
        (cid, name)
        for cid, comp in src.components.items()
        if component in (None, cid)
        for name, shape in comp.modules.items()
        if show_all or len(shape) == 2
    ]
    result = resolve_pairs(src, reg.family(target), modules)
    paired = [p for p in result if not p.skipped]
    lines = [f"{src.id} -> {target}: {len(paired)} of {len(result)} modules paired"]
    for p in result:
        dst = f"{p.target_component}:{p.target_module} {p.target_shape}" if not p.skipped else f"SKIP ({p.skipped})"
        lines.append(f"  {p.source_component}:{p.source_module} {p.source_shape} -> {dst}  [{p.rule}]")
    _emit(as_json, [p.model_dump() for p in result], "\n".join(lines))


@main.command()
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), help="Folder for the demo's outputs (default: a temp folder).")
@click.option("--no-port", is_flag=True, help="Only the convert round trip (skip porting the embedded LM example).")
@click.option("--json", "as_json", is_flag=True)
def demo(out_dir: Optional[Path], no_port: bool, as_json: bool) -> None:
    """Offline demo on the embedded examples: port an LM LoRA v1 -> v2 and measure it; convert kohya -> diffusers -> kohya."""
    from .demo import port_summary, run_demo

    res = run_demo(out_dir, port=not no_port)
    lines = port_summary(res.port) if res.port else ([f"port      skipped: {res.port_skipped}"] if res.port_skipped else [])
    lines += [
        f"example   {res.example}",
        f"detected  {res.detected_format}, family {res.detected_family}, {res.modules} modules",
        *[f"step      {s.action}: {s.tensors} tensors -> {s.output}" for s in res.steps],
        f"result    round trip bit-exact: {'yes' if res.round_trip_bit_exact else 'NO'}; max |ΔW difference| {res.max_delta_error:.3g}",
    ]
    _emit(as_json, res.model_dump(), "\n".join(lines))
    if not res.round_trip_bit_exact:
        sys.exit(1)


@main.command("eval")
@click.argument("lora", required=False, type=click.Path(path_type=Path))
@click.option("--target-model", required=True, help="The model to evaluate on: a local transformers causal-LM folder.")
@click.option("--data", required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False), help="Held-out text file (UTF-8).")
@click.option("--base-only", is_flag=True, help="Only the loss of the model without an adapter.")
@click.option("--reference", "reference_lora", type=click.Path(path_type=Path), help="A reference LoRA on the target (e.g. one retrained there): adds the gain recovered.")
@click.option("--source-model", help="The LoRA's original base model (with --source-lora): adds the gain retained vs the source.")
@click.option("--source-lora", type=click.Path(path_type=Path), help="The original LoRA, on --source-model.")
@click.option("--tokenizer", default="auto", show_default=True, help="auto (the model folder's tokenizer; raw bytes for 256-token vocabularies), bytes, or a tokenizer folder.")
@click.option("--seq-len", type=click.IntRange(min=2), default=128, show_default=True, help="Window length in tokens.")
@click.option("--max-windows", type=click.IntRange(min=1), help="Evaluate at most this many windows.")
@click.option("--family", help="Family of the LoRA(s), if detection is ambiguous.")
@click.option("--json", "as_json", is_flag=True)
def eval_(lora, target_model, data, base_only, reference_lora, source_model, source_lora, tokenizer, seq_len, max_windows, family, as_json) -> None:
    """Held-out loss of a causal LM with and without a LoRA (nats/token), and the gain a port recovers.

    gain recovered = (loss_none - loss_lora) / (loss_none - loss_reference).
    """
    from .errors import InputError
    from .evaluate import evaluate, summarize

    if lora is None and not base_only:
        raise InputError("give a LORA, or --base-only")
    if base_only and lora is not None:
        raise InputError("--base-only takes no LORA")
    res = evaluate(lora, target_model=target_model, data=data, reference_lora=reference_lora, source_model=source_model,
                   source_lora=source_lora, tokenizer=tokenizer, seq_len=seq_len, max_windows=max_windows, family=family)
    _emit(as_json, res.model_dump(), summarize(res))


from .batch.cli import batch_cmd, scan_cmd  # noqa: E402

main.add_command(scan_cmd)
main.add_command(batch_cmd)


if __name__ == "__main__":  # pragma: no cover
    main()
