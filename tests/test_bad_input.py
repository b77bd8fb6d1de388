"""Bad input: one line on stderr, non-zero exit, no traceback, input untouched, no partial output."""

import hashlib
import json
import pickle
import random
import struct
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lorareg.apps.cli.main import main
from lora_factory import make_lora, write

SELECT = r"^unet:down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn[12]\.to_(q|k)"


@pytest.fixture()
def good(tmp_path):
    return write(make_lora("sd15", SELECT), tmp_path / "good.safetensors", "kohya")


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def assert_clean_failure(result, *needles):
    assert result.exit_code not in (0, None), result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), repr(result.exception)
    err = result.stderr if hasattr(result, "stderr") else result.output
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def corrupt(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def header_bytes(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw, n, json.loads(raw[8 : 8 + n])


def rewrite_header(path, out, mutate):
    raw, n, header = header_bytes(path)
    mutate(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    out.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n :])
    return out


def test_truncated_file(tmp_path, good):
    p = corrupt(tmp_path, "trunc.safetensors", good.read_bytes()[:-100])
    assert_clean_failure(run(["inspect", p]), "truncated")


def test_header_length_larger_than_file(tmp_path, good):
    raw = good.read_bytes()
    p = corrupt(tmp_path, "big.safetensors", struct.pack("<Q", len(raw) * 10) + raw[8:])
    assert_clean_failure(run(["inspect", p]), "header length")


def test_invalid_json_header(tmp_path, good):
    raw = bytearray(good.read_bytes())
    raw[8:12] = b"{{{{"
    p = corrupt(tmp_path, "json.safetensors", bytes(raw))
    assert_clean_failure(run(["inspect", p]), "not valid JSON")


def test_pickles_are_refused_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    p = corrupt(tmp_path, "evil.safetensors", pickle.dumps(Evil(), protocol=4))
    assert_clean_failure(run(["inspect", p]), "pickle")
    assert_clean_failure(run(["convert", p, "--to", "diffusers", "-o", tmp_path / "o.safetensors"]), "pickle")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"a": torch.zeros(2)}, ckpt)  # zip container
    assert_clean_failure(run(["inspect", ckpt]), "pickle")
    assert not marker.exists()


def test_random_bytes(tmp_path):
    p = corrupt(tmp_path, "noise.safetensors", random.Random(0).randbytes(4096))
    assert_clean_failure(run(["inspect", p]))


def test_unsupported_dtype(tmp_path, good):
    def mutate(h):
        k = next(k for k in h if k != "__metadata__")
        h[k]["dtype"] = "C64"

    p = rewrite_header(good, tmp_path / "dtype.safetensors", mutate)
    assert_clean_failure(run(["inspect", p]), "unsupported dtype")


def test_unknown_keys_refused_by_convert_but_listed_by_inspect(tmp_path):
    sd = {"lora_unet_not_a_module.lora_down.weight": torch.zeros(4, 8), "lora_unet_not_a_module.lora_up.weight": torch.zeros(8, 4)}
    lora = make_lora("sd15", SELECT)
    tmp = write(lora, tmp_path / "base.safetensors", "kohya")
    from safetensors.torch import load_file

    merged = {**load_file(tmp), **sd}
    p = tmp_path / "unknown.safetensors"
    save_file(merged, p)
    res = run(["inspect", p, "--json"])
    assert res.exit_code == 0
    info = json.loads(res.stdout)
    assert set(info["unmapped_keys"]) == set(sd)
    out = tmp_path / "out.safetensors"
    assert_clean_failure(run(["convert", p, "--to", "diffusers", "-o", out]), "map to no module", "--allow-unmapped")
    assert not out.exists()
    res = run(["convert", p, "--to", "diffusers", "-o", out, "--allow-unmapped", "--json"])
    assert res.exit_code == 0
    dropped = {d["item"] for d in json.loads(res.stdout)["dropped"]}
    assert dropped == set(sd)


def test_mixed_formats_in_one_file(tmp_path):
    from safetensors.torch import load_file

    a = load_file(write(make_lora("sd15", SELECT), tmp_path / "a.safetensors", "kohya"))
    b = load_file(write(make_lora("sd15", r"^unet:up_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q"), tmp_path / "b.safetensors", "diffusers"))
    p = tmp_path / "mixed.safetensors"
    save_file({**a, **b}, p)
    assert_clean_failure(run(["inspect", p]), "mixed key formats")


