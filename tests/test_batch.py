"""`lorareg scan` and `lorareg batch` on a small generated library over the test families (some files broken):
the scan's rows and cache, the batch's ledger (resume, idempotence, a worker and the driver SIGKILLed), the
push path against the loopback Hub."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

import lorareg
from lorareg.library.ledger import Ledger
from lorareg.apps.cli import main
from batch_library import base_models, broken_files, manifest, sdxl_loras

pytestmark = pytest.mark.usefixtures("tiny_families")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_data):
    return base_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("library")
    good = sdxl_loras(root / "styles", 16)
    bad = broken_files(root / "bad")
    return root, good, bad


def _rows(good, models, **extra):
    return [{"lora": str(p), "to": "tiny-ssd", "source_model": str(models / "sdxl"), "target_model": str(models / "ssd"), **extra}
            for p in good]


# -- scan ---------------------------------------------------------------------------------------------

def test_scan_rows_problems_summary_and_cache(library, tmp_path):
    root, good, bad = library
    cache = tmp_path / "scan-cache.json"
    res = lorareg.scan([root], workers=2, cache=cache, progress=False)
    rows = {Path(r.path).name: r for r in res.rows}
    assert len(rows) == len(good) + len(bad)
    for p in good:
        r = rows[p.name]
        assert r.ok and r.family == "tiny-sdxl" and r.adapter_type == "lora" and r.ranks == {"4": r.modules}
        assert r.format == ("kohya" if "kohya" in p.name else "diffusers")
        import hashlib

        assert r.sha256 == hashlib.sha256(p.read_bytes()).hexdigest() and not r.problems and not r.cached
    for kind, p in bad.items():
        r = rows[p.name]
        assert [q.split(":")[0] for q in r.problems] == [kind], r.problems
        assert r.ok == (kind == "nan") and (r.error is None) == (kind == "nan")
        assert r.sha256  # even a broken file is identified
    s = res.summary
    assert s.by_family["tiny-sdxl"] == len(good) + 1 and s.by_format == {"kohya": 9, "diffusers": 8, "-": 3}
    assert s.problems == {"broken": 1, "pickle": 1, "nan": 1, "undetected": 1} and s.failed == 3

    again = lorareg.scan([root], workers=2, cache=cache, progress=False)
    assert again.summary.cached == len(rows) and [r.model_dump(exclude={"cached", "seconds"}) for r in again.rows] == \
        [r.model_dump(exclude={"cached", "seconds"}) for r in res.rows]
    os.utime(good[0], ns=(time.time_ns(), time.time_ns()))  # a changed fingerprint is read again
    third = lorareg.scan([root], workers=1, cache=cache, progress=False)
    assert [r.path for r in third.rows if not r.cached] == [str(good[0])]


def test_scan_cli_json_csv_and_list_file(library, tmp_path):
    root, good, bad = library
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two files\n{good[0]}\n{bad['pickle']}\n")
    res = CliRunner().invoke(main, ["scan", str(listing), "--json", "--no-cache"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [Path(r["path"]).name for r in doc["rows"]] == [good[0].name, bad["pickle"].name]
    assert doc["summary"]["failed"] == 1
    res = CliRunner().invoke(main, ["scan", str(listing), "--csv", "--no-cache"])
    assert res.exit_code == 0 and res.stdout.splitlines()[0].startswith("path,ok,size,format")
    assert len(res.stdout.splitlines()) == 3
    res = CliRunner().invoke(main, ["scan", str(tmp_path / "nope")])
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.output


# -- batch --------------------------------------------------------------------------------------------

def test_batch_ports_library_isolates_failures_and_resumes(library, models, tmp_path):
    root, good, bad = library
    rows = _rows(good[:8], models) + _rows(list(bad.values()), models)
    rows.append({**_rows(good[:1], models)[0], "source_model": str(models / "missing"), "output": "nomodel.safetensors"})
    out = tmp_path / "out"
    res = lorareg.batch(rows, out, workers=2, progress=False)
    status = Counter(r.status for r in res.rows)
    assert status == {"done": 9, "failed": 4}, [(r.lora, r.error) for r in res.rows]  # the NaN file ports; 3 broken + 1 model
    errors = {Path(r.lora).name: r.error for r in res.rows if r.status == "failed"}
    assert errors["truncated.safetensors"].startswith("broken:") and errors["old-style.ckpt"].startswith("pickle:")
    assert errors[good[0].name].startswith("base models:")
    for r in res.rows:
        if r.status == "done":
            ported = lorareg.load(out / r.output)
            assert ported.family == "tiny-ssd" and r.output == Path(r.lora).stem + "-tiny-ssd.safetensors"
            assert json.loads((out / r.output.replace(".safetensors", ".report.json")).read_text())["source_lora"]["sha256"] == r.sha256
    assert not res.ok and res.summary.per_minute and set(res.summary.time_shares) == {"read", "math", "write", "push"}
    records = Ledger(out).records()
    assert len(records) == 13 and {r["status"] for r in records} == {"done", "failed"}

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    again = lorareg.batch(rows, out, workers=2, progress=False)
    assert Counter(r.status for r in again.rows) == {"skipped": 9, "failed": 4}
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == mtimes  # nothing done is redone
    assert sum(r["status"] == "done" for r in Ledger(out).records()) == 9


def test_batch_cli_manifest_csv_from_scan_and_exit_code(library, models, tmp_path):
    root, good, bad = library
    csv = tmp_path / "m.csv"
    csv.write_text("lora,to,method,output\n" + f"{good[0]},tiny-ssd,copy,a.safetensors\n{good[1]},tiny-ssd,copy,\n")
    res = CliRunner().invoke(main, ["batch", str(csv), "-o", str(tmp_path / "o1"), "--json", "--workers", "1"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [r["output"] for r in doc["rows"]] == ["a.safetensors", good[1].stem + "-tiny-ssd.safetensors"]

    scan_json = tmp_path / "scan.json"
    assert CliRunner().invoke(main, ["scan", str(root / "bad"), "--json", "-o", str(scan_json)]).exit_code == 0
    res = CliRunner().invoke(main, ["batch", "--from-scan", str(scan_json), "--to", "tiny-ssd", "--method", "copy",
                                    "-o", str(tmp_path / "o2"), "--workers", "1"])
    assert res.exit_code == 1 and "4 rows: 1 done, 0 already done, 3 failed" in res.stdout

    bad_manifest = tmp_path / "bad.jsonl"
    bad_manifest.write_text(json.dumps({"lora": str(good[0]), "speed": "fast"}) + "\n")
    res = CliRunner().invoke(main, ["batch", str(bad_manifest), "-o", str(tmp_path / "o3")])
    assert res.exit_code == 2 and res.stderr.startswith("error: bad.jsonl:1: speed: Extra inputs")


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return sorted(out)


def _wait_records(ledger: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout:
        count = len(ledger.read_text().splitlines()) if ledger.exists() else 0
        if count >= n:
            return count
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the batch made no progress")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the worker processes through /proc")
def test_sigkill_a_worker_then_the_driver_then_rerun_every_row_done_once(models, tmp_path):
    good = sdxl_loras(tmp_path / "lib", 14, rank=8)
    rows = _rows(good, models)
    m = manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "from lorareg.apps.cli import main; main()", "batch", str(m), "-o", str(out), "--workers", "2", "--json"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait_records(out / "ledger.jsonl", 2, proc)
        # the pool's workers are the fork server's children (grandchildren of the driver)
        (server,) = [p for p in _children(proc.pid) if b"forkserver" in Path(f"/proc/{p}/cmdline").read_bytes()]
        workers = _children(server)
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        seen = _wait_records(out / "ledger.jsonl", 5, proc)
        assert seen < len(rows), "the batch finished before it could be interrupted"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, as a lost machine would
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    first = Ledger(out).records()
    assert len({r["key"] for r in first}) == len(first) and all(r["status"] == "done" for r in first)
    res = lorareg.batch(m, out, workers=2, progress=False)
    assert res.ok and Counter(r.status for r in res.rows) == {"skipped": len(first), "done": len(rows) - len(first)}
    records = Ledger(out).records()
    assert Counter(r["key"] for r in records if r["status"] == "done") == Counter({r["key"]: 1 for r in records})
    assert len(records) == len(rows) and records[: len(first)] == first
    assert len(list(out.glob("*-tiny-ssd.safetensors"))) == len(rows)


# -- push ---------------------------------------------------------------------------------------------

def test_batch_push_to_loopback_hub_failures_isolated_and_no_recommit(library, hub_server, tmp_path):
    root, good, bad = library
    rows = [{"lora": str(good[i]), "to": "tiny-ssd", "method": "copy", "push": f"lorareg-tester/style{i}"} for i in range(3)]
    rows.append({"lora": str(good[3]), "to": "tiny-ssd", "method": "copy", "push": "someone-else/not-mine"})
    hub_server.writable_namespaces = {"lorareg-tester"}  # the token may not write to someone-else/
    res = lorareg.batch(rows, tmp_path / "o", workers=2, progress=False, token=hub_server.token, endpoint=hub_server.endpoint)
    by = {r.push["repo_id"] if r.push else r.lora: r for r in res.rows}
    assert Counter(r.status for r in res.rows) == {"done": 3, "failed": 1}
    refused = next(r for r in res.rows if r.status == "failed")
    assert refused.error.startswith("push:") and Path(refused.lora) == good[3]
    for i in range(3):
        r = by[f"lorareg-tester/style{i}"]
        assert r.push["changed"] and r.timings["push_s"] > 0
        files = hub_server.repo_files(f"lorareg-tester/style{i}")
        assert files[r.output] == (tmp_path / "o" / r.output).read_bytes() and "README.md" in files
        assert len(hub_server.commits(f"lorareg-tester/style{i}")) == 2
    # the same rows into a new folder: ported again, pushed again, but the Hub already holds the files
    again = lorareg.batch(rows[:3], tmp_path / "o2", workers=1, progress=False, token=hub_server.token, endpoint=hub_server.endpoint)
    assert again.ok and all(not r.push["changed"] for r in again.rows)
    assert all(len(hub_server.commits(f"lorareg-tester/style{i}")) == 2 for i in range(3))
    assert hub_server.token not in (tmp_path / "o" / "ledger.jsonl").read_text()


def test_scan_checks_embedded_hash_fields(tmp_path):
    import hashlib
    import struct

    import torch
    from lora_factory import make_lora

    from safetensors.torch import load_file, save_file

    lora = make_lora("tiny-sdxl", r"attn1\.to_q$", rank=2, dtype=torch.float32)
    lorareg.save(lora, tmp_path / "plain.safetensors", format="kohya")
    tensors = load_file(str(tmp_path / "plain.safetensors"))
    # as a trainer writes it (safetensors' own writer): the tensor data does not depend on the metadata
    out = tmp_path / "embedded.safetensors"
    save_file(tensors, str(out), metadata={"ss_network_dim": "2"})
    data = out.read_bytes()
    tensor_sha = hashlib.sha256(data[8 + struct.unpack("<Q", data[:8])[0]:]).hexdigest()
    save_file(tensors, str(out), metadata={"ss_network_dim": "2", "sshs_model_hash": tensor_sha, "modelspec.hash_sha256": "0x" + "0" * 64})
    row = lorareg.scan([tmp_path / "embedded.safetensors"], cache=False, progress=False).rows[0]
    assert row.hashes["tensor_sha256"] == tensor_sha and row.hashes["autov2"] == row.sha256[:10]
    assert row.embedded_hashes["sshs_model_hash"]["ok"] is True
    assert row.embedded_hashes["modelspec.hash_sha256"]["ok"] is False
    assert row.ok and row.problems == [f"embedded-hash: modelspec.hash_sha256=0x{'0' * 64} does not match the file"]


def test_batch_cli_push_prefix_uses_the_environment_token(library, hub_server, monkeypatch, tmp_path):
    root, good, bad = library
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.endpoint)
    m = manifest(tmp_path / "m.jsonl", [{"lora": str(good[i]), "to": "tiny-ssd", "method": "copy"} for i in range(2)])
    res = CliRunner().invoke(main, ["batch", str(m), "-o", str(tmp_path / "o"), "--push-prefix", "lorareg-tester/", "--json",
                                    "--workers", "1"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [r["push"]["repo_id"] for r in doc["rows"]] == [f"lorareg-tester/{good[i].stem}-tiny-ssd" for i in range(2)]
    assert hub_server.token not in res.output
    for r in doc["rows"]:
        assert r["output"] in hub_server.repo_files(r["push"]["repo_id"])


def test_port_reuses_the_plans_hashes_by_fingerprint(library, tmp_path, monkeypatch):
    """The plan's scan hashed every source: the port finds those hashes by the file's fingerprint and does not hash
    the file again (each source is hashed once per batch); a file changed after the plan is hashed by the port."""
    import shutil

    from lorareg.core import hash_memory
    from lorareg.library.manifest import make_row
    from lorareg.library.plan import plan
    from lorareg.library.tasks import run_task

    _, good, _ = library
    monkeypatch.setenv("LORAREG_CACHE", str(tmp_path / "cache"))
    srcs = [tmp_path / f"src{i}.safetensors" for i in range(2)]
    for s in srcs:
        shutil.copy(good[0], s)  # fresh fingerprints: nothing remembered yet
    rows = [make_row({"lora": str(s), "to": "tiny-ssd", "method": "copy"}, None, f"row {i}") for i, s in enumerate(srcs)]
    tasks, _ = plan(rows, workers=1, progress=False)
    assert all(t.hashes and t.hashes["hashes"]["sha256"] == t.sha256 for t in tasks)
    hashed: list[str] = []
    real = hash_memory.file_hashes
    monkeypatch.setattr(hash_memory, "file_hashes", lambda header, *a, **k: hashed.append(str(header.path)) or real(header, *a, **k))

    rec = run_task(tasks[0].payload(tmp_path / "out", None, None, None))
    assert rec["status"] == "done" and hashed == []
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / tasks[0].output), "pt") as f:
        assert tasks[0].sha256 in json.dumps(f.metadata())  # the provenance names the source the plan hashed

    os.utime(srcs[1], ns=(time.time_ns(), time.time_ns()))  # changed after the plan: the plan's hashes are not used
    rec = run_task(tasks[1].payload(tmp_path / "out", None, None, None))
    assert rec["status"] == "done" and hashed == [str(srcs[1])]
