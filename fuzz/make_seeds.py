#!/usr/bin/env python3
"""Writes the hand-made seed inputs of fuzz/corpus/<target>/seed-*.

Seeds are built from the test fixtures (tests/fixtures, tests/engine/fixtures,
examples/) and from hand-written edge cases, each a few hundred bytes to a
few KiB. The other files in the corpus folders (named by their SHA-1) are
inputs libFuzzer found that reach new code, kept after `-merge=1`.
Run it from anywhere: python3 fuzz/make_seeds.py
"""
import json
import os
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def write(target, name, data):
    folder = os.path.join(CORPUS, target)
    os.makedirs(folder, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    with open(os.path.join(folder, "seed-" + name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- safetensors

DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8,
               "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors(tensors, metadata=None, pad=True):
    """tensors: [(name, dtype, shape)] in data order -> a whole file."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in tensors:
        n = DTYPE_BYTES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * ((8 - len(text) % 8) % 8)
    data = bytes((i * 37) & 0xFF for i in range(offset))
    return struct.pack("<Q", len(text)) + text + data


def raw_safetensors(json_text, data=b""):
    text = json_text.encode() if isinstance(json_text, str) else json_text
    return struct.pack("<Q", len(text)) + text + data


def safetensors_seeds():
    t = "safetensors_header"
    # The test model's header, every dimension cut to at most 2 (same names,
    # dtypes and order; the data section shrinks to a few hundred bytes).
    path = os.path.join(ROOT, "tests", "fixtures", "kjv-llama", "model.safetensors")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", None)
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    small = [(name, e["dtype"], [min(d, 2) for d in e["shape"]]) for name, e in entries]
    write(t, "kjv-llama-shrunk", safetensors(small, meta))
    write(t, "two-tensors", safetensors([("a.weight", "F32", [2, 2]), ("a.bias", "BF16", [3])],
                                        {"format": "pt"}))
    write(t, "every-dtype", safetensors([(d.lower(), d, [2]) for d in DTYPE_BYTES]))
    write(t, "scalar-and-empty", safetensors([("s", "F64", []), ("e", "F16", [0, 4]),
                                              ("z", "I8", [3, 0, 2])]))
    write(t, "no-tensors", safetensors([], {}))
    write(t, "unpadded-unicode-names",
          safetensors([("caf\u00e9.\u2581w", "U8", [5]), ("\u65e5\\\"x", "I16", [1])], pad=False))
    # Hand-written refusals, one problem each.
    write(t, "bad-negative-dim",
          raw_safetensors('{"a":{"dtype":"F32","shape":[-1,2],"data_offsets":[0,8]}}', b"\0" * 8))
    write(t, "bad-overlap", raw_safetensors(
        '{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
        '"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}', b"\0" * 6))
    write(t, "bad-gap", raw_safetensors(
        '{"a":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}', b"\0" * 3))
    write(t, "bad-duplicate-key", raw_safetensors(
        '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
        '"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\0"))
    write(t, "bad-overflowing-shape", raw_safetensors(
        '{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,0]}}'))
    write(t, "bad-float-offsets", raw_safetensors(
        '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0.0,1e0]}}', b"\0"))
    write(t, "bad-metadata", raw_safetensors(
        '{"__metadata__":{"k":1},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\0"))
    write(t, "bad-dtype", raw_safetensors(
        '{"__metadata__":{"k":"v"},"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}', b"\0"))
    write(t, "bad-length-prefix", struct.pack("<Q", 0xFFFFFFFFFFFFFFF0) + b"{}")
    write(t, "bad-not-object", raw_safetensors("[1,2,3]"))


# ---------------------------------------------------------------- GGUF

# ggml type id -> (weights per block, bytes per block), from common/gguf_types.h.
GGML = {"F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20),
        "Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34), "Q2_K": (10, 256, 84),
        "Q3_K": (11, 256, 110), "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176),
        "Q6_K": (14, 256, 210), "BF16": (30, 1, 2)}

# gguf value type id -> struct format (None: string or array)
VALUE = {"u8": (0, "<B"), "i8": (1, "<b"), "u16": (2, "<H"), "i16": (3, "<h"), "u32": (4, "<I"),
         "i32": (5, "<i"), "f32": (6, "<f"), "bool": (7, "<B"), "str": (8, None),
         "arr": (9, None), "u64": (10, "<Q"), "i64": (11, "<q"), "f64": (12, "<d")}


def gstr(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gvalue(kind, v):
    type_id, fmt = VALUE[kind]
    out = struct.pack("<I", type_id)
    if kind == "str":
        return out + gstr(v)
    if kind == "arr":
        element_kind, elements = v
        element_id, element_fmt = VALUE[element_kind]
        out += struct.pack("<IQ", element_id, len(elements))
        for e in elements:
            out += gstr(e) if element_kind == "str" else struct.pack(element_fmt, e)
        return out
    return out + struct.pack(fmt, v)


def gguf(metadata, tensors, version=3):
    """metadata: [(key, kind, value)]; tensors: [(name, type, ne)] -> a whole file."""
    alignment = 32
    for key, kind, value in metadata:
        if key == "general.alignment":
            alignment = value
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata))
    for key, kind, value in metadata:
        out += gstr(key) + gvalue(kind, value)
    offset = 0
    sizes = []
    for name, type_name, ne in tensors:
        type_id, block, block_bytes = GGML[type_name]
        n = 1
        for d in ne:
            n *= d
        size = n // block * block_bytes
        out += gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        out += struct.pack("<IQ", type_id, offset)
        sizes.append(size)
        offset += (size + alignment - 1) // alignment * alignment
    out += b"\0" * ((alignment - len(out) % alignment) % alignment)
    for size in sizes:
        out += bytes((i * 11) & 0xFF for i in range(size))
        out += b"\0" * ((alignment - size % alignment) % alignment)
    return out


def gguf_seeds():
    t = "gguf"
    with open(os.path.join(ROOT, "tests", "fixtures", "kjv-llama", "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(ROOT, "tests", "fixtures", "kjv-llama", "tokenizer.json")) as f:
        vocab = json.load(f)["model"]["vocab"]
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])][:48]
    llama = [
        ("general.architecture", "str", "llama"),
        ("general.name", "str", "kjv-llama"),
        ("general.file_type", "u32", 15),
        ("llama.context_length", "u32", config.get("max_position_embeddings", 512)),
        ("llama.embedding_length", "u32", config["hidden_size"]),
        ("llama.block_count", "u32", config["num_hidden_layers"]),
        ("llama.attention.head_count", "u32", config["num_attention_heads"]),
        ("llama.attention.head_count_kv", "u32", config["num_key_value_heads"]),
        ("llama.rope.freq_base", "f32", float(config.get("rope_theta", 10000.0))),
        ("llama.attention.layer_norm_rms_epsilon", "f32", float(config["rms_norm_eps"])),
        ("tokenizer.ggml.model", "str", "gpt2"),
        ("tokenizer.ggml.tokens", "arr", ("str", tokens)),
        ("tokenizer.ggml.token_type", "arr", ("i32", [1] * len(tokens))),
        ("tokenizer.ggml.merges", "arr", ("str", ["\u0120 t", "h e"])),
        ("tokenizer.ggml.bos_token_id", "u32", 0),
        ("general.quantization_version", "u32", 2),
    ]
    write(t, "kjv-llama-like", gguf(llama, [
        ("token_embd.weight", "Q4_K", [256, 2]),
        ("blk.0.attn_norm.weight", "F32", [8]),
        ("blk.0.attn_q.weight", "Q8_0", [64, 2]),
        ("blk.0.ffn_down.weight", "Q6_K", [256, 1]),
        ("output_norm.weight", "F16", [3]),
    ]))
    every_value = [("k." + kind, kind, v) for kind, v in [
        ("u8", 200), ("i8", -5), ("u16", 60000), ("i16", -300), ("u32", 7), ("i32", -7),
        ("f32", 1.5), ("bool", 1), ("str", "caf\u00e9"), ("u64", 2 ** 40), ("i64", -2 ** 40),
        ("f64", 2.5)]]
    every_value += [("a." + kind, "arr", (kind, vals)) for kind, vals in [
        ("u8", [1, 2]), ("i16", [-1]), ("f32", [0.5, 2.0]), ("bool", [0, 1, 1]),
        ("str", ["x", "", "\u2581y"]), ("u64", []), ("f64", [1e300])]]
    write(t, "every-value-type", gguf(every_value, [("t", "F32", [1])]))
    write(t, "every-tensor-type", gguf(
        [("general.alignment", "u32", 64)],
        [(name.lower(), name, [GGML[name][1] * 2, 1, 1, 2][:1 + i % 4])
         for i, name in enumerate(GGML)]))
    write(t, "no-tensors", gguf([("general.name", "str", "empty")], []))
    write(t, "empty", gguf([], []))
    # Hand-written refusals.
    good = gguf([("general.name", "str", "x")], [("w", "F32", [4])])
    write(t, "bad-version-2", b"GGUF" + struct.pack("<I", 2) + good[8:])
    write(t, "bad-big-endian", b"GGUF" + struct.pack(">I", 3) + good[8:])
    write(t, "bad-truncated", good[:-5])
    write(t, "bad-trailing-bytes", good + b"\0" * 32)
    write(t, "bad-array-of-arrays", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gstr("k")
          + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 4, 1) + struct.pack("<I", 1))
    write(t, "bad-bool-byte", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gstr("k")
          + struct.pack("<IB", 7, 2))
    write(t, "bad-huge-count", b"GGUF" + struct.pack("<IQQ", 3, 2 ** 62, 2 ** 62))
    write(t, "bad-alignment", gguf([("general.alignment", "u32", 48)], []))
    write(t, "bad-unknown-ggml-type", b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + gstr("w")
          + struct.pack("<IQIQ", 1, 4, 99, 0) + b"\0" * 64)
    write(t, "bad-block-multiple", b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + gstr("w")
          + struct.pack("<IQIQ", 1, 4, GGML["Q4_0"][0], 0) + b"\0" * 64)


# ---------------------------------------------------------------- recipes

def recipe_seeds():
    t = "recipe"
    for name in sorted(os.listdir(os.path.join(ROOT, "examples"))):
        with open(os.path.join(ROOT, "examples", name), "rb") as f:
            write(t, "example-" + name, f.read())
    write(t, "every-stage.json", json.dumps({
        "name": "all", "model": {"path": "m"}, "priority": -3, "labels": {"team": "x", "": "y"},
        "calibration": {"path": "c.txt", "numSamples": 8, "sequence_length": 64,
                        "propagation": "propagation_parallel"},
        "stages": [
            {"rtn": {"bits": 4, "group_size": 128, "include": ["q_proj$"], "exclude": ["("]}},
            {"gptq": {"bits": 3, "dampening": 0.01, "act_order": True, "block_size": 128}},
            {"awq": {"bits": 4, "grid_points": 20, "clip": True, "quantizer": "AWQ_QUANTIZER_GPTQ"}},
            {"hqq": {"bits": 2, "iterations": 20, "lp_norm": 0.7}},
            {"bnb_4bit": {"type": "BNB_4BIT_FP4", "block_size": 128, "double_quant": True}},
            {"evaluate": {"text_path": "t.txt", "context_length": 128, "stride": 64,
                          "max_tokens": 1, "sample_tokens": 5000}},
            {"sleep": {"millis_per_tensor": 5}},
            {"name": "nothing"},
        ],
        "outputs": ["GGUF", "packed_safetensors", 7],
        "gguf": [{"preset": "q4_k_m", "importance": True}, {"preset": "Q9"}]}, indent=1))
    write(t, "yaml-types.yaml", (
        "name: 0x1F\nmodel: {path: ~}\npriority: 0o17\n"
        "stages:\n  - hqq: {bits: 3, lp_norm: .nan}\n  - rtn: {bits: +8, group_size: -1e0}\n"
        "labels: {yes: true, 'n': null, ? complex : 1}\n"
        "calibration:\n  path: |\n    multi\n    line\n  num_samples: 0x10\n"))
    write(t, "bad-yaml-numbers.yaml", (
        "stages:\n  - hqq: {bits: .inf, lp_norm: -.Inf}\n"
        "calibration: {num_samples: 99999999999999999999, sequence_length: 1e999}\n"))
    write(t, "yaml-anchors.yaml",
          "model: {path: &p a}\nstages: [&s {rtn: {bits: 4}}, *s]\nlabels: {k: *p}\n")
    write(t, "bad-merge-key.yaml", "a: &s {rtn: {bits: 4}}\nstages: [{<<: *s}]\n")
    write(t, "flow-mapping", "{model: {path: m}, stages: [{rtn: {bits: 3}}]}")
    write(t, "bad-json.json", '{\n  "model": {"path": "m"},,\n}')
    write(t, "bad-unknown-field.yaml", "model: {path: m}\nstages:\n  - rtn: {bitz: 4}\n")
    write(t, "bad-list.yaml", "- just\n- a list\n")
    write(t, "bad-duplicate.yaml", "model: {path: a}\nmodel: {path: b}\n")
    write(t, "bad-tabs-and-tags.yaml", "model:\n\tpath: !!binary aGVsbG8=\n%TAG ! tag:x\n--- !x\n")


# ---------------------------------------------------------------- tokenizers

def tokenizer_seeds():
    t = "tokenizer"
    # (Not the test model's tokenizer.json: 18 KB of vocabulary and merges
    # that slow every run tenfold and reach no code the tiny ones miss.)
    fixtures = [
        ("byte-level-tiny",
         os.path.join(ROOT, "tests", "engine", "fixtures", "tokenizer", "byte_level_tiny.json")),
        ("sentencepiece-tiny",
         os.path.join(ROOT, "tests", "engine", "fixtures", "tokenizer", "sentencepiece_tiny.json")),
        ("qwen2-tiny-nfc", os.path.join(ROOT, "tests", "engine", "fixtures", "tokenizer",
                                        "qwen2_tiny", "tokenizer.json")),
    ]
    loaded = {}
    for name, path in fixtures:
        with open(path, encoding="utf-8") as f:
            loaded[name] = json.load(f)
        # Compact, then a NUL and a text to encode besides the target's own.
        write(t, name, json.dumps(loaded[name], separators=(",", ":"), ensure_ascii=False)
              + "\0And God said, Let there be light: and there was light. Cafe\u0301 I'LL")

    sp = loaded["sentencepiece-tiny"]
    variant = json.loads(json.dumps(sp))
    variant["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581",
                                "prepend_scheme": "first", "split": False}
    variant["normalizer"] = None
    variant["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True}
    variant["model"]["fuse_unk"] = True
    write(t, "metaspace-first", json.dumps(variant, separators=(",", ":"), ensure_ascii=False))

    minimal = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "<unk>": 3},
                         "merges": [["a", "b"]], "unk_token": "<unk>", "ignore_merges": True},
               "added_tokens": [{"id": 4, "content": "<s>", "special": True, "lstrip": True,
                                 "rstrip": True}],
               "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                   {"type": "Split", "pattern": {"Regex": "\\s+(?!\\S)|\\s+|\\p{L}+|\\d"},
                    "behavior": "Isolated", "invert": False},
                   {"type": "Split", "pattern": {"String": "."}, "behavior": "Isolated"},
                   {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]},
               "decoder": {"type": "Sequence", "decoders": [
                   {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                   {"type": "ByteFallback"}, {"type": "Fuse"},
                   {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
               "post_processor": {"type": "TemplateProcessing", "single": [
                   {"SpecialToken": {"id": "<s>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}]}}
    write(t, "minimal-everything", json.dumps(minimal) + "\0ab ab\u00a0 aab<s>b")
    old_style = {"model": {"vocab": {"x": 0, "y": 1, "xy": 2}, "merges": ["x y"]},
                 "normalizer": {"type": "Replace", "pattern": {"String": " "},
                                "content": "\u2581"},
                 "post_processor": {"type": "RobertaProcessing", "cls": ["x", 0],
                                    "sep": ["y", 1]}}
    write(t, "old-style-merges", json.dumps(old_style))
    # Hand-written refusals.
    write(t, "bad-not-json", '{"model": {"vocab": {"a": 0}')
    write(t, "bad-model-type", '{"model": {"type": "WordPiece", "vocab": {}}}')
    write(t, "bad-merge", '{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}}')
    write(t, "bad-duplicate-id", '{"model": {"type": "BPE", "vocab": {"a": 0, "b": 0}}}')
    write(t, "bad-negative-id", '{"model": {"type": "BPE", "vocab": {"a": -1}}}')
    write(t, "bad-lookbehind", json.dumps(
        {"model": {"type": "BPE", "vocab": {"a": 0}},
         "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(?<=a)b"},
                           "behavior": "Isolated"}}))
    write(t, "bad-single-word", json.dumps(
        {"model": {"type": "BPE", "vocab": {"a": 0}},
         "added_tokens": [{"id": 1, "content": "<x>", "single_word": True}]}))


if __name__ == "__main__":
    safetensors_seeds()
    gguf_seeds()
    recipe_seeds()
    tokenizer_seeds()
