"""The real huggingface_hub client against the in-memory Hub of tests/hub_server.py."""

from __future__ import annotations

import hashlib
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from hub_fixtures import hf_offline_env, hub_server  # noqa: E402,F401
from hub_server import LOG_ENV_VAR, HubServer, git_blob_sha1  # noqa: E402

huggingface_hub = pytest.importorskip("huggingface_hub")

from huggingface_hub import (  # noqa: E402
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
)
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
)

# huggingface_hub 2.4.0's own LFS PUT passes raw bytes as `data=`, which httpx2 deprecates.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Use 'content=<...>' to upload raw bytes/text content.:DeprecationWarning"
)

REPO = "lorareg-tester/demo-lora"
README = b"---\nlicense: mit\nbase_model: org/base\ntags:\n- lora\n---\n# demo\n"
BIG = hashlib.sha256(b"seed").digest() * (1024 * 1024 // 32 + 4096)  # a bit over 1 MiB, deterministic


@pytest.fixture
def api(hub_server: HubServer) -> HfApi:
    return HfApi(endpoint=hub_server.endpoint, token=hub_server.token)


@pytest.fixture
def repo(api: HfApi, hub_server: HubServer) -> str:
    api.create_repo(REPO)
    return REPO


def _download(hub: HubServer, cache, filename: str, revision: str | None = None, **kw) -> bytes:
    path = hf_hub_download(
        REPO, filename, revision=revision, endpoint=hub.endpoint, token=hub.token, cache_dir=cache, **kw
    )
    with open(path, "rb") as fh:
        return fh.read()


def _commit_readme_and_big(api: HfApi, message: str = "add weights"):
    return api.create_commit(
        REPO,
        [CommitOperationAdd("README.md", README), CommitOperationAdd("weights/model.bin", BIG)],
        commit_message=message,
        commit_description="converted by lorareg",
    )


def test_create_repo_and_exist_ok(api: HfApi, hub_server: HubServer) -> None:
    url = api.create_repo(REPO)
    assert url.repo_id == REPO
    assert hub_server.repo_files(REPO) == {".gitattributes": hub_server.repo_files(REPO)[".gitattributes"]}
    assert [c["title"] for c in hub_server.commits(REPO)] == ["initial commit"]
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409
    again = api.create_repo(REPO, exist_ok=True)
    assert again.repo_id == REPO
    assert hub_server.count("create_repo") == 3
    assert api.whoami()["name"] == hub_server.user


def test_commit_small_and_lfs_file_roundtrip(api: HfApi, hub_server: HubServer, repo: str, tmp_path) -> None:
    hub_server.reset_counts()
    info = _commit_readme_and_big(api)
    assert len(info.oid) == 40 and info.pr_url is None
    # The >1 MiB file went the LFS way: batch, PUT, verify.
    assert hub_server.count("lfs_batch") == 1
    assert hub_server.count("lfs_upload") == 1
    assert hub_server.count("lfs_verify") == 1
    assert hub_server.count("validate_yaml") == 1
    assert hub_server.count("commit") == 1
    assert hub_server.lfs_paths(repo) == {"weights/model.bin"}

    files = hub_server.repo_files(repo)
    assert files["README.md"] == README
    assert files["weights/model.bin"] == BIG
    commits = hub_server.commits(repo)
    assert commits[0]["oid"] == info.oid
    assert commits[0]["title"] == "add weights"
    assert commits[0]["message"] == "converted by lorareg"
    assert api.model_info(repo).sha == info.oid

    cache = tmp_path / "cache"
    assert _download(hub_server, cache, "weights/model.bin") == BIG
    assert _download(hub_server, cache, "README.md") == README
    assert sorted(api.list_repo_files(repo)) == [".gitattributes", "README.md", "weights/model.bin"]

    meta = api.model_info(repo, files_metadata=True)
    sizes = {s.rfilename: s.size for s in meta.siblings}
    assert sizes["weights/model.bin"] == len(BIG)
    lfs = {s.rfilename: s.lfs for s in meta.siblings}
    assert lfs["weights/model.bin"].sha256 == hashlib.sha256(BIG).hexdigest()
    assert lfs["README.md"] is None
    assert meta.card_data is not None and meta.card_data.get("base_model") == "org/base"


def test_identical_recommit_creates_no_commit(api: HfApi, hub_server: HubServer, repo: str) -> None:
    first = _commit_readme_and_big(api)
    hub_server.reset_counts()
    second = _commit_readme_and_big(api, message="same again")
    assert second.oid == first.oid
    assert hub_server.count("commit") == 0
    assert hub_server.count("lfs_upload") == 0  # object already stored: batch answers without actions
    assert len(hub_server.commits(repo)) == 2
    # An unchanged PR push opens no PR either.
    pr = api.create_commit(repo, [CommitOperationAdd("README.md", README)], commit_message="noop", create_pr=True)
    assert pr.pr_url is None
    assert hub_server.prs(repo) == []


def test_create_pr_and_download_at_pr_revision(api: HfApi, hub_server: HubServer, repo: str, tmp_path) -> None:
    base = _commit_readme_and_big(api)
    info = api.create_commit(
        repo,
        [CommitOperationAdd("README.md", README + b"\nv2\n")],
        commit_message="Update card",
        create_pr=True,
    )
    assert info.pr_num == 1 and info.pr_revision == "refs/pr/1"
    assert info.pr_url.endswith("/discussions/1")
    assert hub_server.prs(repo)[0]["ref"] == "refs/pr/1"
    assert hub_server.prs(repo)[0]["head"] == info.oid
    # main untouched
    assert hub_server.head(repo) == base.oid
    assert hub_server.repo_files(repo)["README.md"] == README
    assert hub_server.repo_files(repo, "refs/pr/1")["README.md"] == README + b"\nv2\n"
    assert _download(hub_server, tmp_path / "c", "README.md", revision="refs/pr/1") == README + b"\nv2\n"
    assert api.model_info(repo, revision="refs/pr/1").sha == info.oid
    refs = api.list_repo_refs(repo, include_pull_requests=True)
    assert [r.ref for r in refs.pull_requests] == ["refs/pr/1"]
    second = api.create_commit(repo, [CommitOperationAdd("b.txt", b"b")], commit_message="x", create_pr=True)
    assert second.pr_num == 2


def test_stale_parent_commit_gets_412(api: HfApi, hub_server: HubServer, repo: str) -> None:
    initial = hub_server.head(repo)
    _commit_readme_and_big(api)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(
            repo, [CommitOperationAdd("a.txt", b"a")], commit_message="late", parent_commit=initial
        )
    assert err.value.response.status_code == 412
    assert "a.txt" not in hub_server.repo_files(repo)
    ok = api.create_commit(
        repo, [CommitOperationAdd("a.txt", b"a")], commit_message="fresh", parent_commit=hub_server.head(repo)
    )
    assert hub_server.head(repo) == ok.oid


def test_injected_500_leaves_repo_unchanged(api: HfApi, hub_server: HubServer, repo: str) -> None:
    before_files = hub_server.repo_files(repo)
    before_commits = hub_server.commits(repo)
    hub_server.fail_next_commit(500)
    with pytest.raises(HfHubHTTPError) as err:
        _commit_readme_and_big(api)
    assert err.value.response.status_code == 500
    assert hub_server.count("commit") == 1  # not retried by the client
    assert hub_server.repo_files(repo) == before_files
    assert hub_server.commits(repo) == before_commits
    # The next attempt succeeds (the LFS object uploaded before the failure is reused).
    _commit_readme_and_big(api)
    assert hub_server.repo_files(repo)["weights/model.bin"] == BIG


def test_wrong_token_401_and_token_never_logged(
    hub_server: HubServer, repo: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv(LOG_ENV_VAR, "1")
    bad_token = "hf_definitely_wrong_token_value_42"
    bad = HfApi(endpoint=hub_server.endpoint, token=bad_token)
    with pytest.raises(HfHubHTTPError) as err:
        bad.create_commit(REPO, [CommitOperationAdd("a.txt", b"a")], commit_message="nope")
    assert err.value.response.status_code == 401
    assert not isinstance(err.value, RepositoryNotFoundError)
    with pytest.raises(HfHubHTTPError) as err:
        bad.whoami()
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        bad.create_repo("lorareg-tester/other")
    assert err.value.response.status_code == 401
    # Good-token traffic too, so the log has something to leak if it ever printed headers.
    HfApi(endpoint=hub_server.endpoint, token=hub_server.token).model_info(REPO)

    out, errtext = capfd.readouterr()
    assert "[hub_server]" in errtext  # logging was on
    recorded = "\n".join(hub_server.log_lines) + repr(hub_server.requests) + out + errtext
    for secret in (bad_token, hub_server.token):
        assert secret not in recorded
    assert "a.txt" not in hub_server.repo_files(REPO)


def test_server_quiet_by_default(hub_server: HubServer, repo: str, capfd: pytest.CaptureFixture) -> None:
    HfApi(endpoint=hub_server.endpoint, token=hub_server.token).model_info(REPO)
    out, err = capfd.readouterr()
    assert "hub_server" not in err and "GET /api" not in err


def test_anonymous_and_private_reads(hub_server: HubServer, api: HfApi, tmp_path) -> None:
    hub_server.add_commit("lorareg-tester/public", {"a.txt": b"hello"})
    hub_server.add_commit("lorareg-tester/secret", {"a.txt": b"psst"}, private=True)
    anon = HfApi(endpoint=hub_server.endpoint, token=False)
    assert anon.list_repo_files("lorareg-tester/public") == [".gitattributes", "a.txt"]
    with pytest.raises(RepositoryNotFoundError):
        anon.model_info("lorareg-tester/secret")
    assert api.model_info("lorareg-tester/secret").private is True
    with pytest.raises(HfHubHTTPError) as err:
        anon.create_commit("lorareg-tester/public", [CommitOperationAdd("b", b"b")], commit_message="x")
    assert err.value.response.status_code == 401


def test_branch_then_commit_to_branch(api: HfApi, hub_server: HubServer, repo: str, tmp_path) -> None:
    api.create_branch(repo, branch="convert")
    api.create_branch(repo, branch="convert", exist_ok=True)
    info = api.create_commit(
        repo, [CommitOperationAdd("lora.safetensors", b"tiny but LFS by rule")], commit_message="on branch",
        revision="convert",
    )
    assert hub_server.branches(repo)["convert"] == info.oid
    assert "lora.safetensors" not in hub_server.repo_files(repo)
    assert hub_server.repo_files(repo, "convert")["lora.safetensors"] == b"tiny but LFS by rule"
    assert hub_server.lfs_paths(repo, "convert") == {"lora.safetensors"}
    assert sorted(api.list_repo_files(repo, revision="convert")) == [".gitattributes", "lora.safetensors"]
    assert api.model_info(repo, revision="convert").sha == info.oid
    assert [c.title for c in api.list_repo_commits(repo, revision="convert")] == ["on branch", "initial commit"]
    # Delete on the branch.
    api.create_commit(
        repo, [CommitOperationDelete("lora.safetensors")], commit_message="rm", revision="convert"
    )
    assert "lora.safetensors" not in hub_server.repo_files(repo, "convert")


def test_download_at_revision_and_offline_reread(
    api: HfApi, hub_server: HubServer, repo: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = api.create_commit(repo, [CommitOperationAdd("config.json", b'{"v": 1}')], commit_message="v1")
    api.create_commit(repo, [CommitOperationAdd("config.json", b'{"v": 2}')], commit_message="v2")
    cache = tmp_path / "cache"
    assert _download(hub_server, cache, "config.json", revision=first.oid) == b'{"v": 1}'
    assert _download(hub_server, cache, "config.json") == b'{"v": 2}'
    assert _download(hub_server, cache, "config.json", revision=first.oid) == b'{"v": 1}'

    hub_server.reset_counts()
    assert _download(hub_server, cache, "config.json", local_files_only=True) == b'{"v": 2}'
    assert _download(hub_server, cache, "config.json", revision=first.oid, local_files_only=True) == b'{"v": 1}'
    assert hub_server.count("resolve_head") == 0 and hub_server.count("resolve") == 0
    # With the server gone, the cache still answers.
    hub_server.stop()
    assert _download(hub_server, cache, "config.json", local_files_only=True) == b'{"v": 2}'


def test_make_404_and_paths_info(api: HfApi, hub_server: HubServer, repo: str, tmp_path) -> None:
    _commit_readme_and_big(api)
    infos = {i.path: i for i in api.get_paths_info(repo, ["README.md", "weights/model.bin", "weights", "nope"])}
    assert set(infos) == {"README.md", "weights/model.bin", "weights"}
    assert infos["README.md"].blob_id == git_blob_sha1(README)
    assert infos["weights/model.bin"].lfs.sha256 == hashlib.sha256(BIG).hexdigest()
    hub_server.make_404(repo, "README.md")
    with pytest.raises(EntryNotFoundError):
        _download(hub_server, tmp_path / "c", "README.md")
    assert "README.md" not in api.list_repo_files(repo)


def test_range_request(api: HfApi, hub_server: HubServer, repo: str) -> None:
    import httpx2

    _commit_readme_and_big(api)
    url = f"{hub_server.endpoint}/{repo}/resolve/main/weights/model.bin"
    r = httpx2.get(url, headers={"Range": "bytes=10-19", "Authorization": f"Bearer {hub_server.token}"})
    assert r.status_code == 206 and r.content == BIG[10:20]
    assert r.headers["Content-Range"] == f"bytes 10-19/{len(BIG)}"
    h = httpx2.head(url)
    assert h.headers["X-Linked-Etag"].strip('"') == hashlib.sha256(BIG).hexdigest()
    assert int(h.headers["X-Linked-Size"]) == len(BIG)
    assert h.headers["X-Repo-Commit"] == hub_server.head(repo)
