"""GGUF files as an attacker writes them (issue 20, item 6), for `moxkit model FILE.gguf`: missing
tensors or layers, wrapped offsets, metadata claiming many blocks or huge arrays, chat templates
that do not compile, raise, escape the sandbox or loop. Every bad file ends in one line, exit 1,
no traceback, nothing at OUT; the header reader (moxkit.apps.gguf_file) is fuzzed against the `gguf`
package's own reader: whatever moxkit accepts, gguf reads with the same tensors."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")

from conftest import CliResult  # noqa: E402
from test_real_model import CHAT, _byte_tokens  # noqa: E402

from moxkit.apps.gguf_file import read_gguf  # noqa: E402
from moxkit.errors import MoxError  # noqa: E402

HIDDEN, FF, HEADS, KV = 32, 64, 4, 2


def build(path: Path, layers=2, block_count=None, drop=(), chat=CHAT, junk=0, nan=None) -> Path:
    """A tiny random Llama GGUF as llama.cpp lays it out (gpt2 tokenizer, chat template)."""
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_tokens(), "Ġt"]
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers if block_count is None else block_count)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    if chat is not None:
        w.add_chat_template(chat)
    if junk:
        u8 = gguf.GGUFValueType.UINT8
        w.add_key_value("junk.array", [0] * junk, gguf.GGUFValueType.ARRAY, sub_type=u8)

    def tensor(name, shape):
        if name in drop:
            return
        values = rng.standard_normal(shape).astype(np.float32) * 0.1
        if name == nan:
            values.flat[3] = np.nan
        w.add_tensor(name, values)

    head = HIDDEN // HEADS
    tensor("token_embd.weight", (len(tokens), HIDDEN))
    for i in range(layers):
        for short, shape in (
            ("attn_q", (HIDDEN, HIDDEN)), ("attn_k", (KV * head, HIDDEN)),
            ("attn_v", (KV * head, HIDDEN)), ("attn_output", (HIDDEN, HIDDEN)),
            ("ffn_gate", (FF, HIDDEN)), ("ffn_up", (FF, HIDDEN)), ("ffn_down", (HIDDEN, FF)),
            ("attn_norm", (HIDDEN,)), ("ffn_norm", (HIDDEN,)),
        ):  # fmt: skip
            tensor(f"blk.{i}.{short}.weight", shape)
    tensor("output_norm.weight", (HIDDEN,))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tensor_record(data: bytes, name: str) -> int:
    """Where tensor `name`'s info record (after its name) starts in the file's bytes."""
    needle = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(needle)
    return at + len(needle)


def set_offset(path: Path, name: str, offset: int) -> None:
    data = bytearray(path.read_bytes())
    at = tensor_record(bytes(data), name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<Q", data, at + 4 + 8 * n_dims + 4, offset)
    path.write_bytes(bytes(data))


def assert_refused(result, out: Path, *needles: str) -> None:
    assert result.code == 1, (result.code, result.out, result.err)
    assert result.err.startswith("moxkit: error: ") and result.err.count("\n") == 1, result.err
    for needle in needles:
        assert needle in result.err, result.err
    assert not os.path.lexists(out)
    assert not [p for p in os.listdir(out.parent) if "moxkit-tmp" in p]


def run_model(cli, src: Path, out: Path, *extra, process=False):
    args = ("model", src, "-o", out, "--no-check", *extra)
    return cli.run(*args, timeout=600) if process else cli(*args)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("gguf") / "good.gguf")


def test_good_file_converts(good, tmp_path, cli):
    result = run_model(cli, good, tmp_path / "out")
    assert result.code == 0, result.err
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ----------------------------------------------------------------- what the architecture needs


@pytest.mark.parametrize(
    "drop, needle",
    [
        (("blk.1.ffn_up.weight",), "blk.1.ffn_up.weight"),
        (("token_embd.weight",), "token_embd.weight"),
        (("output_norm.weight",), "output_norm.weight"),
        (tuple(f"blk.1.{n}.weight" for n in ("attn_q", "attn_k", "attn_v", "attn_output",
               "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm")), "block 1"),
    ],
)  # fmt: skip
def test_missing_tensor_or_layer_is_refused(tmp_path, cli, drop, needle):
    """transformers filled these at random and the run ended with exit 0."""
    src = build(tmp_path / "m.gguf", drop=drop)
    out = tmp_path / "out"
    assert_refused(run_model(cli, src, out, process=True), out, needle)


def test_shapes_must_match_the_metadata(tmp_path, cli):
    src = build(tmp_path / "m.gguf")
    data = bytearray(src.read_bytes())
    key = b"llama.feed_forward_length"
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    assert struct.unpack_from("<I", data, at)[0] == 4  # uint32
    struct.pack_into("<I", data, at + 4, 96)  # the tensors hold 64
    src.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert_refused(run_model(cli, src, out, process=True), out, "shape")


def test_wrapped_offset_is_refused(tmp_path, cli):
    """An offset near 2**64 wrapped the gguf reader's sum into the header: wrong bytes, exit 0."""
    src = build(tmp_path / "w.gguf")
    set_offset(src, "blk.0.attn_norm.weight", 2**64 - 64)
    out = tmp_path / "out"
    assert_refused(run_model(cli, src, out), out, "blk.0.attn_norm.weight", "inside the file")


@pytest.mark.parametrize("offset", [3, 1 << 40])
def test_offsets_outside_or_unaligned(tmp_path, offset):
    src = build(tmp_path / "o.gguf")
    set_offset(src, "blk.1.ffn_norm.weight", offset)
    with pytest.raises(MoxError, match="blk.1.ffn_norm.weight"):
        read_gguf(src)


