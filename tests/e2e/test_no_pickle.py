"""No file a run writes is a pickle: every file of a finished work directory (and of the
prepared data) is one of the formats we expect, parsed to its end."""

import json
import os
import struct

import numpy as np
import sentencepiece as spm

PICKLE_HEADERS = tuple(bytes([0x80, proto]) for proto in range(2, 6))  # protocol 2..5
PICKLE_FRAMES = (b"\x80\x04\x95", b"\x80\x05\x95")
OCDBT_MAGIC = b"\x0c\xdb"  # tensorstore OCDBT manifest and data files
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # OCDBT data files holding zstd-compressed array chunks
RIEGELI_MAGIC = b"\x83\xaf\x70\xd1\x0d\x88\x4a\x3f"  # array_record (riegeli) file signature
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    return True


def _is_tfrecord(data: bytes) -> bool:
    """TensorBoard events: [uint64 length][uint32 crc][payload][uint32 crc] to the end."""
    pos, records = 0, 0
    while pos < len(data):
        if pos + 12 > len(data):
            return False
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        pos += 12 + length + 4
        records += 1
    return pos == len(data) and records > 0


def _format(path: str, data: bytes) -> str:
    name = os.path.basename(path)
    if data.startswith((OCDBT_MAGIC, ZSTD_MAGIC)) and ("ocdbt" in path or "/d/" in path):
        return "ocdbt"
    if data.startswith(RIEGELI_MAGIC) and ".array_record" in name:
        return "array_record"
    if data.startswith(PNG_MAGIC) and name.endswith(".png"):
        return "png"
    if name.startswith("events.out.tfevents") and _is_tfrecord(data):
        return "tfevents"
    if name.endswith(".model"):
        spm.SentencePieceProcessor(model_file=path)  # raises on anything else
        return "sentencepiece"
    if name.endswith(".npy"):
        array = np.load(path, allow_pickle=False)  # raises on an object (pickled) array
        assert array.dtype != object
        return "npy"
    if name.endswith(".jsonl") and all(_is_json(ln) for ln in data.splitlines() if ln.strip()):
        return "jsonl"
    if _is_json(data):
        return "json"
    if name == "commit_success.txt" and data.decode("ascii").startswith("Checkpoint commit"):
        return "text"
    return "unknown"


def _scan(root: str) -> dict[str, str]:
    found = {}
    for directory, _, files in os.walk(root):
        for file in files:
            path = os.path.join(directory, file)
            with open(path, "rb") as f:
                data = f.read()
            assert not data.startswith(PICKLE_HEADERS), f"{path} starts like a pickle"
            if not data.startswith((OCDBT_MAGIC, ZSTD_MAGIC, RIEGELI_MAGIC)):  # compressed
                assert not any(h in data for h in PICKLE_FRAMES), f"{path} holds a pickle"
            found[path] = _format(path, data)
    return found


def test_a_finished_run_writes_no_pickle(reference, data_dir):
    workdir = reference[0]
    formats = {**_scan(workdir), **_scan(data_dir)}
    unknown = sorted(p for p, kind in formats.items() if kind == "unknown")
    assert not unknown, f"files of an unexpected format: {unknown}"
    kinds = set(formats.values())
    # Every kind of output is present, so the scan did look at each of them.
    assert {"ocdbt", "json", "jsonl", "png", "tfevents", "sentencepiece",
            "array_record"} <= kinds, kinds
    assert os.path.isfile(os.path.join(workdir, "config.json"))


def test_the_pickle_check_can_fail(tmp_path):
    import pickle

    (tmp_path / "state.json").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    try:
        _scan(str(tmp_path))
    except AssertionError as err:
        assert "starts like a pickle" in str(err)
    else:
        raise AssertionError("a pickle went unnoticed")
