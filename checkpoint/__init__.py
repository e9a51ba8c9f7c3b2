"""Checkpoints on disk: safetensors weights beside a dataclass config.json, written atomically.

Every file goes to a temporary name in the same directory and is renamed into place, so a run killed
at any moment leaves the last good file readable. Weights load only through safetensors and optimizer
state only through ``torch.load(weights_only=True)``: nothing user-supplied is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import threading
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cli import ENVIRONMENT_ERRNOS, WRITE_HINT, UserError

__all__ = [
    "CheckpointError",
    "WriteError",
    "atomic_write",
    "remove_temporaries",
    "write_json",
    "read_json",
    "save_pretrained",
    "load_config",
    "load_weights",
    "load_pretrained",
    "save_torch",
    "load_torch",
    "file_digest",
    "TOKENIZER_DIGEST",
    "STAGE_ALIASES",
    "stage_name",
    "part_dir",
    "RUN_RECORD",
    "read_run_record",
    "check_tokenizer_digest",
]

TEMPORARY_SUFFIX = ".tmp"
# The file inside a temporary folder: a kill before the rename must not leave a half-written or empty file
# under the final name anywhere, where a search for results (``*.safetensors``) would find it.
PARTIAL_SUFFIX = ".partial"
# atomic_write's temporaries: ".<name>.<pid>-<random>.tmp" (a folder), or ".<name>.<random>.tmp" from before.
_TEMPORARY = re.compile(r"\..+\.(?:(\d+)-)?[A-Za-z0-9_]+\.tmp")
_SAFETENSORS_TEMPORARY = re.compile(r"\.tmp[A-Za-z0-9]{6}")  # the Rust tempfile crate's names
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Elements of the buffers a config may ask for beyond its weights (masks, rotary tables): 256 MiB of fp32.
MAX_BUFFER_ELEMENTS = 1 << 26
MODULES_PER_TENSOR = 16  # a model has at most this many modules (layers, activations, ...) per stored tensor

T = TypeVar("T")


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged or does not fit; the message says which part and what to do."""


class WriteError(UserError):
    """A file could not be written (a full disk, a read-only or foreign directory); what was there is intact."""


def atomic_write(path: str | Path, write: Callable[[str], None], exclusive: bool = False) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, fsync it, then rename it over ``path``.

    ``exclusive`` never replaces a file: where ``path`` exists (another process may just have written it) it
    raises FileExistsError and writes nothing.

    The temporary file lies in a folder of its own beside ``path``, ``.<name>.<pid>-<random>.tmp``, so that
    whatever ``write`` makes on the way (safetensors writes through a ``.tmpXXXXXX`` file of its own) is
    inside it: a kill leaves one entry of one pattern, which :func:`remove_temporaries` finds. The file,
    ``<name>.partial`` inside the folder (so no search for finished files finds it),
    gets the mode a file opened for writing gets, 0666 less the umask, whatever ``write`` did to it (mkstemp
    and safetensors make 0600, which hid a run's files from everyone but their owner).

    A write the machine refuses (a full disk, a read-only directory: :data:`ENVIRONMENT_ERRNOS`, however the
    writer reports it) is a :class:`WriteError` naming ``path``; the file there stays as it was.
    """
    path = Path(path)
    folder = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-", suffix=TEMPORARY_SUFFIX, dir=path.parent)
        tmp = os.path.join(folder, path.name + PARTIAL_SUFFIX)  # never the final name, even inside its folder
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the kernel applies the umask
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if exclusive:
            _place_new(tmp, path)
        else:
            os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - the writers report a full disk as OSError, RuntimeError or their own
        cause = _system_error(e)
        if cause is None or cause.errno not in ENVIRONMENT_ERRNOS:
            raise
        raise WriteError(f"cannot write {path}: {cause.strerror}; {WRITE_HINT}") from None
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _system_error(error: BaseException) -> OSError | None:
    """The operating system's error behind a failed write, or None: an OSError in the chain of causes (torch.save
    wraps it in a RuntimeError), or safetensors' ``(os error N)``."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        number = re.search(r"\(os error (\d+)\)", str(seen))
        if number is not None:
            code = int(number.group(1))
            return OSError(code, os.strerror(code))
        seen = seen.__cause__ or seen.__context__
    return None


def _place_new(tmp: str, path: Path) -> None:
    """Give the whole file ``tmp`` the name ``path`` unless that name is taken (FileExistsError)."""
    try:
        os.link(tmp, path)  # fails rather than replace
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: claim the name empty, then fill it whole
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        os.replace(tmp, path)


