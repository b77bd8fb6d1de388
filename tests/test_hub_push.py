"""`lorareg port --push` / `lorareg push` / `lorareg.push` against the loopback Hub (tests/hub_server.py)
with the real huggingface_hub client."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import lorareg
from lorareg.apps.cli.main import main
from lorareg.core.io import read_header
from hub_server import HubServer
from lora_factory import make_lora, write

PROGRESS = re.compile(r"%\||\d+it \[|\[\d+:\d+")  # tqdm lines (huggingface_hub's transfer bars, lorareg's)
ATTN = r"attn[12]\.to_(q|k|v|out\.0)$"
REPO = "lorareg-tester/ported"
AUTH_LINE = "error: authentication failed (check HF_TOKEN / huggingface-cli login)\n"

# huggingface_hub 2.4.0's LFS PUT passes bytes as `data=`, which httpx2 deprecates: lorareg.push filters
# that warning itself, so these tests turn it into an error to check it stays quiet
pytestmark = [pytest.mark.filterwarnings("error:Use 'content=<...>' to upload raw bytes/text content.:DeprecationWarning"), pytest.mark.usefixtures("tiny_families")]




def source_lora(tmp_path: Path, rank: int = 4, name: str = "dog.safetensors", **extra_meta) -> Path:
    lora = make_lora("tiny-sdxl", ATTN, rank=rank, alpha=4.0, dtype=torch.float32)
    lora.metadata.update({
        "ss_tag_frequency": json.dumps({"10_sks dog": {"sks dog": 12, "grass": 3, "sky": 1}}),
        "modelspec.license": "openrail++",
        **extra_meta,
    })
    return write(lora, tmp_path / name, "kohya")


def ported(tmp_path: Path, sub: str = "out", src: Path | None = None, **kw) -> lorareg.PortResult:
    src = src or source_lora(tmp_path)
    return lorareg.port(src, method="copy", output=tmp_path / sub / "ported.safetensors", progress=False, **kw)


def push(hub: HubServer, what, repo: str = REPO, **kw) -> lorareg.PushResult:
    return lorareg.push(what, repo, token=hub.token, endpoint=hub.endpoint, **kw)


def error_line(res) -> str:
    """The one error line of a failed CLI run (progress bars aside)."""
    lines = [ln for ln in res.stderr.replace("\r", "\n").splitlines() if ln.strip() and not PROGRESS.search(ln)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.stderr
    return lines[0] + "\n"


def front_matter(card: bytes) -> dict:
    text = card.decode()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_first_push_uploads_weights_card_and_report_in_one_commit(hub_server, tmp_path):
    res = ported(tmp_path)
    out = push(hub_server, res)
    assert out.changed and out.pr_url is None and out.commit_oid == hub_server.head(REPO)
    commits = hub_server.commits(REPO)
    assert len(commits) == 2  # the repo's initial commit + ours
    files = hub_server.repo_files(REPO)
    assert set(files) == {".gitattributes", "ported.safetensors", "README.md", "report.json"}
    assert set(out.files) == {"ported.safetensors", "README.md", "report.json"}
    assert files["ported.safetensors"] == res.output.read_bytes()
    assert "ported.safetensors" in hub_server.lfs_paths(REPO)  # *.safetensors goes through LFS

    meta = front_matter(files["README.md"])
    assert meta["base_model"] == "lorareg-test/tiny-sdxl"  # no target model read: the family's default repo
    assert meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert {"lora", "lorareg", "lorareg-test", "template:sd-lora"} <= set(meta["tags"])
    assert meta["instance_prompt"] == "sks dog"  # top tag of ss_tag_frequency
    assert meta["license"] == "openrail++"  # modelspec.license
    card = files["README.md"].decode()
    sha = res.report.source_lora["sha256"]
    assert sha in card and "`copy`" in card and f"lorareg {lorareg.__version__}" in card
    assert "load_lora_weights" in card and 'weight_name="ported.safetensors"' in card and "ComfyUI" in card
    assert f"| {res.report.totals.ported} | {res.report.totals.skipped} | {res.report.totals.layers} |" in card
    assert "lorareg port dog.safetensors --method copy" in card

    report = json.loads(files["report.json"])
    assert report["timings"] == {} and report["cache"] == {}
    assert report["output"]["path"] == "ported.safetensors" and report["source_lora"]["path"] == "dog.safetensors"
    assert report["totals"] == res.report.totals.model_dump()
    lorareg.PortReport.model_validate(report)  # still a valid report
    for text in (card, files["report.json"].decode()):
        assert str(tmp_path) not in text and hub_server.token not in text

    # provenance in the weights' metadata
    remote = tmp_path / "remote.safetensors"
    remote.write_bytes(files["ported.safetensors"])
    md = read_header(remote).metadata
    assert md["lorareg.source_sha256"] == sha and md["lorareg.port.method"] == "copy"
    assert "lorareg.port.source_revision" in md and "lorareg.port.target_revision" in md


def test_same_port_pushed_again_makes_no_commit(hub_server, tmp_path):
    src = source_lora(tmp_path)
    first = push(hub_server, ported(tmp_path, "a", src))
    n = len(hub_server.commits(REPO))
    again = ported(tmp_path, "b", src)  # a second run: other timings, cache hits, output folder
    assert again.report.timings != {} and again.report_path.exists()
    second = push(hub_server, again)
    assert not second.changed and second.commit_oid == first.commit_oid
    assert len(hub_server.commits(REPO)) == n
    # the CLI on the output's folder (X.safetensors + X.report.json) gives the same files too
    res = CliRunner().invoke(main, ["push", str(again.output.parent), REPO], env={"HF_TOKEN": hub_server.token})
    assert res.exit_code == 0, res.output
    assert "nothing to push" in res.stdout and len(hub_server.commits(REPO)) == n
    # a changed card is a new commit
    third = push(hub_server, again, instance_prompt="a photo of sks dog")
    assert third.changed and len(hub_server.commits(REPO)) == n + 1
    assert front_matter(hub_server.repo_files(REPO)["README.md"])["instance_prompt"] == "a photo of sks dog"


def test_cli_port_push_twice_is_idempotent(hub_server, tmp_path):
    src = source_lora(tmp_path)
    env = {"HF_TOKEN": hub_server.token}
    for sub in ("a", "b"):
        res = CliRunner().invoke(main, ["port", str(src), "--method", "copy", "-o", str(tmp_path / sub / "p.safetensors"),
                                        "--push", REPO, "--private"], env=env)
        assert res.exit_code == 0, res.output
        assert hub_server.token not in res.output
    assert "nothing to push" in res.stdout
    assert len(hub_server.commits(REPO)) == 2
    card = hub_server.repo_files(REPO)["README.md"].decode()
    assert "lorareg port dog.safetensors --method copy -o p.safetensors" in card
    assert str(tmp_path) not in card


def test_push_to_a_pull_request_and_a_branch(hub_server, tmp_path):
    res = ported(tmp_path)
    push(hub_server, res)
    head = hub_server.head(REPO)
    pr = push(hub_server, res, create_pr=True, instance_prompt="sks", commit_message="better trigger words")
    assert pr.changed and pr.pr_url and pr.pr_url.endswith("/discussions/1")
    prs = hub_server.prs(REPO)
    assert len(prs) == 1 and prs[0]["title"] == "better trigger words" and prs[0]["status"] == "open"
    assert hub_server.head(REPO) == head  # main untouched
    assert front_matter(hub_server.repo_files(REPO, revision=prs[0]["ref"])["README.md"])["instance_prompt"] == "sks"
    # unchanged content opens no PR
    none = push(hub_server, res, create_pr=True)
    assert not none.changed and none.pr_url is None and len(hub_server.prs(REPO)) == 1
    # a branch is created from main when missing
    dev = push(hub_server, res, revision="dev", instance_prompt="on dev")
    assert dev.changed and "dev" in hub_server.branches(REPO) and hub_server.head(REPO) == head


def test_large_lora_goes_through_lfs_small_one_does_not(hf_offline_env, monkeypatch, tmp_path):
    with HubServer(lfs_patterns=(), lfs_threshold=512 * 1024) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        small = ported(tmp_path, "s", source_lora(tmp_path, rank=2, name="small.safetensors"))
        big = ported(tmp_path, "b", source_lora(tmp_path, rank=16, name="big.safetensors"))
        assert small.output.stat().st_size < 512 * 1024 < big.output.stat().st_size
        push(hub, small, "lorareg-tester/small")
        assert hub.lfs_paths("lorareg-tester/small") == set() and hub.count("lfs_upload") == 0
        push(hub, big, "lorareg-tester/big")
        assert hub.lfs_paths("lorareg-tester/big") == {"ported.safetensors"} and hub.count("lfs_upload") == 1
        assert hub.repo_files("lorareg-tester/big")["ported.safetensors"] == big.output.read_bytes()
        # the same big file again: nothing uploaded, nothing committed
        commits = len(hub.commits("lorareg-tester/big"))
        assert not push(hub, big, "lorareg-tester/big").changed
        assert hub.count("lfs_upload") == 1 and len(hub.commits("lorareg-tester/big")) == commits


def test_failed_commit_leaves_remote_and_local_unchanged(hub_server, tmp_path):
    res = ported(tmp_path)
    push(hub_server, res)
    before_files, before_commits = hub_server.repo_files(REPO), hub_server.commits(REPO)
    local = {p: p.read_bytes() for p in res.output.parent.iterdir()}
    hub_server.fail_next("commit", 500)
    cli = CliRunner().invoke(main, ["push", str(res.output), REPO, "--instance-prompt", "new words"],
                             env={"HF_TOKEN": hub_server.token})
    assert cli.exit_code == 6 and "500" in error_line(cli)
    assert hub_server.token not in cli.output
    assert hub_server.repo_files(REPO) == before_files and hub_server.commits(REPO) == before_commits
    assert {p: p.read_bytes() for p in res.output.parent.iterdir()} == local
    # `port --push` into a failing server: the port's output stays on disk
    hub_server.fail_next("commit", 503)
    out = tmp_path / "fresh" / "p.safetensors"
    cli = CliRunner().invoke(main, ["port", str(res.report.source_lora["path"]), "--method", "copy", "-o", str(out),
                                    "--push", "lorareg-tester/other"], env={"HF_TOKEN": hub_server.token})
    assert cli.exit_code == 6 and "503" in error_line(cli)
    assert out.exists() and out.with_name("p.report.json").exists()
    assert set(hub_server.repo_files("lorareg-tester/other")) == {".gitattributes"}


def test_bad_token_is_a_clear_error_and_never_shown(hub_server, tmp_path):
    bad = "hf_thisTokenIsWrong0123456789abcdef"
    src = source_lora(tmp_path)
    out = tmp_path / "o" / "p.safetensors"
    cli = CliRunner().invoke(main, ["port", str(src), "--method", "copy", "-o", str(out), "--push", REPO],
                             env={"HF_TOKEN": bad})
    assert cli.exit_code == 6 and error_line(cli) == AUTH_LINE
    assert bad not in cli.output and out.exists()
    assert not hub_server.repo_exists(REPO)
    with pytest.raises(lorareg.HubError, match="authentication failed"):
        lorareg.push(out, REPO, token=bad, endpoint=hub_server.endpoint)
    # no token at all: the same message
    cli = CliRunner().invoke(main, ["push", str(out), REPO])
    assert cli.exit_code == 6 and cli.stderr == AUTH_LINE
    # a good push never writes the token anywhere
    cli = CliRunner().invoke(main, ["push", str(out), REPO], env={"HF_TOKEN": hub_server.token})
    assert cli.exit_code == 0, cli.output
    written = [*hub_server.repo_files(REPO).values(), out.read_bytes(), out.with_name("p.report.json").read_bytes()]
    for blob in written:
        assert hub_server.token.encode() not in blob and bad.encode() not in blob
    assert all(hub_server.token not in v and bad not in v for v in read_header(out).metadata.values())


def test_push_input_errors(hub_server, tmp_path):
    src = source_lora(tmp_path)
    runner = CliRunner()
    env = {"HF_TOKEN": hub_server.token}
    res = runner.invoke(main, ["push", str(src), REPO], env=env)  # a LoRA that no port wrote
    assert res.exit_code == 2 and "no dog.report.json next to it" in res.stderr and res.stderr.count("\n") == 1
    res = runner.invoke(main, ["push", str(tmp_path / "nope"), REPO], env=env)
    assert res.exit_code == 2 and "no such file" in res.stderr
    out = ported(tmp_path, src=src)
    res = runner.invoke(main, ["push", str(out.output), "not a repo"], env=env)
    assert res.exit_code == 2 and "not a Hub repo id" in res.stderr
    res = runner.invoke(main, ["push", str(out.output), REPO], env={**env, "HF_HUB_OFFLINE": "1"})
    assert res.exit_code == 2 and "HF_HUB_OFFLINE" in res.stderr
    res = runner.invoke(main, ["port", str(src), "--method", "copy", "-o", str(tmp_path / "x.safetensors"), "--private"])
    assert res.exit_code == 2 and "need --push" in res.stderr
    with pytest.raises(lorareg.InputError, match="not written"):
        lorareg.push(lorareg.port(src, method="copy", progress=False), REPO)
    assert not hub_server.repo_exists(REPO)


def test_peft_folder_push(hub_server, tmp_path):
    lora = make_lora("tiny-llama", r"self_attn\.(q|v)_proj$", rank=4, alpha=8.0, dtype=torch.float32)
    lora.metadata["modelspec.trigger_phrase"] = "hello"
    src = tmp_path / "adapter"
    lorareg.save(lora, src, format="peft")
    res = lorareg.port(src, method="copy", output=tmp_path / "ported", progress=False)
    out = push(hub_server, tmp_path / "ported", "lorareg-tester/llama-lora")
    files = hub_server.repo_files("lorareg-tester/llama-lora")
    assert set(out.files) == {"adapter_model.safetensors", "adapter_config.json", "README.md", "report.json"}
    assert files["adapter_config.json"] == (res.output / "adapter_config.json").read_bytes()
    meta = front_matter(files["README.md"])
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert "template:sd-lora" not in meta["tags"] and meta["instance_prompt"] == "hello" and "license" not in meta
    assert 'PeftModel.from_pretrained(model, "lorareg-tester/llama-lora")' in files["README.md"].decode()
