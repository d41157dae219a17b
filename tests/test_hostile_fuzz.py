"""Property-based fuzzing (issue 9): config parsing, bit packing and the checkpoint reader. The
only outcomes allowed are a correct result or one of gptq_lab's own errors (GPTQLabError).

Example counts are modest so the file stays fast; GPTQ_LAB_FUZZ_SCALE=20 runs 20x as many."""
import json
import math
import os
import shutil
import struct
import warnings

import pytest
import torch
from checkpoint_fixture import tiny_model, token_ids
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gptq_lab import GPTQLabError, QuantConfig, convert, io, quantize_model
from gptq_lab.quant import maxq, pack_rows, unpack_rows

SCALE = int(os.environ.get("GPTQ_LAB_FUZZ_SCALE", "1"))
FUZZ = settings(max_examples=40 * SCALE, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CHEAP = settings(FUZZ, max_examples=100 * SCALE)                 # pure functions: milliseconds each
READER = settings(FUZZ, max_examples=25 * SCALE)                 # one load + describe each
FIELDS = ["bits", "group_size", "sym", "act_order", "static_groups", "damp", "block_size",
          "true_sequential", "overrides"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-300, 300), st.sampled_from([2, 3, 4, 8, -1, 32, 128]),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.one_of(st.sampled_from(FIELDS), st.text(max_size=5), st.integers()), inner, max_size=3), max_leaves=6)
overrides = st.dictionaries(st.one_of(st.sampled_from(["mlp", "down_proj", "(", r"layers\.0\.", ""]),
                                      st.text(max_size=4), st.integers()),
                            st.one_of(st.dictionaries(st.sampled_from(FIELDS + ["seqlen"]), scalars, max_size=3),
                                      values), max_size=2)
config_dicts = st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=6), st.integers()),
                               st.one_of(scalars, values, overrides), max_size=5)
PLAUSIBLE = {"bits": st.sampled_from([2, 3, 4, 8, 1, 5, 16, 4.0, "4", True]),
             "group_size": st.sampled_from([-1, 32, 64, 128, 7, 0, -5, 2**40, 32.0]),
             "damp": st.sampled_from([0, 0.01, 0.1, 1, -0.01, 1.5, math.nan, "0.01"]) | st.floats(-1, 2),
             "sym": st.booleans() | st.sampled_from([0, "true"]), "act_order": st.booleans(),
             "static_groups": st.booleans(), "block_size": st.sampled_from([1, 32, 128, 0, -1, 2.5]),
             "true_sequential": st.booleans(), "overrides": overrides}
plausible_dicts = st.fixed_dictionaries({}, optional=PLAUSIBLE)


@CHEAP
@given(st.one_of(plausible_dicts, config_dicts, values))
def test_from_dict_builds_a_valid_config_or_raises_config_error(d):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # "group_size is unusual" is a warning, not a failure
        try:
            cfg = QuantConfig.from_dict(d)
        except GPTQLabError:
            event("refused")
            return
        event("accepted")
        assert cfg.bits in (2, 3, 4, 8) and type(cfg.bits) is int
        assert isinstance(cfg.group_size, int) and (cfg.group_size == -1 or cfg.group_size > 0)
        assert 0 <= cfg.damp <= 1 and cfg.block_size >= 1
        for name in ("model.layers.0.mlp.down_proj", "model.layers.3.self_attn.q_proj"):
            assert cfg.for_module(name).bits in (2, 3, 4, 8)
        assert QuantConfig.from_dict(cfg.to_dict()) == cfg


BITS = st.sampled_from([2, 3, 4, 8] * 4 + [-1, 0, 1, 5, 16, 33])        # mostly valid, 6 of 22 not


