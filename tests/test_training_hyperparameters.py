"""One hyperparameter schema, the same limits through every way in.

Each field's values just outside its range (and just inside), generated from the schema's
own types (:class:`locopilot.training.hyperparameters.Hyperparameters`), are sent through
locopilot's job API, OpenAI's (with the official client), a job file, ``locopilot train``'s
flags and ``locopilot jobs submit``'s. A limit that drifted in one of them (a type redeclared
with another bound, a flag with its own range) fails here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec.inspect as mi
import openai
import pytest
from click.testing import CliRunner

from locopilot.cli import cli
from locopilot.cli.options import with_hyperparameters_table
from locopilot.training import jobfile
from locopilot.training.hyperparameters import FIELDS, Hyperparameters
from locopilot.training.trainer import TrainConfig, TrainingRefused
from tests.conftest import Server
from tests.test_cli import make_env

JOBS = "/v1/locopilot/training/jobs"
#: OpenAI's names for locopilot's (the rest are the same).
OPENAI_NAMES = {"epochs": "n_epochs"}


def _bounds(info: mi.Type) -> tuple[list[Any], list[Any]]:
    """(values the type refuses, values it takes), at its limits."""
    match info:
        case mi.Metadata(type=inner):
            return _bounds(inner)
        case mi.UnionType(types=types):
            parts = [_bounds(t) for t in types]
            taken = [v for _, ok in parts for v in ok]
            # A value one member refuses may be another's (none here: auto is text, the rest numbers).
            return [v for bad, _ in parts for v in bad if v not in taken], taken
        case mi.LiteralType(values=values):
            return ["no-such-value"], list(values)
        case mi.NoneType():
            return [], []
        case mi.IntType(ge=ge, le=le, multiple_of=step):
            assert ge is not None and le is not None, "every integer hyperparameter has both limits"
            bad = [ge - 1, le + 1] + ([ge + 1] if step else [])
            return bad, [ge, le]
        case mi.FloatType(ge=ge, gt=gt, le=le, lt=lt):
            if ge is not None:
                bad, good = [ge - 1e-3], [float(ge)]
            else:
                assert gt is not None, "every float hyperparameter has both limits"
                bad, good = [float(gt)], [gt + 1e-6]
            if le is not None:
                return [*bad, le * 1.5], [*good, float(le)]
            assert lt is not None, "every float hyperparameter has both limits"
            return [*bad, float(lt)], [*good, lt - 1e-3]
    raise AssertionError(f"no bounds for {info}")


def cases() -> Iterator[Any]:
    info = mi.type_info(Hyperparameters)
    assert isinstance(info, mi.StructType)
    for field in info.fields:
        bad, good = _bounds(field.type)
        assert bad and good, field.name
        for value in bad:
            yield pytest.param(field.name, value, False, id=f"{field.name}={value!r}-refused")
        for value in good:
            yield pytest.param(field.name, value, True, id=f"{field.name}={value!r}-taken")


def test_every_field_has_cases() -> None:
    assert {case.values[0] for case in cases()} == set(FIELDS)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """No models and no files: a value the schema takes goes on to the job's 404 for its training file."""
    running = Server(tmp_path_factory.mktemp("hyper"), {}).start()
    yield running
    running.stop()


def flag(name: str, value: Any) -> list[str]:
    return [f"--{name.replace('_', '-')}", str(value)]


