from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from farm.schemas import all_schemas, render

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"


def test_schema_files_match_code() -> None:
    for name, schema in all_schemas().items():
        path = SCHEMAS / name
        assert path.exists(), f"{path} missing: run `farm schemas`"
        assert path.read_text() == render(schema), f"{name} is stale: run `farm schemas`"


def test_schemas_accept_examples() -> None:
    schemas = all_schemas()
    jsonschema.validate(
        {"id": "a-1", "portrait": "s3://b/p.png", "prompt": "x", "height": 64, "lang": "en"},
        schemas["manifest.schema.json"],
    )
    bad = {"id": "has space", "portrait": "p", "prompt": "x"}
    assert list(jsonschema.Draft202012Validator(schemas["manifest.schema.json"]).iter_errors(bad))
    jsonschema.validate({"id": "a", "status": "ok", "error_code": None}, schemas["result.schema.json"])
    for path in sorted(Path(__file__).resolve().parents[1].joinpath("jobs").glob("*.yaml")):
        import yaml

        jsonschema.validate(yaml.safe_load(path.read_text()), schemas["job.schema.json"])
    assert json.loads(render(schemas["job.schema.json"]))["title"] == "Lynx Farm job spec"