@st.composite
def pack_args(draw):
    """(values, bits): mostly a well-formed [R, L] of codes for ``bits``, sometimes anything."""
    bits = draw(BITS)
    dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.uint8] * 3 + [torch.int16, torch.float32,
                                                                              torch.bool]))
    per = 32 if bits == 3 else 32 // bits if 0 < bits <= 32 else 1
    length = draw(st.integers(0, 4).map(lambda n: n * per) | st.integers(0, 70))
    shape = [draw(st.integers(0, 4)), length]
    if draw(st.integers(0, 4)) == 4:                   # (hypothesis favours small draws)
        shape = draw(st.lists(st.integers(0, 40), max_size=3))
    top = (1 << bits) - 1 if 0 < bits < 31 else 1
    lo, hi = draw(st.sampled_from([(0, top)] * 4 + [(-3, top), (0, top + 5), (-2**31, 2**31 - 1)]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if dtype in (torch.bool, torch.float32):
        return torch.randint(0, 2, shape, generator=gen).to(dtype), bits
    info = torch.iinfo(dtype)
    return torch.randint(max(lo, info.min), min(hi, info.max) + 1, shape, generator=gen, dtype=dtype), bits


@st.composite
def unpack_args(draw):
    """(words, bits, length): mostly int32 [R, W] with length = W * 32 / bits, sometimes anything."""
    bits = draw(BITS)
    rows, n_words = draw(st.integers(0, 4)), draw(st.integers(0, 12))
    shape = [rows, n_words] if draw(st.integers(0, 4)) < 4 else draw(st.lists(st.integers(0, 12), max_size=3))
    dtype = draw(st.sampled_from([torch.int32] * 4 + [torch.int64, torch.uint8]))
    words = torch.randint(-2**31, 2**31, shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    exact = n_words * 32 // bits if bits > 0 else 0
    length = exact if draw(st.integers(0, 4)) < 4 else draw(st.integers(-5, 140))
    return words.to(dtype), bits, length


@CHEAP
@given(pack_args())
def test_pack_rows_round_trips_or_raises_config_error(case):
    values, bits = case
    try:
        words = pack_rows(values, bits)
    except GPTQLabError:
        event("refused")
        return
    event("packed")
    r, length = values.shape
    assert values.dtype not in (torch.float32, torch.bool)
    assert words.dtype == torch.int32 and tuple(words.shape) == (r, length * bits // 32)
    assert torch.equal(unpack_rows(words, bits, length), values.to(torch.int32))


@CHEAP
@given(unpack_args())
def test_unpack_rows_gives_codes_in_range_or_raises_config_error(case):
    words, bits, length = case
    try:
        codes = unpack_rows(words, bits, length)
    except GPTQLabError:
        event("refused")
        return
    event("unpacked")
    assert codes.dtype == torch.int32 and tuple(codes.shape) == (words.shape[0], length)
    if codes.numel():
        assert 0 <= int(codes.min()) and int(codes.max()) <= maxq(bits)
    assert torch.equal(pack_rows(codes, bits), words)   # every packed word holds codes only: a bijection


# ---------------------------------------------------------------------------- checkpoint reader

CFG = QuantConfig(bits=4, group_size=32)
DTYPES = ["F16", "BF16", "F32", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "F8_E4M3", "XX", "", "i32"]


class Good:
    """The reference checkpoint: its directory, its weights file's bytes, its logits."""

    def __init__(self, path, raw, logits):
        self.path, self.raw, self.logits = path, raw, logits

    def __iter__(self):
        return iter((self.path, self.raw, self.logits))

    def __repr__(self):
        return f"Good({self.path})"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    model = tiny_model("llama")
    convert(model, quantize_model(model, None, CFG, method="rtn", progress=False), CFG)
    path = tmp_path_factory.mktemp("fuzz") / "ckpt"
    io.save(model, path)
    with torch.no_grad():
        logits = io.load(path, dtype=torch.float32)(token_ids(n=1, t=8)).logits
    return Good(path, (path / io.WEIGHTS_NAME).read_bytes(), logits)


def split(raw: bytes):
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def outcome(path, reference):
    """io.load and describe_checkpoint must either succeed or raise a GPTQLabError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = io.describe_checkpoint(path)
        assert isinstance(d["ok"], bool)
        try:
            model = io.load(path, dtype=torch.float32)
        except GPTQLabError:
            return "refused"
    with torch.no_grad():                                # a load is a usable model
        logits = model(token_ids(n=1, t=8)).logits
    assert logits.shape == reference.shape
    return "identical" if torch.equal(logits, reference) else "loaded"


def mutated(good, tmp_path, raw: bytes):
    src, _, reference = good
    dst = tmp_path / "m"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    (dst / io.WEIGHTS_NAME).write_bytes(raw)
    return outcome(dst, reference)


@READER
@given(st.data())
def test_flipped_bytes_anywhere(good, tmp_path, data):
    raw = bytearray(good.raw)
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    where = data.draw(st.sampled_from(["length", "header", "body"]))
    lo, hi = {"length": (0, 8), "header": (8, header_end), "body": (header_end, len(raw))}[where]
    for pos in data.draw(st.lists(st.integers(lo, hi - 1), min_size=1, max_size=4, unique=True)):
        raw[pos] ^= data.draw(st.integers(1, 255))
    event(f"{where}: {mutated(good, tmp_path, bytes(raw))}")


@READER
@given(st.data())
def test_truncated_files(good, tmp_path, data):
    raw = good.raw
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert mutated(good, tmp_path, raw[:cut]) == "refused"


@READER
@given(st.data())
def test_edited_header_dtype_shape_and_offsets(good, tmp_path, data):
    header, body = split(good.raw)
    names = sorted(k for k in header if k != "__metadata__")
    for name in data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)):
        entry = header[name]
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop"]))
        if field == "dtype":
            entry["dtype"] = data.draw(st.sampled_from(DTYPES))
        elif field == "shape":
            entry["shape"] = data.draw(st.lists(st.integers(-2, 2**40) | st.sampled_from([0, 1, 8, 64]),
                                                max_size=3))
        elif field == "data_offsets":
            entry["data_offsets"] = data.draw(st.lists(st.integers(-1, len(body) + 8), min_size=0, max_size=3))
        else:
            del header[name]
    event(mutated(good, tmp_path, join(header, body)))


@READER
@given(st.data())
def test_edited_quantization_config(good, tmp_path, data):
    src, _raw, reference = good
    dst = tmp_path / "q"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    qc = cfg["quantization_config"]
    key = data.draw(st.sampled_from(["bits", "group_size", "sym", "desc_act", "damp_percent", "checkpoint_format",
                                     "dynamic", "meta", "quant_method", "static_groups"]))
    qc[key] = data.draw(st.one_of(scalars, values, overrides))
    if data.draw(st.booleans()):
        qc.pop("meta", None)
    (dst / "config.json").write_text(json.dumps(cfg, default=str))
    result = outcome(dst, reference)
    event(f"{key}: {result}")
    assert result in ("refused", "identical", "loaded")
    if result != "refused" and key in ("bits", "group_size"):
        assert math.isfinite(float(qc[key])) and result == "identical"