@pytest.mark.parametrize(("name", "value", "taken"), list(cases()))
def test_the_same_limits_through_every_way_in(
    name: str, value: Any, taken: bool, server: Server, tmp_path: Path
) -> None:
    # locopilot's API: the field is the param.
    native = httpx.post(f"{server.url}{JOBS}", json={"model": "m", "training_file": "file-x", name: value}, timeout=30)
    if taken:
        assert native.status_code == 404 and native.json()["error"]["param"] == "training_file", native.text
    else:
        assert native.status_code == 400, native.text
        assert native.json()["error"]["param"] == name and native.json()["error"]["type"] == "invalid_request_error"

    # OpenAI's, through the official client: the seed is a top-level field, the rest hyperparameters.
    client = server.client()
    where = {"seed": value} if name == "seed" else {"hyperparameters": {OPENAI_NAMES.get(name, name): value}}
    param = "seed" if name == "seed" else f"hyperparameters.{OPENAI_NAMES.get(name, name)}"
    if taken:
        with pytest.raises(openai.NotFoundError) as missing:
            client.fine_tuning.jobs.create(model="m", training_file="file-x", **where)
        assert missing.value.body["param"] == "training_file"  # type: ignore[index]
    else:
        with pytest.raises(openai.BadRequestError) as refused:
            client.fine_tuning.jobs.create(model="m", training_file="file-x", **where)
        assert refused.value.body["param"] == param, refused.value.body  # type: ignore[index]

    # A job file, TOML and JSON.
    (tmp_path / "job.json").write_text(json.dumps({name: value}))
    if taken:
        assert getattr(jobfile.load(tmp_path / "job.json"), name) == value
    else:
        with pytest.raises(jobfile.JobFileInvalid, match=rf"`\$\.{name}`"):
            jobfile.load(tmp_path / "job.json")

    # The built-in trainer's config, as a job's worker receives it.
    paths = {"base_path": "/b", "dataset_path": "/d", "output_path": "/o", "work_dir": "/w"}
    config = TrainConfig(**paths, **{name: value})
    if taken:
        config.check()
    else:
        with pytest.raises(TrainingRefused, match=rf"`\$\.{name}`"):
            config.check()

    # The flags of `locopilot train` and `locopilot jobs submit` (click's usage error, status 2).
    env = make_env(tmp_path)
    (tmp_path / "data.jsonl").write_text("{}\n")
    for args in (
        ["train", "--base", "m", "--dataset", str(tmp_path / "data.jsonl"), *flag(name, value), "--dry-run"],
        [
            "jobs",
            "submit",
            str(tmp_path / "data.jsonl"),
            "--base",
            "m",
            *flag(name, value),
            "--url",
            "http://127.0.0.1:1",
        ],
    ):
        result = CliRunner().invoke(cli, args, env=env)
        invalid = f"Invalid value for '--{name.replace('_', '-')}'"
        if taken:
            assert invalid not in result.output + result.stderr, (args, result.output, result.stderr)
        else:
            assert result.exit_code == 2 and invalid in result.stderr, (args, result.output, result.stderr)


def test_the_learning_rate_after_the_multiplier_is_checked_everywhere(server: Server, tmp_path: Path) -> None:
    """The one rule across fields: learning_rate times learning_rate_multiplier at most 1e-2."""
    too_high = {"learning_rate": 1e-2, "learning_rate_multiplier": 2.0}
    native = httpx.post(f"{server.url}{JOBS}", json={"model": "m", "training_file": "f", **too_high}, timeout=30)
    assert native.status_code == 400 and native.json()["error"]["param"] == "learning_rate_multiplier", native.text
    with pytest.raises(openai.BadRequestError) as refused:
        server.client().fine_tuning.jobs.create(model="m", training_file="f", hyperparameters=too_high)  # type: ignore[arg-type]
    assert refused.value.body["param"] == "hyperparameters.learning_rate_multiplier"  # type: ignore[index]
    result = CliRunner().invoke(
        cli,
        ["train", "--base", "m", "--dataset", "d", "--lr", "1e-2", "--learning-rate-multiplier", "2"],
        env=make_env(tmp_path),
    )
    assert result.exit_code == 2 and "learning_rate_multiplier must be at most 0.01" in result.stderr


def test_flags_are_generated_from_the_fields() -> None:
    """Every field is a flag of both commands, with the field's default."""
    for command in ("train", "submit"):
        group = cli.commands["train"] if command == "train" else cli.commands["jobs"].commands["submit"]  # type: ignore[attr-defined]
        options = {p.name: p for p in group.params}
        for name in FIELDS:
            assert name in options, (command, name)
            assert options[name].default == getattr(Hyperparameters(), name), (command, name)


def test_the_readme_table_is_the_schema() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert with_hyperparameters_table(readme) == readme, "the README's hyperparameters table drifted; run `just docs`"
