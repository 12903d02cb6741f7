"""The export stage on a micro compressed family: stock Qwen3 members, manifest, generation configs,
GGUF files.

Oracle: plain transformers (`AutoModelForCausalLM` / `AutoTokenizer`, no ruyi_model code involved in
loading) must load every exit_<d>/ and generate exactly what the family member generates, and load
every exit_<d>/model-<dtype>.gguf alone (its own config, weights and tokenizer) with logits close to the
member's; the manifest hashes are recomputed here from the files.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from test_evaluate import DAE_EXIT, EXITS, build_workspace


@pytest.fixture(scope="module")
def exported(session_tmp, tmp_path_factory):
    from tasks.export import main

    root = build_workspace(session_tmp, tmp_path_factory.mktemp("export") / "ws", compressed=True)
    assert main(["--params", str(root / "params.yaml")]) == 0
    return root


def test_metrics_and_manifest(exported):
    root = exported
    out = root / "artifacts/export"
    m = json.loads((root / "metrics/export.json").read_text())
    manifest_bytes = (out / "manifest.json").read_bytes()
    assert m["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    manifest = json.loads(manifest_bytes)
    assert m["members"] == EXITS
    total = 0
    for rel, meta in manifest["files"].items():
        data = (out / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"] and len(data) == meta["bytes"]
        total += len(data)
    assert m["total_bytes"] == total
    for d in EXITS:
        # `bytes` is the stock checkpoint's; the GGUF files are counted apart
        files = [p for p in (out / f"exit_{d}").rglob("*") if p.is_file() and p.suffix != ".gguf"]
        assert m[f"exit_{d}"]["bytes"] == sum(p.stat().st_size for p in files)
        assert m[f"exit_{d}"]["max_abs_logit_diff"] <= 1e-4
    assert m["family_bytes"] == sum(p.stat().st_size for p in (out / "family").rglob("*") if p.is_file())
    assert not list(root.glob("artifacts/.export*")), "temporary export directories left behind"
    assert (root / "plots/export/sizes.png").stat().st_size > 0
    assert (root / "plots/export/sizes.csv").read_text().count("\n") == len(EXITS) + 1


def test_members_load_with_plain_transformers_and_generate_like_the_family(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.core.artifacts import load_family

    root = exported
    family, _ = load_family(root / "artifacts/compress")
    m = json.loads((root / "metrics/export.json").read_text())
    for d in EXITS:
        path = root / f"artifacts/export/exit_{d}"
        config = json.loads((path / "config.json").read_text())
        assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
        stock = AutoModelForCausalLM.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert stock.generation_config.eos_token_id == im_end == m["eos_token_id"]
        assert stock.generation_config.pad_token_id == tokenizer.pad_token_id == m["pad_token_id"]
        assert m[f"exit_{d}"]["params"] == stock.num_parameters()
        # Only the DaE member was decomposed; its export is dense again (stock Qwen3 has no low-rank layers).
        assert any(k.startswith(f"exits.{d}.") for k in family.config.lowrank_ranks) == (d == DAE_EXIT)
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Tom has 3 apples and gets 4 more."}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        with torch.no_grad():
            # Stock generate with the exported generation config (greedy by default) vs the family member.
            theirs = stock.generate(ids, max_new_tokens=12, do_sample=False)
            ours = family.generate(
                ids,
                max_new_tokens=12,
                do_sample=False,
                exit_layer=d,
                eos_token_id=im_end,
                pad_token_id=tokenizer.pad_token_id,
            )
        assert torch.equal(theirs, ours)


def test_the_dae_member_also_gets_its_factored_copy(exported):
    """The decomposed member's factored copy: evaluate's parameter count, its low-rank modules, the family's
    logits; both counts (and sizes) in the manifest and the metrics; the dense export is unchanged."""
    from ruyi_model import FamilialForCausalLM, LowRankLinear
    from tasks.core.artifacts import load_family
    from tasks.training.heldout import member_params

    root = exported
    out = root / "artifacts/export"
    family, tokenizer = load_family(root / "artifacts/compress")
    manifest = json.loads((out / "manifest.json").read_text())
    m = json.loads((root / "metrics/export.json").read_text())
    assert sorted(p.name for p in out.glob("*_factored")) == [f"exit_{DAE_EXIT}_factored"]
    for d in EXITS:
        member, metrics = manifest["members"][str(d)], m[f"exit_{d}"]
        if d != DAE_EXIT:
            assert member["factored"] is None and "params_factored" not in metrics
            continue
        factored = member["factored"]
        assert factored["dir"] == f"exit_{d}_factored"
        assert metrics["params_factored"] == factored["num_parameters"] == member_params(family, d)
        assert metrics["params"] == member["num_parameters"] > factored["num_parameters"]
        fdir = out / factored["dir"]
        assert metrics["bytes_factored"] == sum(p.stat().st_size for p in fdir.rglob("*") if p.is_file())
        assert metrics["max_abs_logit_diff_factored"] <= 1e-4
        one = FamilialForCausalLM.from_pretrained(fdir).eval()
        assert any(isinstance(mod, LowRankLinear) for mod in one.modules())
        assert one.config.tokenizer_fingerprint == family.config.tokenizer_fingerprint
        ids = torch.tensor([tokenizer("Tom has 3 apples and gets 4 more.")["input_ids"]])
        with torch.no_grad():
            diff = (one(ids).logits - family(ids, exit_layer=d).logits).abs().max()
        assert diff <= 1e-5
    rows = (root / "plots/export/sizes.csv").read_text().splitlines()
    assert rows[0] == "exit,params,bytes,num_hidden_layers,params_factored,bytes_factored"


def test_bad_inputs_are_named(exported, tmp_path, capsys):
    from tasks.export import main

    params = str(exported / "params.yaml")
    empty = tmp_path / "artifacts"
    assert main(["--params", params, "--set", f"paths.artifacts_dir={empty}"]) == 2
    assert str(empty / "compress") in capsys.readouterr().err

    # A checkpoint whose tokenizer lacks <|im_end|>: named, and no export appears.
    broken = tmp_path / "broken"
    shutil.copytree(exported / "artifacts/compress", broken / "compress")
    tok_file = broken / "compress/tokenizer.json"
    tok = json.loads(tok_file.read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|im_end|>"]
    tok["model"]["vocab"].pop("<|im_end|>", None)
    tok_file.write_text(json.dumps(tok))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = broken / "compress" / name
        if path.exists():
            path.write_text(path.read_text().replace('"<|im_end|>"', '"<|im_start|>"'))
    assert main(["--params", params, "--set", f"paths.artifacts_dir={broken}"]) == 2
    err = capsys.readouterr().err
    assert str(broken / "compress") in err and "<|im_end|>" in err
    assert not (broken / "export").exists()


def test_the_router_is_shipped_and_must_belong_to_the_family(exported, tmp_path, capsys):
    from tasks.export import main

    out = exported / "artifacts/export"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["router"] == "router.json" and "router.json" in manifest["files"]
    shipped = (out / "router.json").read_bytes()
    assert shipped == (exported / "artifacts/route/router.json").read_bytes()
    m = json.loads((exported / "metrics/export.json").read_text())
    assert m["router"]["threshold"] == json.loads(shipped)["threshold"]

    params = str(exported / "params.yaml")
    arts = tmp_path / "arts"
    shutil.copytree(exported / "artifacts/compress", arts / "compress")
    assert main(["--params", params, "--set", f"paths.artifacts_dir={arts}"]) == 2
    assert f"router not found at {arts / 'route' / 'router.json'}" in capsys.readouterr().err
    # a router calibrated on other weights (its check prompt's features differ) is refused
    router = json.loads(shipped)
    router["check"]["features"] = [v + 0.5 for v in router["check"]["features"]]
    (arts / "route").mkdir()
    (arts / "route/router.json").write_text(json.dumps(router))
    assert main(["--params", params, "--set", f"paths.artifacts_dir={arts}"]) == 2
    err = capsys.readouterr().err
    assert "router.json: cannot ship this router" in err and "other weights" in err
    assert not (arts / "export").exists()


def test_every_member_is_exported_as_gguf_and_loads_back_in_transformers(exported, tmp_path):
    """params.yaml's export.gguf_dtypes ([f32, q8_0]): exit_<d>/model-<dtype>.gguf for every member (the
    DaE member's from its dense export), listed with its sha256 and dtype; loaded alone by transformers'
    GGUF loader its logits match the stock member (f32 to 1e-4; q8_0 within the stated relative bound)
    and its tokenizer encodes like the member's. The stock directory still loads as before."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tasks.export import GGUF_REL_BOUND

    root = exported
    out = root / "artifacts/export"
    manifest = json.loads((out / "manifest.json").read_text())
    m = json.loads((root / "metrics/export.json").read_text())
    assert manifest["gguf_dtypes"] == m["gguf_dtypes"] == ["f32", "q8_0"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.gguf")) == sorted(
        f"exit_{d}/model-{dt}.gguf" for d in EXITS for dt in ("f32", "q8_0")
    )
    text = "Tom has 3 apples and gets 4 more. #### 7"
    for d in EXITS:
        member_dir = out / f"exit_{d}"
        stock = AutoModelForCausalLM.from_pretrained(member_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(member_dir)
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        for dtype in ("f32", "q8_0"):
            rel = f"exit_{d}/model-{dtype}.gguf"
            assert manifest["members"][str(d)]["gguf"][dtype] == rel
            data = (out / rel).read_bytes()
            assert manifest["files"][rel] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            got = m[f"exit_{d}"]["gguf"][dtype]
            assert got["file"] == rel and got["sha256"] == manifest["files"][rel]["sha256"]
            assert got["bytes"] == len(data)
            if dtype == "f32":
                assert got["max_abs_logit_diff"] <= 1e-4
            else:
                assert 0 < got["rel_logit_diff"] <= GGUF_REL_BOUND["q8_0"]
            reader = gguf.GGUFReader(out / rel)
            assert reader.fields["general.architecture"].contents() == "qwen3"
            want_type = gguf.GGMLQuantizationType.F32 if dtype == "f32" else gguf.GGMLQuantizationType.Q8_0
            assert {t.name: t for t in reader.tensors}["blk.0.ffn_down.weight"].tensor_type == want_type
            # An independent reload: the file alone in a directory, config from the member (head_dim).
            alone = tmp_path / f"{d}-{dtype}"
            alone.mkdir()
            (alone / "m.gguf").write_bytes(data)
            g = AutoModelForCausalLM.from_pretrained(
                alone, gguf_file="m.gguf", config=AutoConfig.from_pretrained(member_dir)
            ).eval()
            assert (
                AutoTokenizer.from_pretrained(alone, gguf_file="m.gguf")(text)["input_ids"] == ids[0].tolist()
            )
            with torch.no_grad():
                want, have = stock(ids).logits, g(ids).logits
            err = float((have - want).abs().max())
            assert err <= (1e-4 if dtype == "f32" else GGUF_REL_BOUND["q8_0"] * float(want.abs().max()))


def test_a_failed_gguf_check_publishes_nothing(exported, tmp_path, capsys, monkeypatch):
    """A q8_0 bound below the measured error: exit 2 naming the GGUF file; no export appears."""
    import tasks.export
    from tasks.export import main

    arts = tmp_path / "artifacts"
    for stage in ("compress", "route"):
        shutil.copytree(exported / "artifacts" / stage, arts / stage)
    monkeypatch.setattr(tasks.export, "GGUF_REL_BOUND", {"f16": 1e-9, "q8_0": 1e-9})
    assert main(["--params", str(exported / "params.yaml"), "--set", f"paths.artifacts_dir={arts}"]) == 2
    err = capsys.readouterr().err
    assert f"exit_{EXITS[0]}/model-q8_0.gguf: logits differ" in err and "bound for q8_0" in err
    assert sorted(p.name for p in arts.iterdir()) == ["compress", "route"]

    # export.gguf_dtypes: [] writes no GGUF file (and checks none)
    assert (
        main(
            [
                "--params",
                str(exported / "params.yaml"),
                "--set",
                f"paths.artifacts_dir={arts}",
                "--set",
                f"paths.metrics_dir={tmp_path / 'metrics'}",
                "--set",
                f"paths.plots_dir={tmp_path / 'plots'}",
                "--set",
                "export.gguf_dtypes=[]",
            ]
        )
        == 0
    )
    assert not list((arts / "export").rglob("*.gguf"))
    assert json.loads((arts / "export/manifest.json").read_text())["gguf_dtypes"] == []
