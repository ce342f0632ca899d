"""Typed configs: dataclasses loaded from YAML, with ``key=value`` overrides.

Every stage (train, evaluate, tune) declares its config as a (nested) dataclass and loads it with
:func:`load_config`. Unknown or mistyped keys fail with an error that names the key::

    >>> from dataclasses import dataclass, field
    >>> @dataclass
    ... class Optim:
    ...     lr: float = 1e-5
    >>> @dataclass
    ... class Cfg:
    ...     steps: int = 10
    ...     optim: Optim = field(default_factory=Optim)
    >>> load_config(Cfg, None, ["steps=5", "optim.lr=3e-5"])
    Cfg(steps=5, optim=Optim(lr=3e-05))
"""

import dataclasses
import math
import os
import stat
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


#: The exit status of a bad input (argparse's for a usage error); configuration errors are never retried.
BAD_INPUT = 2


def error_line(err: BaseException | str) -> int:
    """Every driver's bad-input exit: ``error: <message>`` as one line on stderr; → :data:`BAD_INPUT`.
    Call it outside the ``except`` block: the exception holds a failed reader's progress bar, which
    clears its line only when released."""
    sys.stderr.flush()
    start = "" if _at_line_start(sys.stderr) else "\n"  # after a progress bar's "\r": a line of its own
    print(start + "error: " + " ".join(str(err).splitlines()), file=sys.stderr, flush=True)
    return BAD_INPUT


