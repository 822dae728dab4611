"""Integrity of what compress reads and writes: per-file checksums of an artifact, the byte
layout of safetensors headers, and quantization_config against compress's own metadata.

An artifact lists the SHA-256 of every file its logits depend on (config.json, the shard index,
each *.safetensors) in `checksums.sha256`, in `sha256sum` format so `sha256sum -c` checks it too.
Loading verifies it (COMPRESS_NO_VERIFY=1 skips the hashing for speed).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from pathlib import Path

from compress.errors import CompressError

CHECKSUMS = "checksums.sha256"
CHUNK = 16 << 20


def covered_files(directory: Path) -> list[Path]:
    """The files whose content decides the loaded model's outputs."""
    files = [directory / "config.json", directory / "model.safetensors.index.json"]
    return [f for f in files if f.is_file()] + sorted(directory.glob("*.safetensors"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256s(paths: list[Path]) -> list[str]:
    """file_sha256 of each path, in order, several files at once: hashlib releases the GIL on
    large updates, so threads hash in parallel (compress apply fingerprints its whole input
    before it starts: 16 GB for an 8B-shaped model, one file after another on one core)."""
    from concurrent.futures import ThreadPoolExecutor

    if len(paths) < 2:
        return [file_sha256(p) for p in paths]
    with ThreadPoolExecutor(min(len(paths), os.cpu_count() or 1, 16)) as pool:
        return list(pool.map(file_sha256, paths))


def write_checksums(directory: Path) -> None:
    files = covered_files(directory)
    lines = [f"{digest}  {f.name}\n" for f, digest in zip(files, file_sha256s(files))]
    (directory / CHECKSUMS).write_text("".join(lines))


def read_checksums(directory: Path) -> dict[str, str]:
    found = {}
    for number, line in enumerate((directory / CHECKSUMS).read_text().splitlines(), 1):
        match = re.fullmatch(r"([0-9a-f]{64})  ([^/\\]+)", line)
        if not match:
            raise CompressError(f"{directory / CHECKSUMS}:{number}: not a checksum line; the "
                                "artifact is corrupt")
        found[match[2]] = match[1]
    return found


def verify_checksums(directory: Path, required: bool) -> None:
    """Fail with one line naming the first file whose content differs from its checksum.
    required: the artifact's config says it was written with checksums."""
    if os.environ.get("COMPRESS_NO_VERIFY") == "1":
        return
    if not (directory / CHECKSUMS).is_file():
        if required:
            raise CompressError(f"{directory}: {CHECKSUMS} is missing; the artifact is "
                                "incomplete or was altered (COMPRESS_NO_VERIFY=1 loads it anyway)")
        return  # written by a compress version without checksums
    expected = read_checksums(directory)
    files = covered_files(directory)
    for file in files:
        if file.name not in expected:
            raise CompressError(f"{file} is not listed in {CHECKSUMS}: a file was added to "
                                "the artifact; remove it or rebuild the artifact")
    for file, digest in zip(files, file_sha256s(files)):
        if digest != expected.pop(file.name):
            raise CompressError(f"{file} does not match its checksum: the file is corrupt or "
                                "was modified; rebuild or re-copy the artifact "
                                "(COMPRESS_NO_VERIFY=1 loads it anyway)")
    if expected:
        raise CompressError(f"{directory}: {', '.join(sorted(expected))} listed in {CHECKSUMS} "
                            "but missing; the artifact is incomplete")


# ---------------------------------------------------------------------------------------------
# safetensors headers

DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2,
               "BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1,
               "F8_E5M2": 1, "F8_E8M0": 1}
MAX_HEADER = 100 << 20  # the safetensors library's own limit


def check_safetensors_layout(path: Path) -> None:
    """Every tensor's byte range must equal dtype size x element count and lie in the file,
    without overlaps; a header that lies about its bytes is refused before any tensor is read."""
    size = path.stat().st_size

    def corrupt(why: str) -> CompressError:
        return CompressError(f"{path} is corrupt ({why}); re-download or rebuild it")

    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise corrupt("shorter than a safetensors header")
        length = int.from_bytes(raw, "little")
        if length > min(MAX_HEADER, size - 8):
            raise corrupt(f"header length {length} exceeds the file")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise corrupt("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"tensor {name!r} has no dtype, shape or data_offsets") from None
        if dtype not in DTYPE_BYTES:
            raise corrupt(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or \
                not all(isinstance(o, int) for o in (begin, end)):
            raise corrupt(f"tensor {name!r} has an invalid shape or offsets")
        count = 1
        for dim in shape:
            count *= dim
        if end - begin != count * DTYPE_BYTES[dtype]:
            raise corrupt(f"tensor {name!r}: {dtype} x {shape} is {count * DTYPE_BYTES[dtype]} "
                          f"bytes but the header gives it {end - begin}")
        if begin < 0 or 8 + length + end > size:
            raise corrupt(f"tensor {name!r} lies beyond the end of the file")
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, first), (begin, _, second) in itertools.pairwise(spans):
        if begin < end:
            raise corrupt(f"tensors {first!r} and {second!r} overlap")


# ---------------------------------------------------------------------------------------------
# quantization_config against compress's module formats

def quantization_mismatch(qconfig: dict | None, expected: dict | None) -> str | None:
    """Why the artifact's quantization_config disagrees with the one its compress metadata
    implies (what other runtimes read vs what compress runs), or None when they agree."""
    if not qconfig and not expected:
        return None
    if not qconfig or not expected:
        return ("quantization_config is missing" if not qconfig
                else "quantization_config names quantized modules compress has no format for")

    def per_module(config: dict) -> dict[str, str]:
        found = {}
        for group in (config.get("config_groups") or {}).values():
            if not isinstance(group, dict):
                continue
            scheme = json.dumps([group.get("weights"), group.get("format")], sort_keys=True)
            for target in group.get("targets") or []:
                found[str(target)] = scheme
        return found

    ours, theirs = per_module(expected), per_module(qconfig)
    for target in sorted(set(ours) | set(theirs)):
        if ours.get(target) != theirs.get(target):
            name = target.removeprefix("re:^").removesuffix("$").replace("\\", "")
            return f"{name}: quantization_config and the compress metadata give different formats"
    if qconfig.get("format") != expected.get("format"):
        return f"quantization_config format {qconfig.get('format')!r} != {expected['format']!r}"
    return None
