"""The evaluate stage and ruyi_model/decoding.py on a micro family, against independent recomputation.

Oracle: each member exported as a stock transformers `Qwen3ForCausalLM` (`ruyi_model.export.
member_to_qwen3`): its loss on independently packed blocks, and its one-prompt-at-a-time greedy
`generate` scored with `tasks.data.mathgen`, must reproduce metrics/eval.json. The micro family is
trained for a few seconds on the eval problems so that some answers are right and some wrong (an
accuracy of 0 everywhere could not catch a scoring bug).

`build_workspace` is shared with tests/test_compress_stage.py and tests/test_export_stage.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

EXITS = [1, 2, 4]
DAE_EXIT = 1


# --- micro workspace (data, tokenizer, trained family) ---------------------------------------
def _problems(n: int, offset: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = 2 + (7 * i + offset) % 9, 1 + (5 * i + 3 * offset) % 8
        q = f"Tom has {a} apples and gets {b} more. How many apples does Tom have?"
        rows.append(
            {
                "id": f"p{offset}-{i}",
                "question": q,
                "solution": f"{a} + {b} = {a + b}\n#### {a + b}",
                "answer": str(a + b),
                "level": 1 + i % 2,
            }
        )
    return rows


def select_problems(n: int, offset: int) -> list[dict]:
    """Problems in select.jsonl format that no other micro file has (another name, another solution
    wording): the healing-decision rows compress reads."""
    return [
        {
            "id": f"s{r['id']}",
            "prompt": r["question"].replace("Tom", "Mia"),
            "response": "Mia: " + r["solution"],
            "answer": r["answer"],
            "level": r["level"],
        }
        for r in _problems(n, offset)
    ]


def _corpus(n: int, offset: int) -> list[dict]:
    words = "the model reads a small book about cats dogs rivers and numbers while the sun sets".split()
    docs = []
    for i in range(n):
        text = " ".join(words[(i * 3 + k + offset) % len(words)] for k in range(40)) + f". Page {i + offset}."
        docs.append({"id": f"d{offset}-{i}", "text": text, "source": "test"})
    return docs


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _train_tokenizer(texts: list[str], out: Path):
    from ruyi_model.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size=360, min_frequency=2)
    tokenizer.save_pretrained(out)
    return tokenizer


def _train_family(tokenizer, sft_rows: list[dict], steps: int):
    """A micro family with DaE blocks on exit 1, trained for a few steps on `sft_rows` (all members)."""
    from ruyi_model import FamilialConfig, FamilialForCausalLM
    from ruyi_model.dae import expand
    from tasks.training.batches import build_sft_examples, fixed_batches

    torch.manual_seed(0)
    cfg = FamilialConfig(
        vocab_size=384,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        max_position_embeddings=256,
        exit_layers=EXITS,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = expand(FamilialForCausalLM(cfg), DAE_EXIT, 2)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    examples = build_sft_examples(tokenizer, sft_rows, 64, "sft")[0]
    batches = fixed_batches(examples, 10, 100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = sum(model(**batch, exit_layer=d).loss for d in EXITS)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _build_base(root: Path) -> None:
    from tasks.core.artifacts import save_family

    eval_rows = _problems(10, 0)
    sft_rows = [
        {
            "id": r["id"],
            "prompt": r["question"],
            "response": r["solution"],
            "answer": r["answer"],
            "level": r["level"],
        }
        for r in eval_rows + _problems(14, 100)
    ]
    val = root / "data" / "validated"
    _write_jsonl(val / "corpus_train.jsonl", _corpus(30, 0))
    _write_jsonl(val / "corpus_val.jsonl", _corpus(12, 50))
    _write_jsonl(val / "sft.jsonl", sft_rows)
    _write_jsonl(
        val / "rl.jsonl",
        [
            {"id": r["id"], "question": r["question"], "answer": r["answer"], "level": r["level"]}
            for r in eval_rows
        ],
    )
    _write_jsonl(val / "eval.jsonl", eval_rows)
    _write_jsonl(val / "select_corpus.jsonl", _corpus(20, 80))
    _write_jsonl(val / "select.jsonl", select_problems(12, 200))
    texts = [d["text"] for d in _corpus(30, 0)] + [r["prompt"] + "\n" + r["response"] for r in sft_rows]
    tokenizer = _train_tokenizer(texts, root / "artifacts" / "tokenizer")
    model = _train_family(tokenizer, sft_rows[: len(eval_rows)], steps=40)
    save_family(model, tokenizer, root / "artifacts" / "rl")
    save_family(without_dae_blocks(model), tokenizer, root / "artifacts" / "family_sft")


def without_dae_blocks(model):
    """The family with the DaE member's blocks removed (every other tensor shared): the member before DaE."""
    from ruyi_model import FamilialConfig, FamilialForCausalLM

    cfg = model.config.to_dict()
    cfg["dae_blocks"] = [0 for _ in cfg["dae_blocks"]]
    base = FamilialForCausalLM(FamilialConfig(**cfg))
    blocks = tuple(
        f"exits.{DAE_EXIT}.layers.{i}." for i in range(1, 1 + model.config.num_dae_blocks(DAE_EXIT))
    )
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(blocks)}
    base.load_state_dict(state, strict=True)
    base.generation_config = model.generation_config
    return base.eval()