def _at_line_start(stream: Any) -> bool:
    """Whether a stream that is a regular file (``2> log``) ends with a newline. A progress bar cleared
    with ``\r`` does not: on a terminal the next line overwrites it, in a file it would share the line.
    Terminals, pipes and anything unreadable count as at the start."""
    try:
        fd = stream.fileno()
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
            return True
        with open(f"/proc/self/fd/{fd}", "rb") as fh:  # stderr itself is opened write-only
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"
    except (OSError, ValueError, AttributeError):  # no fileno (captured), no /proc: leave it as it is
        return True


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _union_name(args: tuple[Any, ...]) -> str:
    """What a union accepts, in words: ``one of ['cls', 'mean'] or null``, ``an int or null``.

    >>> _union_name((typing.Literal["cls", "mean"], type(None)))
    "one of ['cls', 'mean'] or null"
    >>> _union_name((int, str))
    'an int or a str'
    """
    literals = [v for a in args if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)]
    parts = [f"one of {literals}"] if literals else []
    for arg in args:
        if arg is not type(None) and typing.get_origin(arg) is not typing.Literal:
            name = _type_name(arg)
            parts.append(f"{'an' if name[:1] in 'aeiou' else 'a'} {name}")
    if type(None) in args:
        parts.append("null")
    return " or ".join(parts)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [arg for arg in args if arg is not type(None)]
        for arg in members:
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                # One member: its more specific error (a list item, a section key, a NaN) says more.
                if len(members) == 1 and str(err) != f"{key}: {value!r} is not {_union_name((arg,))}":
                    raise
        raise ConfigError(f"{key}: {value!r} is not {_union_name(args)}")
    if origin is typing.Literal:
        if isinstance(value, bool) and str(value).lower() in args:  # YAML read a choice "true"/"false" as a bool
            return str(value).lower()
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        ktp, vtp = args if args else (Any, Any)
        return {_coerce(k, ktp, key): _coerce(v, vtp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: {value!r} is not a bool")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not an int")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: {value!r} is not an int")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not a float")
        number = None
        if isinstance(value, (int, float)):
            try:
                number = float(value)
            except OverflowError:  # an int beyond float range
                number = math.inf
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: {value!r} is not a float")
        # No float key of any config means anything at NaN or ±inf (YAML reads `.nan`, `.inf`, `1e999`
        # as such): a NaN slips through every `x < 0` check and trains on silently. Refused here, once,
        # for every key; none needs them today.
        if not math.isfinite(number):
            raise ConfigError(f"{key}: {number} is not a finite number")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: {value!r} is not a string")
    return value


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (known keys of {prefix.rstrip('.') or cls.__name__}: "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    # A section's checks (validate(), or __post_init__ where a directly built object must be checked too)
    # name keys relative to the section; the full path the user typed is only known here.
    try:
        obj = cls(**kwargs)
        validate = getattr(obj, "validate", None)
        if callable(validate):
            validate()
    except ConfigError as err:
        raise ConfigError(f"{prefix}{err}") from None
    return obj


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def override(cfg: T, params: dict[str, Any] | list[str], prefix: str = "") -> T:
    """A copy of ``cfg`` with dotted-key ``params`` applied, type-checked and validated like a loaded file.

    ``params`` is a mapping (``{"sampler.alpha": 0.25}``, as a Tune trial gets it) or ``key=value``
    strings. ``prefix`` is where ``cfg`` sits in the user's config, so an error names the key the user
    typed::

        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Sampler:
        ...     alpha: float = 0.5
        >>> override(Sampler(), {"alpha": 0.25})
        Sampler(alpha=0.25)
        >>> override(Sampler(), ["alpah=1"], prefix="train.sampler.")
        Traceback (most recent call last):
        ...
        hbt_ray.config.ConfigError: unknown config key train.sampler.alpah (known keys of train.sampler: alpha)
    """
    if isinstance(params, dict):
        tree: dict[str, Any] = {}
        for key, value in params.items():
            _set_dotted(tree, key, value)
    else:
        tree = parse_overrides(params)
    return _build(type(cfg), _merge(to_dict(cfg), tree), prefix=prefix)


def config_keys(cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """Every dotted key of a config dataclass with its type and default (for ``--help``).

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Cfg:
    ...     steps: int = 10
    >>> config_keys(Cfg)
    [('steps', 'int', 10)]
    """
    out: list[tuple[str, str, Any]] = []
    obj = cls()
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += config_keys(type(value), f"{prefix}{f.name}.")
        else:
            tp = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            out.append((f"{prefix}{f.name}", str(tp), value))
    return out


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c=x,y"]`` → nested dict; values are parsed as YAML scalars (``1e-5``, ``true``, ``[1,2]``)."""
    tree: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


#: Set (to 1) by a driver whose stderr is not a terminal (a log file, CI, ``ray job submit``), and passed
#: to Ray's workers: progress bars are then off everywhere, since in a file each update is a new line.
NO_BARS_ENV = "HBT_NO_PROGRESS_BARS"


def bars_off(wanted: bool = True) -> bool:
    """tqdm's ``disable``: a bar shows only when it is ``wanted`` and the driver writes to a terminal.

    >>> import os; os.environ[NO_BARS_ENV] = "1"; (bars_off(True), bars_off(False))
    (True, True)
    >>> del os.environ[NO_BARS_ENV]; bars_off(True)
    False
    """
    return not wanted or os.environ.get(NO_BARS_ENV) == "1"


def note_terminal() -> None:
    """Called by every driver before it starts work: no progress bars when stderr is not a terminal."""
    if not sys.stderr.isatty():
        os.environ[NO_BARS_ENV] = "1"
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading / saving bars


#: The shipped configs (package data): ``--config`` finds them by name from any directory.
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """``path`` if it exists; else the shipped config it names (``train_tiny``, ``train_tiny.yaml`` or
    ``hbt_ray/configs/train_tiny.yaml`` from another directory); else ``path`` (read_yaml says it is missing).

        >>> shipped = (CONFIGS_DIR / "train_tiny.yaml").resolve()
        >>> resolve_config_path("hbt_ray/configs/train_tiny.yaml").resolve() == shipped == resolve_config_path("train_tiny")
        True
    """
    given = Path(path)
    if given.exists():
        return given
    if given.parent == Path(".") or given.parent.parts[-2:] == ("hbt_ray", "configs"):
        for name in (given.name, f"{given.name}.yaml"):
            if (CONFIGS_DIR / name).is_file():
                return CONFIGS_DIR / name
    return given


def with_bases(data: dict[str, Any], source: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """``data`` with every ``base: FILE`` key (at the top or in any section) replaced by that file's
    content, merged first: the rest of the mapping overrides it. FILE is relative to the file that names
    it, or a shipped config's name; a base may name its own base. Errors name the file and the key::

        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "recipe.yaml").write_text("optim: {lr: 7.0e-5, warmup_steps: 0}\\n")
        >>> with_bases({"train": {"base": "recipe.yaml", "optim": {"lr": 1e-4}}}, d / "run.yaml")
        {'train': {'optim': {'lr': 0.0001, 'warmup_steps': 0}}}
    """
    out: dict[str, Any] = {}
    for key, value in data.items():
        out[key] = with_bases(value, source, _chain) if isinstance(value, dict) else value
    if "base" not in out:
        return out
    name = out.pop("base")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source}: base: {name!r} is not a config file name")
    given = Path(name).expanduser()
    path = given if given.is_absolute() else source.parent / given
    path = path if path.exists() else resolve_config_path(given)
    chain = (*_chain, source.resolve())
    if path.resolve() in chain:
        raise ConfigError(f"{source}: base: {name} includes itself ({' → '.join(p.name for p in chain)})")
    return _merge(with_bases(read_yaml(path), path, chain), out)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {raw[err.start]:#04x} on line {line}); save the file as UTF-8"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(err).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> T:
    """Build ``cls`` from defaults ← ``base`` dict ← YAML file ← ``key=value`` overrides."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        path = resolve_config_path(path)
        try:
            data = _merge(data, with_bases(read_yaml(path), Path(path)))
        except ConfigError as err:
            raise ConfigError(str(err)) from None
    data = _merge(data, parse_overrides(overrides))
    if path is not None:
        try:
            return _build(cls, data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    return _build(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (for logging, W&B, YAML dumps)."""
    return dataclasses.asdict(cfg)


def flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys (the run config's form)::

    >>> flat({"sampler": {"alpha": 0.5}, "seed": 1})
    {'sampler.alpha': 0.5, 'seed': 1}
    """
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differing_keys(then: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """The keys of two flat records whose values differ (a key only one has counts), sorted::

    >>> differing_keys({"optim.lr": 0.001, "run.seed": 0}, {"optim.lr": 0.0005, "run.seed": 0, "x": 1})
    ['optim.lr', 'x']
    """
    missing = object()
    return sorted(k for k in set(then) | set(now) if then.get(k, missing) != now.get(k, missing))


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
