"""`lorareg push`, and the push options `lorareg port --push` shares."""

from __future__ import annotations

from pathlib import Path

import click

from ...hub.push import push as run_push
from .main import emit, main


def push_options(f):
    """The options of a push, for `lorareg push` and `lorareg port --push`."""
    for opt in reversed([
        click.option("--private", is_flag=True, help="Create the repo private (if it does not exist yet)."),
        click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch."),
        click.option("--revision", metavar="BRANCH", help="Branch to push to (created from main if missing)."),
        click.option("--commit-message", help="Commit title (default: 'Upload ported LoRA ...')."),
        click.option("--instance-prompt", help="Trigger words for the card (default: from the LoRA's metadata)."),
        click.option("--base-model-id", metavar="ORG/NAME", help="The Hub id of the target base model, for the card's base_model "
                     "(default: the --target-model's when it is a Hub id; a local folder is named by its weights' SHA-256)."),
        click.option("--owner-permission", metavar="NOTE", help="Publish although the source's creator forbids derivatives: how the "
                     "owner allowed it (written in the card)."),
    ]):
        f = opt(f)
    return f


def push_text(pushed) -> str:
    if pushed.pr_url:
        return f"  pushed {len(pushed.files)} files: opened {pushed.pr_url}"
    if not pushed.changed:
        return f"  nothing to push: {pushed.repo_id}@{pushed.revision} already holds these files ({pushed.commit_oid})"
    return f"  pushed {len(pushed.files)} files to {pushed.repo_id}@{pushed.revision}: {pushed.commit_url}"



@main.command("push")
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("repo_id")
@push_options
@click.option("--license", "license_", help="License id for the card (default: the source LoRA's, when known).")
@click.option("--json", "as_json", is_flag=True)
def push_cmd(path, repo_id, private, create_pr, revision, commit_message, instance_prompt, base_model_id, owner_permission,
             license_, as_json) -> None:
    """Upload a `lorareg port` output (file or PEFT folder) with a model card and report.json, in one commit."""
    pushed = run_push(path, repo_id, private=private, create_pr=create_pr, revision=revision,
                      commit_message=commit_message, instance_prompt=instance_prompt, license=license_,
                      base_model=base_model_id, owner_permission=owner_permission)
    emit(as_json, pushed.model_dump(), push_text(pushed).strip())