def write_params(root: Path, **sections) -> Path:
    """A params file for the micro workspace (paths inside `root`, tiny stage settings)."""
    raw = {
        "seed": 7,
        "paths": {
            k: str(root / v)
            for k, v in (
                ("data_dir", "data"),
                ("artifacts_dir", "artifacts"),
                ("metrics_dir", "metrics"),
                ("plots_dir", "plots"),
                ("reports_dir", "reports"),
            )
        },
        "model": {
            "hidden_size": 48,
            "intermediate_size": 96,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 12,
            "exit_layers": EXITS,
        },
        "compress": {
            "calibration_batches": 2,
            "batch_size": 4,
            "seq_len": 64,
            "heal_steps": 3,
            "loss_batches": 2,
            "solution_rows": 10,  # not a multiple of batch_size: the last batch holds 2
        },
        "route": {
            "num_select": 12,
            "num_problems": 8,
            "max_new_tokens": 12,
            "decode_batch_size": 4,
            "folds": 3,
        },
        "evaluate": {
            "num_problems": 8,
            "max_new_tokens": 20,
            "loss_batches": 2,
            "seq_len": 64,
            "batch_size": 3,
            "decode_batch_size": 3,
            "speed_new_tokens": 4,
            "speed_warmup": 1,
            "speed_repeats": 2,
        },
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def build_workspace(session_tmp: Path, root: Path, compressed: bool = True) -> Path:
    """A micro workspace in `root`: validated data, artifacts/rl (a trained family with DaE blocks on
    exit 1) and, with `compressed`, artifacts/compress (the same family with that member decomposed by
    plain SVD). The trained base is built once per test session and copied."""
    base = session_tmp / "micro-base"
    if not (base / "artifacts" / "rl" / "model.safetensors").exists():
        tmp = session_tmp / "micro-base.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        _build_base(tmp)
        tmp.rename(base)
    shutil.copytree(base, root)
    if compressed:
        from ruyi_model.dae import decompose
        from tasks.core.artifacts import load_family, save_family

        model, tokenizer = load_family(root / "artifacts" / "rl")
        save_family(
            decompose(model, ratio=0.4, calibration=None, exit_layer=DAE_EXIT).model,
            tokenizer,
            root / "artifacts" / "compress",
        )
        write_micro_router(root)
    write_params(root)
    return root


def write_micro_router(root: Path, threshold: float = 0.5) -> Path:
    """artifacts/route/router.json for artifacts/compress, as the route stage writes it but fitted
    directly (probes on the select prompts' features with alternating labels): what export ships."""
    from ruyi_model.decoding import encode_prompts
    from tasks.core.artifacts import load_family
    from tasks.release.router import ROUTER_FILE, build_router, fit_probe, prompt_features

    model, tokenizer = load_family(root / "artifacts" / "compress")
    ids = encode_prompts(tokenizer, [r["prompt"] for r in select_problems(12, 200)])
    x = prompt_features(model, ids, 1)
    labels = np.arange(len(ids)) % 2
    probes = {d: fit_probe(x, labels, 1.0) for d in EXITS[:-1]}
    router = build_router(model, probes, 1, threshold, ids[0])
    path = root / "artifacts" / "route" / ROUTER_FILE
    router.save(path)
    return path


# --- oracle ---------------------------------------------------------------------------------
def stock_member(model, d: int):
    from ruyi_model.export import member_to_qwen3

    q = member_to_qwen3(model, d)
    assert type(q).__name__ == "Qwen3ForCausalLM"
    return q


def stock_loss(q, blocks: torch.Tensor) -> float:
    with torch.no_grad():
        losses = [q(input_ids=b[None], labels=b[None]).loss for b in blocks]
    return float(torch.stack(losses).mean())  # equal-length blocks: mean of means = token mean


def independent_blocks(tokenizer, texts: list[str], seq_len: int, n: int) -> torch.Tensor:
    ids = []
    for t in texts:
        ids += tokenizer.encode(t, add_special_tokens=False) + [
            tokenizer.convert_tokens_to_ids("<|endoftext|>")
        ]
    n = min(n, len(ids) // seq_len)
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def stock_answer(q, tokenizer, question: str, max_new_tokens: int) -> str:
    text = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out = q.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=[im_end],
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


# --- tests ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluated(session_tmp, tmp_path_factory):
    from tasks.evaluate import main

    root = build_workspace(session_tmp, tmp_path_factory.mktemp("evaluate") / "ws")
    assert main(["--params", str(root / "params.yaml")]) == 0
    return root


def _read(root: Path, name: str) -> dict:
    return json.loads((root / "metrics" / name).read_text())


def test_losses_and_params_match_stock_qwen3(evaluated):
    from tasks.core.artifacts import load_family

    root = evaluated
    metrics = _read(root, "eval.json")
    model, tokenizer = load_family(root / "artifacts" / "compress")
    assert metrics["exits"] == EXITS and metrics["checkpoint"] == str(root / "artifacts" / "compress")
    texts = [
        json.loads(line)["text"]
        for line in (root / "data/validated/corpus_val.jsonl").read_text().splitlines()
    ]
    blocks = independent_blocks(tokenizer, texts, 64, 2 * 3)
    assert blocks.shape == (6, 64)
    for d in EXITS:
        m = metrics[f"exit_{d}"]
        q = stock_member(model, d)
        assert m["loss"] == pytest.approx(stock_loss(q, blocks), rel=1e-5, abs=1e-6)
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-9)
        assert m["loss_tokens"] == 6 * 63
        # The stock export multiplies low-rank factors back; the family counts the factors.
        saved = sum(
            mod.in_features * mod.out_features - mod.rank * (mod.in_features + mod.out_features)
            for layer in [*model.member_layers(d), model.exit_head(d)]
            for mod in layer.modules()
            if type(mod).__name__ == "LowRankLinear"
        )
        assert m["params"] == q.num_parameters() - saved
        assert (saved > 0) == (d == DAE_EXIT)
        assert m["layers"] == q.config.num_hidden_layers


def test_solution_loss_matches_stock_qwen3(evaluated):
    from tasks.core.artifacts import load_family

    root = evaluated
    metrics = _read(root, "eval.json")
    model, tokenizer = load_family(root / "artifacts" / "compress")
    rows = [json.loads(line) for line in (root / "data/validated/eval.jsonl").read_text().splitlines()][:8]
    for d in EXITS:
        q = stock_member(model, d)
        total, count = 0.0, 0
        for r in rows:
            prompt = f"<|im_start|>user\n{r['question']}<|im_end|>\n<|im_start|>assistant\n"
            answer = f"{r['solution']}<|im_end|>"  # the "\n" after <|im_end|> is not a target
            p_ids = tokenizer.encode(prompt, add_special_tokens=False)
            a_ids = tokenizer.encode(answer, add_special_tokens=False)
            ids = torch.tensor([p_ids + a_ids])
            labels = torch.tensor([[-100] * len(p_ids) + a_ids])
            with torch.no_grad():
                loss = q(input_ids=ids, labels=labels).loss
            total += float(loss) * len(a_ids)
            count += len(a_ids)
        assert metrics[f"exit_{d}"]["solution_tokens"] == count
        assert metrics[f"exit_{d}"]["solution_loss"] == pytest.approx(total / count, rel=1e-5)


def test_accuracy_matches_one_by_one_stock_decoding(evaluated):
    from tasks.core.artifacts import load_family
    from tasks.data.mathgen import answers_match, extract_answer

    root = evaluated
    metrics = _read(root, "eval.json")
    model, tokenizer = load_family(root / "artifacts" / "compress")
    rows = [json.loads(line) for line in (root / "data/validated/eval.jsonl").read_text().splitlines()][:8]
    generations = [
        json.loads(line) for line in (root / "reports/evaluate/generations.jsonl").read_text().splitlines()
    ]
    assert len(generations) == len(EXITS) * len(rows)
    outcomes = []
    for d in EXITS:
        q = stock_member(model, d)
        correct = [
            answers_match(extract_answer(stock_answer(q, tokenizer, r["question"], 20)), r["answer"])
            for r in rows
        ]
        outcomes += correct
        assert metrics[f"exit_{d}"]["accuracy"] == pytest.approx(sum(correct) / len(rows))
        assert [g["correct"] for g in generations if g["exit"] == d] == correct
    # The check is only meaningful if the micro family gets some answers right and some wrong.
    assert any(outcomes) and not all(outcomes)


def test_per_item_results_are_each_blocks_stock_loss_and_each_problems_verdict(evaluated):
    # reports/evaluate/items.jsonl, what the gates resample: a corpus block's loss is that block's stock
    # Qwen3 loss, a problem's verdict is generations.jsonl's, and together they are eval_quality.json's
    from data_contracts.gates import check_items_match
    from data_contracts.items import read_items
    from tasks.core.artifacts import load_family

    root = evaluated
    path = root / "reports/evaluate/items.jsonl"
    items = read_items(path)
    quality = _read(root, "eval_quality.json")
    check_items_match(items, quality, (str(path), "eval_quality.json"))
    assert items.exits == tuple(EXITS) and len(items.loss_items) == 6 and set(items.tokens) == {63.0}
    model, tokenizer = load_family(root / "artifacts" / "compress")
    texts = [
        json.loads(line)["text"]
        for line in (root / "data/validated/corpus_val.jsonl").read_text().splitlines()
    ]
    blocks = independent_blocks(tokenizer, texts, 64, 6)
    generations = [
        json.loads(line) for line in (root / "reports/evaluate/generations.jsonl").read_text().splitlines()
    ]
    for k, d in enumerate(EXITS):
        q = stock_member(model, d)
        with torch.no_grad():
            stock = [float(q(input_ids=b[None], labels=b[None]).loss) for b in blocks]
        assert items.loss_sums[:, k] / items.tokens == pytest.approx(stock, rel=1e-5, abs=1e-6)
        by_id = {str(g["id"]): g["correct"] for g in generations if g["exit"] == d}
        assert [bool(c) for c in items.correct[:, k]] == [by_id[i] for i in items.accuracy_items]
    # the gates name a per-item file that is not this evaluation's
    other = dict(quality, **{f"exit_{EXITS[0]}": dict(quality[f"exit_{EXITS[0]}"], loss=1.0)})
    with pytest.raises(ValueError, match=r"exit \d+.s per-item losses average .* \(not the same evaluation"):
        check_items_match(items, other, (str(path), "eval_quality.json"))


def test_speed_plot_and_reproducible_quality(evaluated):
    import csv

    from tasks.evaluate import main

    root = evaluated
    metrics, quality, speed = (
        _read(root, "eval.json"),
        _read(root, "eval_quality.json"),
        _read(root, "eval_speed.json"),
    )
    for d in EXITS:
        m = metrics[f"exit_{d}"]
        assert m["tokens_per_s"] > 0 and m["ms_per_token"] == pytest.approx(1000 / m["tokens_per_s"])
        assert m["tokens_per_s"] == speed[f"exit_{d}"]["tokens_per_s"]
        assert len(speed[f"exit_{d}"]["runs_s"]) == 2
        assert {k: v for k, v in m.items() if k not in ("tokens_per_s", "ms_per_token")} == quality[
            f"exit_{d}"
        ]
    assert "tokens_per_s" not in json.dumps(quality)
    assert (root / "plots/evaluate/tradeoff.png").stat().st_size > 1000
    with open(root / "plots/evaluate/tradeoff.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["exit"]) for r in rows] == EXITS
    assert [float(r["accuracy"]) for r in rows] == [metrics[f"exit_{d}"]["accuracy"] for d in EXITS]
    before = (root / "metrics/eval_quality.json").read_bytes()
    assert main(["--params", str(root / "params.yaml")]) == 0
    assert (root / "metrics/eval_quality.json").read_bytes() == before


def test_metric_files_are_one_consistent_set(evaluated, tmp_path):
    from tasks.evaluate import METRIC_SET, main, metric_set_consistent

    root = evaluated
    metrics_dir = root / "metrics"
    ids = {_read(root, name)["run_id"] for name in METRIC_SET}
    assert len(ids) == 1 and metric_set_consistent(metrics_dir)
    assert not list(metrics_dir.glob(".*tmp*"))  # no temporary siblings left behind

    # A partial set is told apart from a complete one.
    partial = tmp_path / "partial"
    shutil.copytree(metrics_dir, partial)
    speed = json.loads((partial / "eval_speed.json").read_text())
    (partial / "eval_speed.json").write_text(json.dumps({**speed, "run_id": "another run"}))
    assert not metric_set_consistent(partial)
    (partial / "eval.json").unlink()
    assert not metric_set_consistent(partial)

    # A run that fails while putting the set in place (here: eval.json cannot be replaced) leaves no
    # eval.json of its own and no temporaries; the next run writes a complete set again.
    out = tmp_path / "m"
    (out / "eval.json").mkdir(parents=True)
    (out / "eval.json" / "blocker").write_text("x")
    args = [
        "--params",
        str(root / "params.yaml"),
        "--set",
        f"paths.metrics_dir={out}",
        "--set",
        "evaluate.num_problems=2",
    ]
    with pytest.raises(IsADirectoryError):
        main(args)
    assert not metric_set_consistent(out) and not list(out.glob(".*tmp*"))
    shutil.rmtree(out / "eval.json")
    assert main(args) == 0
    assert metric_set_consistent(out)
    run_ids = [json.loads((out / name).read_text())["run_id"] for name in METRIC_SET]
    assert len(set(run_ids)) == 1


def test_checkpoint_parameter_selects_another_stage(evaluated):
    from tasks.evaluate import main

    root = evaluated
    out = root / "metrics-rl"
    assert (
        main(
            [
                "--params",
                str(root / "params.yaml"),
                "--set",
                f"evaluate.checkpoint={root / 'artifacts/rl'}",
                "--set",
                f"paths.metrics_dir={out}",
                "--set",
                "evaluate.num_problems=2",
            ]
        )
        == 0
    )
    rl, compressed = json.loads((out / "eval.json").read_text()), _read(root, "eval.json")
    assert rl["checkpoint"] == str(root / "artifacts/rl") and rl["num_problems"] == 2
    # Only the DaE member differs between rl and compress (dense vs decomposed).
    assert rl[f"exit_{DAE_EXIT}"]["params"] > compressed[f"exit_{DAE_EXIT}"]["params"]
    for d in EXITS[1:]:
        assert rl[f"exit_{d}"]["loss"] == compressed[f"exit_{d}"]["loss"]


def test_bad_inputs_are_named(evaluated, tmp_path, capsys):
    from tasks.core.artifacts import load_family, save_family
    from tasks.evaluate import main

    params = str(evaluated / "params.yaml")
    missing = tmp_path / "nope"
    assert main(["--params", params, "--set", f"evaluate.checkpoint={missing}"]) == 2
    assert str(missing) in capsys.readouterr().err

    # A tokenizer larger than the model's vocabulary: mismatch, named.
    model, tokenizer = load_family(evaluated / "artifacts" / "compress")
    tokenizer.add_tokens([f"extra{i}" for i in range(model.config.vocab_size)])
    bad = tmp_path / "mismatch"
    save_family(model, tokenizer, bad)
    assert main(["--params", params, "--set", f"evaluate.checkpoint={bad}"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "mismatch" in err

    # An empty eval file.
    data = tmp_path / "data"
    shutil.copytree(evaluated / "data", data)
    (data / "validated" / "eval.jsonl").write_text("")
    assert main(["--params", params, "--set", f"paths.data_dir={data}"]) == 2
    assert str(data / "validated" / "eval.jsonl") in capsys.readouterr().err


def test_batched_greedy_equals_unbatched_and_speed_helper(evaluated):
    from ruyi_model.decoding import (
        encode_prompts,
        greedy_generate,
        measure_family_tokens_per_s,
        measure_tokens_per_s,
    )
    from tasks.core.artifacts import load_family

    model, tokenizer = load_family(evaluated / "artifacts" / "compress")
    prompts = [
        "Tom has 3 apples and gets 4 more. How many apples does Tom have?",
        "cats",
        "the sun sets on rivers",
    ]
    for d in EXITS:
        batched = greedy_generate(model, tokenizer, prompts, d, max_new_tokens=12, batch_size=3)
        single = [
            greedy_generate(model, tokenizer, [p], d, max_new_tokens=12, batch_size=1)[0] for p in prompts
        ]
        assert batched == single
    ids = encode_prompts(tokenizer, ["cats"])[0]
    assert measure_tokens_per_s(model, 2, ids, new_tokens=3, warmup=0, repeats=1) > 0
    both = measure_family_tokens_per_s(model, [1, 4], ids, new_tokens=3, warmup=0, repeats=2)
    assert sorted(both) == [1, 4] and all(len(v["runs_s"]) == 2 for v in both.values())
    with pytest.raises(ValueError, match="prompt 0"):
        greedy_generate(model, tokenizer, [""], 2, max_new_tokens=4)
