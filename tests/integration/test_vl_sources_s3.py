"""A user image-text source on a real S3 server (SeaweedFS): the JSONL and the images it names by
relative key are read through the project's S3 client; a missing image is quarantined, naming it."""

from __future__ import annotations

import base64
import io
import json

from PIL import Image
from s3server import s3_server  # noqa: F401  (module-scoped real S3 server fixture)

from data_contracts.context import ContractContext
from data_contracts.vl import ImageBounds
from tasks.data.vlsources import load_vl_source


def test_s3_source_with_relative_image_keys(s3_server, monkeypatch, tmp_path):  # noqa: F811
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, format="PNG")
    client = s3_server.client()
    bucket = s3_server.create_bucket("vl-data")
    client.put_object(Bucket=bucket, Key="in/img/a.png", Body=buf.getvalue())
    rows = [
        {"image": "img/a.png", "question": "What colour is the image?", "answer": "red"},
        {"image": "img/gone.png", "question": "Q?", "answer": "a"},
    ]
    client.put_object(
        Bucket=bucket, Key="in/vqa.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode()
    )
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    result = load_vl_source(
        "s3://vl-data/in/vqa.jsonl", ContractContext(tmp_path / "contracts"), ImageBounds()
    )
    assert [r["question"] for r in result.rows] == ["What colour is the image?"]
    assert base64.b64decode(result.rows[0]["image"].split(",", 1)[1]) == buf.getvalue()
    [bad] = result.quarantined
    assert bad["where"] == "s3://vl-data/in/vqa.jsonl:2" and bad["reasons"][0]["column"] == "_image_error"
    assert "cannot read image file 'img/gone.png'" in bad["reasons"][0]["detail"]
