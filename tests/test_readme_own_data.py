"""The README's "your own data in three commands" run as written (prepare, train, evaluate), on a small
pairs file cut from the real DDTP data; only the model, the batch and the run's length are made test-sized."""

from __future__ import annotations

import gzip
import json
import re
import shlex
from pathlib import Path

import pytest

from hbt_ray.data.__main__ import main as data_main
from hbt_ray.evaluate.__main__ import main as evaluate_main
from hbt_ray.train.__main__ import main as train_main

ROOT = Path(__file__).resolve().parents[1]
#: appended to the README's train command: the tiny model, a batch the small file fills and a few steps,
#: the rest as written
TEST_SIZED = ["model.name=tiny", "model.freeze_layers=0", "sampler.batch_size=16", "run.epochs=null",
              "run.max_steps=4", "run.eval_every=2",
              "run.num_workers=1", "run.checkpoint_every=0", "run.progress=false", "eval.show_progress=false"]  # fmt: skip


def readme_commands() -> list[list[str]]:
    """The commands of the README's own-data section, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own data in three commands", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def _pairs_file(shared_data: Path, path: Path, groups: range, langs=("en", "de", "fr")) -> None:
    seen: list[str] = []
    with gzip.open(shared_data / "ddtp" / "pairs.jsonl.gz", "rt") as f, path.open("w") as out:
        for line in f:
            record = json.loads(line)
            if record["group_id"] not in seen:
                seen.append(record["group_id"])
            if len(seen) > groups.stop:
                break
            if len(seen) - 1 in groups and record["lang"] in langs:
                out.write(json.dumps({k: record[k] for k in ("group_id", "lang", "query", "passage")}) + "\n")


@pytest.mark.slow
def test_the_readme_own_data_commands_work_as_written(tmp_path, monkeypatch, ray_local, shared_data, capsys):
    commands = readme_commands()
    assert [c[:3] for c in commands] == [["python", "-m", "hbt_ray.data"], ["python", "-m", "hbt_ray.train"],
                                         ["python", "-m", "hbt_ray.evaluate"]]  # fmt: skip
    _pairs_file(shared_data, tmp_path / "my_pairs.jsonl", range(0, 120))
    _pairs_file(shared_data, tmp_path / "my_dev.jsonl", range(120, 160))
    monkeypatch.chdir(tmp_path)  # the README's relative paths, as a user in their own folder
    prepare, train, evaluate = ([str(ROOT / a) if a.startswith("hbt_ray/configs/") else a for a in c[3:]]
                                for c in commands)  # fmt: skip

    assert data_main(prepare) == 0
    assert "en" in capsys.readouterr().out and (tmp_path / "runs" / "my-shards" / "manifest.json").exists()
    assert train_main([*train, *TEST_SIZED]) == 0, capsys.readouterr().err[-3000:]
    steps = [json.loads(x) for x in (tmp_path / "runs" / "mine" / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert (tmp_path / "runs" / "mine" / "model" / "modules.json").exists()
    assert (tmp_path / "runs" / "mine" / "model_tuned" / "modules.json").exists()  # the recipe's WiSE-FT
    result = evaluate_main(evaluate)
    summary = json.loads((tmp_path / "runs" / "mine-eval" / "eval.json").read_text())["summary"]
    for key in ("mono_map", "cross_map", "multi_map", "bias"):
        assert isinstance(summary[key], float), (key, summary)
    assert result.summary["mono_map"] == summary["mono_map"]
    assert 0.0 < summary["mono_map"] <= 1.0