def remove_temporaries(root: str | Path) -> int:
    """Delete what killed :func:`atomic_write` calls left under ``root``; returns how many entries went.

    Those are ``.<name>.<pid>-<random>.tmp`` folders whose process is gone (one still running may be another
    stage writing into the same run), and the ``.<name>.<random>.tmp`` files and safetensors' ``.tmpXXXXXX``
    files that earlier versions left beside their targets.
    """
    removed = 0
    for entry in sorted(Path(root).rglob(".*"), key=lambda p: len(p.parts)):
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None and _SAFETENSORS_TEMPORARY.fullmatch(entry.name) is None or not os.path.lexists(entry):
            continue  # not a temporary, or inside one removed already
        pid = int(match.group(1)) if match is not None and match.group(1) else None
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to someone else
        return True
    return True


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(path, write)


def read_json(path: str | Path, part: str) -> dict:
    """Read a JSON object; a missing or corrupt file is a CheckpointError naming ``part``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{part}: {path} is missing; train that stage first or pass the right --checkpoint")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{part}: {path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    except RecursionError:
        raise CheckpointError(f"{part}: {path} nests too deep to be one of this program's files") from None


def read_json_or_empty(path: str | Path) -> dict:
    """An optional record of a run (all.json, vocabulary.json, ...): its JSON object, or {} when the file is
    missing, unreadable, nested past Python's stack or not an object; for readers that work without it."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError covers JSON and UTF-8 errors
        return {}
    return record if isinstance(record, dict) else {}


# The names stages and their run folders had before; still read, so that runs made then keep working.
STAGE_ALIASES = {"clip": "scorer"}


def stage_name(name: str) -> str:
    """A stage's name today for a name a run record or a command line may hold (``clip`` is ``scorer``)."""
    return STAGE_ALIASES.get(name, name)


def part_dir(run: str | Path, part: str) -> Path:
    """RUN/<part>/, or the folder an older run holds the part in (RUN/clip/ for the scorer) where only that exists."""
    directory = Path(run) / part
    if not directory.exists():
        for old, new in STAGE_ALIASES.items():
            if new == part and (Path(run) / old).exists():
                return Path(run) / old
    return directory


RUN_RECORD = "all.json"  # train all's record of a run: stages finished and their seconds, preset, data options


def read_run_record(run: str | Path, strict: bool = False) -> dict:
    """RUN/all.json, the one way every command reads it: the object as written, with ``finished`` a list of
    stage names by today's names (:func:`stage_name`) and ``seconds`` a dict of them, both empty where the
    record lacks them. A missing record reads as that empty record; so does a damaged one (broken JSON, not an
    object), unless ``strict``, where a CheckpointError names it: for readers that would otherwise go on with a
    wrong default rather than without a record."""
    path = Path(run) / RUN_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        problem = None if isinstance(record, dict) else f"{json_kind(record)}, not an object"
    except FileNotFoundError:
        record, problem = {}, None
    except (OSError, ValueError, RecursionError) as e:  # ValueError covers JSON and UTF-8 errors
        record, problem = {}, type(e).__name__
    if problem is not None:
        if strict:
            raise CheckpointError(f"cannot read {path} ({problem}); repair it, or pass what it records "
                                  "(--data) on the command line")
        record = {}
    finished = record.get("finished")
    seconds = record.get("seconds")
    record["finished"] = [stage_name(s) for s in finished if isinstance(s, str)] if isinstance(finished, list) else []
    record["seconds"] = ({stage_name(k): v for k, v in seconds.items() if isinstance(v, (int, float))}
                         if isinstance(seconds, dict) else {})
    return record


def save_pretrained(model: torch.nn.Module, config: Any, directory: str | Path, state: dict | None = None,
                    metadata: dict[str, str] | None = None) -> None:
    """Write ``config`` (a dataclass) as config.json and the model's weights as model.safetensors.

    ``state`` replaces ``model.state_dict()`` where the module's own holds shards (FSDP2). ``metadata`` goes
    into the safetensors header beside ``format`` (the seq2seq stage records the step of its export there).
    """
    directory = Path(directory)
    state = model.state_dict() if state is None else state
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    # Tied weights share storage; safetensors refuses shared tensors, so store independent copies.
    seen: set[int] = set()
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            state[name] = tensor.clone()
        seen.add(ptr)
    header = {"format": "pt", **(metadata or {})}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata=header))
    write_json(directory / CONFIG_NAME, dataclasses.asdict(config))


