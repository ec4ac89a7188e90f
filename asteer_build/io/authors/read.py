"""Reading the authors' files: result files from an unpacked tree or streamed out of a
`.tar.zst`, judgment caches, `concepts.json`, their prompt draw from `alpaca_eval.json`,
the README's license, and the tokenizers that count response lengths. Every malformed
field is an `AuthorsImportError` naming the file and the field.

Reading `.tar.zst`: the `zstandard` package is not in our lock, so tarballs are streamed
through the `zstd` command (`zstd -dc`, members parsed as they arrive, nothing unpacked
to disk); without it, pass an already-unpacked folder holding `result/`.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .facts import AUTHORS_TOKENIZERS, JUDGMENT_CACHE_VERSION, N_PROMPTS, PROMPT_SEED
from .locate import AuthorsImportError, Pair, concept_level

_RESULT_FILE = re.compile(r"(?P<layer>\d+)-(?P<alpha>[^/]+)\.json")


def load_json(data: bytes | IO[bytes], where: str) -> Any:
    try:
        return json.loads(data if isinstance(data, bytes) else data.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AuthorsImportError(f"{where}: not valid JSON ({e})") from e


def parse_rel(rel: str, where: str) -> tuple[int, int, float] | None:
    """`{cid}/{layer}-{alpha}.json` -> (cid, layer, alpha); None for other files."""
    parts = rel.split("/")
    if len(parts) != 2 or not parts[0].isdigit():
        return None
    m = _RESULT_FILE.fullmatch(parts[1])
    if m is None:
        return None
    try:
        alpha = float(m["alpha"])
    except ValueError:
        raise AuthorsImportError(f"{where}: alpha {m['alpha']!r} in the file name is not a "
                                 "number") from None
    return int(parts[0]), int(m["layer"]), alpha


def iter_result_files(pair: Pair) -> Iterator[tuple[str, str, Any]]:
    """(display path, `{cid}/{file}` relative path, parsed JSON) of every file of a pair:
    an unpacked tree in (concept, layer, alpha) order, else the tarball streamed in its
    own member order."""
    if pair.tree is not None:
        files = [p for p in pair.tree.glob("*/*.json")]

        def key(p: Path) -> tuple[Any, ...]:
            parsed = parse_rel(p.relative_to(pair.tree).as_posix(), str(p))
            return (0, *parsed) if parsed else (1, 0, 0, 0.0, str(p))

        for p in sorted(files, key=key):
            rel = p.relative_to(pair.tree).as_posix()
            yield str(p), rel, load_json(p.read_bytes(), str(p))
        return
    assert pair.tarball is not None
    yield from _iter_tarball(pair)


def _iter_tarball(pair: Pair) -> Iterator[tuple[str, str, Any]]:
    tar_path = pair.tarball
    assert tar_path is not None
    zstd = shutil.which("zstd")
    if zstd is None:
        raise AuthorsImportError(
            f"{tar_path}: reading .tar.zst needs the `zstd` command (the `zstandard` "
            "package is not in our lock); unpack it (tar --use-compress-program=unzstd "
            "-xf FILE) and import the folder holding result/")
    prefix = f"result/{pair.method_dir}/{pair.model}/"
    # (resolved: zstd skips a symbolic link, which is what the Hub cache holds)
    proc = subprocess.Popen([zstd, "-dc", "--", str(tar_path.resolve())], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if not member.isfile() or not name.endswith(".json"):
                    continue
                where = f"{tar_path}:{name}"
                if not name.startswith(prefix):
                    raise AuthorsImportError(f"{where}: outside {prefix} (a tarball holds "
                                             "one (method, model))")
                f = tar.extractfile(member)
                assert f is not None
                yield where, name[len(prefix):], load_json(f, where)
    except tarfile.TarError as e:
        raise AuthorsImportError(f"{tar_path}: not a readable tar.zst ({e})") from e
    finally:
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        rc = proc.wait()
    if rc != 0:
        raise AuthorsImportError(f"{tar_path}: zstd failed ({err.strip() or rc})")


def load_judgments(path: Path, pair: Pair, layer: int) -> dict[tuple[int, float, int], int]:
    """A judgment cache as {(concept_id, alpha rounded to 2, sample_id): judgment}."""
    where = str(path)
    blob = load_json(path.read_bytes(), where)
    if not isinstance(blob, dict):
        raise AuthorsImportError(f"{where}: expected a JSON object")
    if blob.get("format_version") != JUDGMENT_CACHE_VERSION:
        raise AuthorsImportError(f"{where}: format_version: expected "
                                 f"{JUDGMENT_CACHE_VERSION} (got {blob.get('format_version')!r})")
    for fld, want in (("layer", layer), ("steering_method", pair.method_dir),
                      ("llm", pair.model)):
        if fld in blob and str(blob[fld]) != str(want):
            raise AuthorsImportError(f"{where}: {fld}: {blob[fld]!r} does not match the file "
                                     f"name's {want!r}")
    judg = blob.get("judgments")
    if not isinstance(judg, dict):
        raise AuthorsImportError(f"{where}: judgments: missing or not an object")
    out: dict[tuple[int, float, int], int] = {}
    for cid, by_alpha in judg.items():
        if not isinstance(by_alpha, dict):
            raise AuthorsImportError(f"{where}: judgments.{cid}: expected an object")
        for alpha, by_sid in by_alpha.items():
            if not isinstance(by_sid, dict):
                raise AuthorsImportError(f"{where}: judgments.{cid}.{alpha}: expected an object")
            for sid, j in by_sid.items():
                fld = f"judgments.{cid}.{alpha}.{sid}"
                try:
                    key = (int(cid), round(float(alpha), 2), int(sid))
                except ValueError:
                    raise AuthorsImportError(f"{where}: {fld}: keys must be numbers") from None
                out[key] = parse_judgment(j, where, fld)
    return out


def parse_judgment(j: Any, where: str, fld: str) -> int:
    if isinstance(j, bool) or j not in (0, 1, 2, "0", "1", "2"):
        raise AuthorsImportError(f"{where}: {fld}: expected 0, 1 or 2 (got {j!r})")
    return int(j)


def load_tokenizers(specs: list[str] | None, models: list[str]) -> dict[str, Any]:
    """`--tokenizer MODEL=NAME_OR_PATH` (repeatable) or `auto` (their own table of model
    folder -> tokenizer) as {their model folder: tokenizer}. Loaded with `transformers`
    through the Hugging Face cache, so offline mode and a local path work."""
    if not specs:
        return {}
    wanted: dict[str, str] = {}
    for spec in specs:
        if spec == "auto":
            wanted.update({m: AUTHORS_TOKENIZERS[m] for m in models if m in AUTHORS_TOKENIZERS})
            continue
        model, sep, name = spec.partition("=")
        if not sep or not model or not name:
            raise AuthorsImportError(f"--tokenizer: expected MODEL=NAME_OR_PATH or auto "
                                     f"(got {spec!r})")
        wanted[model] = name
    unknown = sorted(set(wanted) - set(models))
    if unknown:
        raise AuthorsImportError(f"--tokenizer: no results for model(s) {unknown} (models "
                                 f"here: {sorted(models)})")
    from transformers import AutoTokenizer

    out = {}
    for model, name in sorted(wanted.items()):
        try:
            out[model] = AutoTokenizer.from_pretrained(name)
        except Exception as e:  # noqa: BLE001 - any loading failure names the tokenizer
            raise AuthorsImportError(f"--tokenizer: cannot load {name!r} for {model}: "
                                     f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
    return out


def read_concepts(path: Path | None, root: Path) -> dict[int, str]:
    if path is None:
        raise AuthorsImportError(f"{root}: concepts.json not found (the authors' concept "
                                 "names; it sits at the top of their Hub dataset)")
    rows = load_json(path.read_bytes(), str(path))
    if not isinstance(rows, list):
        raise AuthorsImportError(f"{path}: expected a list of concepts")
    out: dict[int, str] = {}
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise AuthorsImportError(f"{path}: [{i}]: expected an object")
        for fld in ("concept_id", "concept_name"):
            if fld not in r:
                raise AuthorsImportError(f"{path}: [{i}].{fld}: missing")
        cid = r["concept_id"]
        if isinstance(cid, bool) or not isinstance(cid, int):
            raise AuthorsImportError(f"{path}: [{i}].concept_id: expected an integer "
                                     f"(got {cid!r})")
        concept_level(cid, f"{path}: [{i}]")
        out[cid] = str(r["concept_name"])
    return out


def prompt_draw(path: Path | None) -> list[dict[str, Any]] | None:
    """Their 50 prompts in their order, from `alpaca_eval.json`, when it is at hand."""
    if path is None:
        return None
    rows = load_json(path.read_bytes(), str(path))
    if not isinstance(rows, list) or len(rows) < N_PROMPTS:
        raise AuthorsImportError(f"{path}: expected a list of at least {N_PROMPTS} rows")
    draw = random.Random(PROMPT_SEED).sample(rows, N_PROMPTS)
    for i, r in enumerate(draw):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str):
            raise AuthorsImportError(f"{path}: a sampled row (prompt {i}): instruction: "
                                     "missing or not text")
    return draw


def stated_license(readme: Path | None) -> str | None:
    """The `license` of the Hub dataset's README front matter, as the authors state it."""
    if readme is None:
        return None
    import yaml

    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    try:
        meta = yaml.safe_load(text[3:end] if end > 0 else "") or {}
    except yaml.YAMLError:
        return None
    lic = meta.get("license") if isinstance(meta, dict) else None
    if isinstance(lic, list):
        lic = ", ".join(str(x) for x in lic)
    return str(lic) if lic else None