def test_overlapping_tensors_are_refused(tmp_path):
    src = build(tmp_path / "o.gguf")
    header = read_gguf(src)
    first = next(t for t in header.tensors if t.name == "blk.0.attn_q.weight")
    set_offset(src, "blk.0.attn_k.weight", first.offset - header.data_start)
    with pytest.raises(MoxError, match="overlap"):
        read_gguf(src)


# ----------------------------------------------------------------- what the metadata claims


@pytest.mark.parametrize("claim, needle", [(3, "no tensor of block 2"), (1025, "from 1 to 1024")])
def test_block_count_must_match_the_tensors(tmp_path, cli, claim, needle):
    src = build(tmp_path / "b.gguf", block_count=claim)
    out = tmp_path / "out"
    assert_refused(run_model(cli, src, out), out, needle)


def test_many_claimed_blocks_do_not_hang(tmp_path, cli):
    """block_count 100,000 with two blocks of tensors: transformers built a 100,000-layer model
    and mapped its names in time quadratic in the count (hours); now one line at once."""
    src = build(tmp_path / "b.gguf", block_count=100_000)
    out = tmp_path / "out"
    proc = cli.popen("model", src, "-o", out, "--no-check")
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("a GGUF claiming 100,000 blocks hangs the conversion")
    assert_refused(CliResult(proc.returncode, stdout, stderr), out, "block_count")


def test_huge_metadata_array_is_refused_before_the_gguf_reader(tmp_path, cli):
    """A 3 MB array of 3 M uint8 cost the gguf reader 2.5 GiB."""
    src = build(tmp_path / "a.gguf", junk=3_000_000)
    out = tmp_path / "out"
    assert_refused(run_model(cli, src, out), out, "junk.array", "1,048,576")


def test_nonfinite_weights_refused_unless_allowed(tmp_path, cli):
    src = build(tmp_path / "n.gguf", nan="blk.0.ffn_down.weight")
    out = tmp_path / "out"
    assert_refused(run_model(cli, src, out), out, "blk.0.ffn_down.weight", "--allow-nonfinite")
    assert run_model(cli, src, out, "--allow-nonfinite").code == 0


# ----------------------------------------------------------------- chat templates

TEMPLATES = {
    "syntax error": ("{% for m in messages %}{{ m['content'] }", "does not compile"),
    "raises": (
        "{{ raise_exception('roles must alternate\\nsecond line') }}",
        "roles must alternate",
    ),
    "sandbox escape": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
    "huge output": (
        "{% for a in range(99999) %}{% for b in range(99999) %}{{ a }}{% endfor %}{% endfor %}",
        "renders more than",
    ),
    "exponential string": (
        "{% set ns = namespace(s='ab') %}{% for i in range(48) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s | length }}",
        "chat template",
    ),
    "cpu loop": (
        "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}",
        "chat template",
    ),
}


@pytest.mark.parametrize("case", sorted(TEMPLATES))
def test_bad_chat_templates_are_refused_before_out(tmp_path, cli, case):
    """The old code published OUT, then --check (or the user's first chat) raised jinja2's
    traceback or a MemoryError; with --no-check it wrote OUT and exited 0."""
    template, needle = TEMPLATES[case]
    src = build(tmp_path / "t.gguf", chat=template)
    out = tmp_path / "out"
    assert_refused(run_model(cli, src, out), out, "tokenizer.chat_template", needle)


# ----------------------------------------------------------------- the header reader, fuzzed

FUZZ = settings(
    max_examples=150, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip


def _agrees_with_gguf(path: Path) -> None:
    """read_gguf either refuses in one line or reads what gguf's own reader reads."""
    try:
        ours = read_gguf(path)
    except MoxError as exc:
        assert "\n" not in str(exc)
        return
    theirs = gguf.GGUFReader(str(path))
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, other in zip(ours.tensors, theirs.tensors, strict=True):
        assert mine.ggml_type == int(other.tensor_type)
        assert mine.offset == other.data_offset and mine.nbytes == other.n_bytes
    assert ours.data_start == theirs.data_offset


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> bytes:
    return build(tmp_path_factory.mktemp("small") / "s.gguf", chat="{{ messages }}").read_bytes()


@FUZZ
@given(data=st.data())
def test_fuzzed_headers_refused_or_read_as_gguf_reads_them(tmp_path_factory, small, data):
    body = bytearray(small)
    header_end = read_gguf_bytes_end(small)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, header_end - 1))
        kind = data.draw(st.sampled_from(["byte", "u64", "truncate"]))
        if kind == "byte":
            body[at] = data.draw(st.integers(0, 255))
        elif kind == "u64":
            value = data.draw(st.sampled_from([0, 1, 2**31, 2**63, 2**64 - 1, 2**64 - 32]))
            body[at : at + 8] = struct.pack("<Q", value)
        else:
            del body[at:]
            break
    path = tmp_path_factory.mktemp("fuzz") / "f.gguf"
    path.write_bytes(bytes(body))
    _agrees_with_gguf(path)


def read_gguf_bytes_end(data: bytes) -> int:
    """Where the tensor table of a valid file ends (the fuzzer mutates only before it)."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(data)
        f.flush()
        return read_gguf(f.name).tensors[0].offset


@FUZZ
@given(
    count=st.sampled_from([2**20 + 1, 2**32, 2**63]),
    elem=st.sampled_from([0, 6, 8, 9, 13]),
)
def test_claimed_array_lengths_are_bounded(tmp_path_factory, count, elem):
    """An array header claiming 2**63 elements: refused, never allocated."""
    raw = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    key = b"x.y"
    raw += struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, elem, count) + b"\0" * 64
    path = tmp_path_factory.mktemp("arr") / "a.gguf"
    path.write_bytes(raw)
    with pytest.raises(MoxError):
        read_gguf(path)