def load_config(config_cls: type[T], directory: str | Path, part: str) -> T:
    """Rebuild a dataclass config from ``directory/config.json``; unknown or missing fields name the part."""
    raw = read_json(Path(directory) / CONFIG_NAME, part)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{part}: config.json holds {json_kind(raw)}, not an object of fields; restore it from "
                              "the run or retrain")
    fields = {f.name for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise CheckpointError(f"{part}: config.json has fields this version does not know: {', '.join(unknown)}")
    hints = typing.get_type_hints(config_cls)
    for name, value in raw.items():
        if not _fits_type(value, hints.get(name, Any)):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise CheckpointError(f"{part}: config.json gives {name} = {shown}, which is not "
                                  f"{_type_name(hints[name])}; restore it from the run or retrain")
    try:
        return config_cls(**raw)
    except (TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{part}: config.json does not make a valid {config_cls.__name__}: {e}") from None


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words: "null", "a list", "a number", ..."""
    kinds = {type(None): "null", bool: "true or false", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def _fits_type(value: Any, kind: Any) -> bool:
    """Whether a JSON value is of a config field's annotated type (kinds it does not know pass: the config's own
    checks see them). Numbers must be finite, a bool is no int, and an int serves where a float is asked."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_fits_type(value, arg) for arg in args)
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        item = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(_fits_type(v, item) for v in value)
    return True


def _type_name(kind: Any) -> str:
    text = getattr(kind, "__name__", None) if typing.get_origin(kind) is None else None
    return f"a{'n' if (text or str(kind))[0] in 'aeiou' else ''} {text or str(kind).replace('typing.', '')}"


def load_weights(model: torch.nn.Module, path: str | Path, part: str) -> None:
    """Load safetensors weights into ``model`` strictly; any mismatch is a CheckpointError naming the tensor."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{part}: {path} is missing; train that stage first or pass the right --checkpoint")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{part}: {path} is damaged or truncated ({e}); retrain or restore it") from None
    expected = model.state_dict()
    _check_shapes({k: tuple(v.shape) for k, v in expected.items()}, {k: tuple(v.shape) for k, v in state.items()}, part)
    for name, tensor in expected.items():
        # A weight of the wrong kind, or one that is not finite, would load and draw garbage: refuse it here.
        if state[name].is_floating_point() != tensor.is_floating_point():
            raise CheckpointError(f"{part}: {name} is {state[name].dtype} in {path} but the model holds {tensor.dtype}; "
                                  "the file was not written by this model's save_pretrained: retrain or restore it")
        if state[name].is_floating_point() and not torch.isfinite(state[name]).all():
            raise CheckpointError(f"{part}: {name} in {path} holds NaN or infinite values (a run that diverged, or "
                                  "a damaged file); retrain that stage or restore the file")
    model.load_state_dict(state, strict=True)


def _check_shapes(expected: dict[str, tuple], found: dict[str, tuple], part: str) -> None:
    """The weights a config builds (``expected``, name -> shape) against a file's; a CheckpointError naming the
    first difference, in the model's order."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise CheckpointError(f"{part}: weights do not fit config.json ({detail}); the files come from different runs")
    for name, shape in expected.items():
        if found[name] != shape:
            raise CheckpointError(f"{part}: weights do not fit config.json: {name} is {found[name]} but the config "
                                  f"builds {shape}; the files come from different runs")


def _check_size(model_cls: Callable[[Any], torch.nn.Module], config: Any, path: Path, part: str) -> None:
    """Before a real model is allocated: the one ``config`` builds, made on the meta device (no memory), must fit
    the shapes in the weights file's header, and ask for no more than MAX_BUFFER_ELEMENTS in other buffers. A
    config.json edited to 10^10 codes is refused here, instead of allocating 300 GB.

    The meta build costs seconds (its first use imports sympy), so it runs only for a config with a number larger
    than every side of every tensor in the file, as a size nobody trained would be: the configs of real runs
    (sides of 64 to 1024, counts of layers and windows below them) load without it.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{part}: {path} is damaged or truncated ({e}); retrain or restore it") from None
    largest_side = max((side for shape in found.values() for side in shape), default=0)
    if max(_integers(dataclasses.asdict(config)), default=0) <= largest_side:
        return
    with torch.device("meta"), _module_budget(MODULES_PER_TENSOR * len(found) + 64, part, len(found)):
        shell = _build(model_cls, config, part)
    expected = shell.state_dict()
    _check_shapes({k: tuple(v.shape) for k, v in expected.items()}, found, part)
    others = sum(b.numel() for name, b in shell.named_buffers() if name not in expected)
    if others > MAX_BUFFER_ELEMENTS:
        raise CheckpointError(f"{part}: config.json asks for {others:.3g} elements of buffers beside its weights (at "
                              f"most {MAX_BUFFER_ELEMENTS:.3g}); restore it from the run or retrain")


class _module_budget:
    """While active, this thread may register at most ``limit`` submodules: a config asking for 2**31 layers is
    refused in a moment instead of building them (even on the meta device every module costs time and memory)."""

    _local = threading.local()

    def __init__(self, limit: int, part: str, tensors: int):
        self.limit, self.part, self.tensors, self.count = limit, part, tensors, 0

    def __enter__(self) -> None:
        self._local.budget = self
        self.handle = torch.nn.modules.module.register_module_module_registration_hook(self._count)

    def __exit__(self, *exc) -> None:
        self.handle.remove()
        self._local.budget = None

    def _count(self, module, name, submodule) -> None:
        if getattr(self._local, "budget", None) is not self:  # another thread's model
            return None
        self.count += 1
        if self.count > self.limit:
            raise CheckpointError(f"{self.part}: config.json builds more than {self.limit} modules, for a weights file "
                                  f"of {self.tensors} tensors; restore it from the run or retrain")
        return None


def _integers(value: Any) -> list[int]:
    """Every integer in a config's fields, lists included (bools left out): the sizes and counts."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in _integers(v)]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _integers(v)]
    return [value] if isinstance(value, int) and not isinstance(value, bool) else []


def _build(model_cls: Callable[[Any], torch.nn.Module], config: Any, part: str) -> torch.nn.Module:
    """``model_cls(config)``; a config whose values its dataclass let through but a layer refuses (a dropout of 2,
    channels that groups do not divide) is a CheckpointError."""
    try:
        return model_cls(config)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - torch's layers refuse bad sizes with several exception types
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{part}: config.json does not build a model ({type(e).__name__}: {text[:150]}); "
                              "restore it from the run or retrain") from None