def test_nonfinite_reported_and_refused(tmp_path, good):
    from safetensors.torch import load_file

    sd = load_file(good)
    k = next(k for k in sd if k.endswith("lora_up.weight"))
    sd[k][0, 0] = float("nan")
    p = tmp_path / "nan.safetensors"
    save_file(sd, p)
    res = run(["inspect", p, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["nonfinite"][0]["name"] == k
    out = tmp_path / "o.safetensors"
    assert_clean_failure(run(["convert", p, "--to", "diffusers", "-o", out]), "NaN/Inf")
    assert not out.exists()


def test_output_equal_to_input(tmp_path, good):
    before = sha(good)
    assert_clean_failure(run(["convert", good, "--to", "diffusers", "-o", good, "--force"]), "overwrite the input")
    assert sha(good) == before


def test_existing_output_needs_force(tmp_path, good):
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep me")
    assert_clean_failure(run(["convert", good, "--to", "diffusers", "-o", out]), "--force")
    assert out.read_bytes() == b"keep me"
    assert run(["convert", good, "--to", "diffusers", "-o", out, "--force"]).exit_code == 0


def test_unknown_format_and_family(tmp_path, good):
    assert_clean_failure(run(["convert", good, "--to", "nope", "-o", tmp_path / "x.safetensors"]), "unknown format")
    assert_clean_failure(run(["inspect", good, "--family", "nope"]), "unknown family")


def test_missing_file_and_directory_without_adapter(tmp_path):
    assert_clean_failure(run(["inspect", tmp_path / "missing.safetensors"]), "no such file")
    assert_clean_failure(run(["inspect", tmp_path]), "not a PEFT adapter folder")


def test_lokr_to_diffusers_needs_rank(tmp_path):
    from lorareg.core.io import LazyTensor
    from lorareg.core.lora import Lora, Module

    g = torch.Generator().manual_seed(0)
    f = {"lokr_w1": torch.randn(8, 8, generator=g), "lokr_w2_a": torch.randn(40, 4, generator=g), "lokr_w2_b": torch.randn(4, 40, generator=g)}
    m = Module("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "lokr", {k: LazyTensor.from_torch(v) for k, v in f.items()}, 2.0, None, (320, 320))
    p = write(Lora("sd15", {m.key: m}), tmp_path / "lokr.safetensors", "kohya")
    out = tmp_path / "o.safetensors"
    assert_clean_failure(run(["convert", p, "--to", "diffusers", "-o", out]), "--rank")
    assert not out.exists()
    res = run(["convert", p, "--to", "diffusers", "-o", out, "--rank", "4", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)["refactored"][0]
    assert rep["from_type"] == "lokr" and 0 < rep["relative_error"] < 1


def test_fuzzed_headers_never_crash(tmp_path, good):
    """Random byte flips in the header: either a valid read or one clean error line, never a traceback."""
    raw = good.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    rng = random.Random(1234)
    outcomes = {"ok": 0, "error": 0}
    for i in range(150):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(0, 8 + n)
            data[pos] = rng.randrange(256)
        p = tmp_path / f"fuzz{i}.safetensors"
        p.write_bytes(bytes(data))
        res = run(["inspect", p, "--json"])
        if res.exit_code == 0:
            outcomes["ok"] += 1
        else:
            assert_clean_failure(res)
            outcomes["error"] += 1
        assert p.read_bytes() == bytes(data)
    assert outcomes["error"] > 50


def test_no_partial_output_when_writing_fails(tmp_path, good, monkeypatch):
    import lorareg.core.io as lio

    out = tmp_path / "o.safetensors"

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lio.LazyTensor, "buffer", boom)
    res = run(["convert", good, "--to", "diffusers", "-o", out])
    assert_clean_failure(res, "No space left")
    assert list(tmp_path.iterdir()) == [good]


def test_cli_subprocess_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lorareg.apps.cli", "inspect", str(tmp_path / "nope.safetensors")], capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_fuzzed_keys_and_shapes_never_crash(tmp_path):
    """Plausible key names with random shapes and dtypes: a result or one clean error, never a traceback."""
    rng = random.Random(99)
    bases = ["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
             "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "lora_unet_double_blocks_0_img_attn_qkv",
             "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q", "base_model.model.model.layers.0.self_attn.q_proj",
             "transformer.transformer.transformer_blocks.0.attn.to_q", "lora_unet_input_blocks_1_0_in_layers_2"]
    suffixes = [".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_A.weight", ".lora_B.weight", ".hada_w1_a", ".hada_w1_b",
                ".hada_w2_a", ".hada_w2_b", ".lokr_w1", ".lokr_w2_a", ".lokr_w2_b", ".lora_mid.weight", ".dora_scale", ".diff", ".weird"]
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8]
    for i in range(60):
        sd = {}
        for _ in range(rng.randint(1, 6)):
            shape = [rng.choice([0, 1, 2, 4, 320, 640, 768]) for _ in range(rng.randint(0, 4))]
            if torch.Size(shape).numel() > 2_000_000:
                shape = shape[:2]
            t = torch.zeros(shape, dtype=rng.choice(dtypes))
            sd[rng.choice(bases) + rng.choice(suffixes)] = t
        p = tmp_path / f"k{i}.safetensors"
        save_file(sd, p)
        before = sha(p)
        for args in (["inspect", p], ["convert", p, "--to", rng.choice(["diffusers", "kohya", "musubi", "ldm"]), "-o", tmp_path / f"o{i}.safetensors",
                                      "--allow-unmapped", "--rank", "2"]):
            res = run(args)
            if res.exit_code != 0:
                assert_clean_failure(res)
                assert "unexpected" not in res.stderr, (sd.keys(), [t.shape for t in sd.values()], res.stderr)
        assert sha(p) == before


def test_a_safetensors_header_length_that_reads_as_pickle_magic_is_not_refused(tmp_path):
    """A header of 640 bytes starts the file with 80 02, pickle protocol 2's magic: the file is still safetensors."""
    import struct

    from lorareg.core.io import is_pickle, read_header

    body = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    header = body + b" " * (640 - len(body) - 1) + b"}"
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 640) + header + struct.pack("<f", 1.0))
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert list(read_header(path).tensors) == ["w"]
    assert is_pickle(b"\x80\x02" + b"\x00" * 7, 10_000)  # a real pickle: no JSON header after the length
