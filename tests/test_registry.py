"""The registry: what is served (best, pinned), promote / rollback / unpin with their history, writers in
parallel, and the command line over it."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pandas as pd
import pytest

from digits_ray.cli import main as cli_main
from digits_ray.config import TrainConfig
from digits_ray.models import artifact, registry


def tiny_entry(val_accuracy: float):
    """A build function that writes a real (untrained) artifact with the given validation accuracy."""
    def build(folder: Path) -> dict:
        from digits_ray.models.zoo import build_model

        metadata = {"model": "dense", "model_params": {}, "train_config": TrainConfig().to_dict(),
                    "data_md5": {}, "versions": {}, "training_seconds": 0.0,
                    "validation": {"best_epoch": 1, "val_accuracy": val_accuracy, "val_loss": 0.1}}
        artifact.write_artifact(folder, build_model("dense", {"hidden": 8}), metadata,
                                pd.DataFrame({"epoch": [1], "val_accuracy": [val_accuracy]}))
        return {"model": "dense", "val_accuracy": val_accuracy}
    return build


def served(folder: Path) -> str:
    return registry.served_entry(folder).name


def test_a_pinned_entry_stays_served_and_rollback_goes_back(tmp_path):
    a = registry.publish(tmp_path, "a", tiny_entry(0.90)).name
    b = registry.publish(tmp_path, "b", tiny_entry(0.95)).name
    assert served(tmp_path) == b  # nothing pinned: the best
    registry.promote(tmp_path, a)
    assert served(tmp_path) == a
    c = registry.publish(tmp_path, "c", tiny_entry(0.99)).name  # better, but a is pinned
    index = registry.read_index(tmp_path)
    assert (index["best"], index["pinned"], served(tmp_path)) == (c, a, a)

    event = registry.rollback(tmp_path)  # back to what was served before the promotion
    assert (event["served"], event["previous"], served(tmp_path)) == (b, a, b)
    registry.rollback(tmp_path)  # and a second rollback undoes the first
    assert served(tmp_path) == a
    registry.unpin(tmp_path)
    assert served(tmp_path) == c
    events = [(e["event"], e["served"]) for e in registry.read_index(tmp_path)["history"]]
    assert events == [("publish", a), ("publish", b), ("promote", a), ("rollback", b), ("rollback", a),
                      ("unpin", c)]
    assert all("@" in e["by"] and e["at"] for e in registry.read_index(tmp_path)["history"])


def test_bad_registry_actions_say_what_is_wrong(tmp_path):
    with pytest.raises(registry.RegistryError, match="no published model yet"):
        registry.served_entry(tmp_path)
    registry.publish(tmp_path, "a", tiny_entry(0.90))
    with pytest.raises(registry.RegistryError, match="'nope' is not an entry.*entries: a"):
        registry.promote(tmp_path, "nope")
    with pytest.raises(registry.RegistryError, match="nothing to roll back to"):
        registry.rollback(tmp_path)
    with pytest.raises(registry.RegistryError, match="nothing is pinned"):
        registry.unpin(tmp_path)
    with pytest.raises(registry.RegistryError, match="neither a model folder .* nor an entry"):
        registry.resolve_model("missing", tmp_path)
    assert registry.resolve_model("a", tmp_path) == (tmp_path / "a").resolve()


def _publish_many(folder: str, worker: int, count: int) -> None:
    for i in range(count):
        registry.publish(folder, "same-name", tiny_entry(0.5 + worker / 10 + i / 1000))
        if i == count // 2:
            registry.promote(folder, registry.read_index(folder)["best"])


def test_two_writers_at_once_lose_nothing(tmp_path):
    """Two processes publish entries of the same name and promote while the other writes."""
    count = 4
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_publish_many, args=(str(tmp_path), w, count)) for w in (1, 2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
        assert w.exitcode == 0
    index = registry.read_index(tmp_path)
    assert len(index["entries"]) == 2 * count  # no entry lost, none overwritten
    assert sorted(p.name for p in tmp_path.iterdir() if artifact.is_artifact(p)) == sorted(index["entries"])
    assert index["best"] == max(index["entries"], key=lambda n: index["entries"][n]["val_accuracy"])
    assert sum(e["event"] == "promote" for e in index["history"]) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".staging")]


def test_the_registry_command_line(tmp_path, capsys):
    a = registry.publish(tmp_path, "a", tiny_entry(0.90)).name
    b = registry.publish(tmp_path, "b", tiny_entry(0.95)).name
    assert cli_main(["registry", "list", "--registry", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert f"{b}" in listing and "served,best" in listing and "95.00%" in listing
    assert cli_main(["registry", "promote", a, "--registry", str(tmp_path)]) == 0
    assert f"serves {a} (was {b})" in capsys.readouterr().out
    assert cli_main(["registry", "rollback", "--registry", str(tmp_path)]) == 0
    assert served(tmp_path) == b
    with pytest.raises(SystemExit) as exit_:
        cli_main(["registry", "promote", "--registry", str(tmp_path)])
    assert exit_.value.code == 2 and "needs the ENTRY" in capsys.readouterr().err


def test_registry_names_the_best_by_validation_and_never_keeps_a_half_entry(tmp_path):
    with pytest.raises(registry.RegistryError, match="no published model yet"):
        registry.best_entry(tmp_path)
    first = registry.publish(tmp_path, "a", tiny_entry(0.90))
    assert registry.best_entry(tmp_path) == first and artifact.is_artifact(first)

    def fails_half_way(folder: Path) -> dict:
        tiny_entry(0.99)(folder)
        (folder / "search").mkdir()
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        registry.publish(tmp_path, "b", fails_half_way)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "a", "index.json"]  # no half entry
    assert registry.read_index(tmp_path)["best"] == "a"

    registry.publish(tmp_path, "c", tiny_entry(0.80))  # worse: published, not best
    assert registry.read_index(tmp_path)["best"] == "a"
    registry.publish(tmp_path, "d", tiny_entry(0.95))
    index = json.loads((tmp_path / registry.INDEX_FILE).read_text())
    assert index["best"] == "d" and set(index["entries"]) == {"a", "c", "d"}
    again = registry.publish(tmp_path, "d", tiny_entry(0.99))  # the name is taken: the entry gets a free one
    assert again.name == "d-2" and artifact.is_artifact(tmp_path / "d")


def test_registry_location_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(registry.REGISTRY_ENV, str(tmp_path / "elsewhere"))
    assert registry.registry_path() == tmp_path / "elsewhere"
    assert registry.registry_path("given") == Path("given")