def load_pretrained(
    model_cls: Callable[[Any], torch.nn.Module], config_cls: type, directory: str | Path, part: str
) -> torch.nn.Module:
    """Build ``model_cls(config)`` from ``directory/config.json`` and load its weights, in eval mode."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{part}: {directory} is not a directory; train that stage first")
    config = load_config(config_cls, directory, part)
    if (directory / WEIGHTS_NAME).is_file():  # else load_weights says it is missing
        _check_size(model_cls, config, directory / WEIGHTS_NAME, part)
    model = _build(model_cls, config, part)
    load_weights(model, directory / WEIGHTS_NAME, part)
    return model.eval()


# The weights' metadata key under which a part records the digest of the tokenizer it was trained with.
TOKENIZER_DIGEST = "tokenizer_sha256"


def file_digest(path: str | Path) -> str:
    """The first 16 hex digits of a file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def check_tokenizer_digest(tokenizer_path: str | Path, weights_path: str | Path, part: str) -> None:
    """A CheckpointError where ``part``'s weights record the digest of another tokenizer than ``tokenizer_path``
    (one of the same vocabulary size from another run loads, and draws garbage). Weights without the record
    (runs from before it) pass."""
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            recorded = (f.metadata() or {}).get(TOKENIZER_DIGEST)
    except (SafetensorError, OSError, ValueError):
        return  # loading the weights says what is wrong with them
    if recorded is not None and recorded != file_digest(tokenizer_path):
        raise CheckpointError(f"tokenizer does not fit {part}: {tokenizer_path} is not the tokenizer {part} was "
                              f"trained with (digest {file_digest(tokenizer_path)}, not {recorded}); put the run's own "
                              "tokenizer.model back")


def save_torch(obj: Any, path: str | Path) -> None:
    """Save tensors-and-primitives state (optimizer, RNG) with torch.save, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # through a Python file, so that a full disk raises OSError (as its cause)
            torch.save(obj, f)

    atomic_write(path, write)


def load_torch(path: str | Path, part: str) -> Any:
    """Load state saved by :func:`save_torch` with ``weights_only=True`` (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{part}: {path} is missing; start without --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for damaged archives
        raise CheckpointError(f"{part}: {path} is damaged ({type(e).__name__}); start without --resume") from None
