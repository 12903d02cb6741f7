"""The vision-language profile's stage bodies (`model.modality: vl`, params.vl.yaml).

Library module: `tasks.core.stage.stage_main` runs `STAGES[<stage>](params)` instead of the text stage
when the params say `model.modality: vl`, so `python -m tasks.<stage> --params params.vl.yaml` is the
VL stage (profiles/vl/dvc.yaml, `ruyi run --profile vl`). Data: generated VQA splits
(`tasks.data.vldata`) checked by the GX image contract; the family: `ruyi_model.vl`. Stages:
prepare_data, validate_data, tokenizer (BPE + processor), cpt (alignment: merger and deepstack mergers
only, on captions), family_sft (joint multi-exit SFT, `train_loop`), rl (GRPO on the verifiable
subset, `rl_algos`), evaluate (per exit and task type), gates (`data_contracts.gates`), privacy (the
edge-cloud camera on this family's vision tower: `tasks.training.privacy_run.run_privacy`, the body of
`python -m tasks.privacy` too), export (`export_exits`), deploy (the export and the camera release
published with `tasks.release.store.publish_dir`, served by `tasks.release.serving`, smoke-tested with
images, then the camera's edge -> cloud). Choices: docs/choices.md#vision-language-profile.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.files import (
    LOAD_ERRORS,
    atomic_dir,
    atomic_file,
    pyplot,
    read_jsonl,
    require_dir,
    save_figure,
    sha256_file,
    write_json,
    write_jsonl,
    write_metrics,
)
from tasks.core.paths import Workspace
from tasks.core.stage import StageError, log
from tasks.training.curves import HeldOut, draw_held_out, held_out_columns, running_mean, write_loss_curves

if TYPE_CHECKING:
    from tasks.core.params import Params

CAPTION = "caption"
VL_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IGNORE = -100


# --- data ------------------------------------------------------------------------------------------
def _split_counts(params: Params) -> dict[str, int]:
    v = params.vl
    return {"train": v.num_train, "select": v.num_select, "eval": v.num_eval}


def _grid(params: Params) -> int:
    return params.vl.vision.patch_size * params.vl.vision.spatial_merge_size


def prepare_data(params: Params) -> dict[str, Any]:
    """Generated VQA splits (train / select / eval, disjoint images) under `<data_dir>/raw`."""
    from tasks.data.vldata import write_vl_splits

    ws = Workspace.from_params(params)
    v = params.vl
    captions = params.cpt.max_steps > 0 or v.sft_captions
    tasks = list(dict.fromkeys([*v.tasks, CAPTION])) if captions else list(v.tasks)
    manifest = write_vl_splits(
        ws.raw,
        _split_counts(params),
        params.seed,
        embed=True,
        size=v.image_size,
        block=_grid(params),
        tasks=tasks,
    )
    metrics = {"files": manifest["files"], "mix": manifest["mix"], "image_size": v.image_size}
    write_metrics(params, "prepare_data", metrics)
    return metrics


def validate_data(params: Params) -> dict[str, Any]:
    """The `data_contracts.vl` suite (real GX) on every split; bad rows quarantined with their reasons."""
    from data_contracts.context import ContractContext
    from data_contracts.vl import ImageBounds
    from tasks.data.vldata import VL_SPLIT_NAMES, check_vl_rows, quarantine_entry, read_vl_split

    ws = Workspace.from_params(params)
    cv = params.validate_data
    bounds = ImageBounds(grid=_grid(params), max_question_chars=cv.max_question_chars)
    ctx = ContractContext(ws.reports("contracts"))
    metrics: dict[str, Any] = {"files": {}}
    with atomic_dir(ws.validated) as out, atomic_dir(ws.quarantine) as quarantine:
        for split in VL_SPLIT_NAMES:
            path = ws.raw / f"{split}.jsonl"
            if not path.is_file():
                raise StageError(f"{path} not found (run prepare_data with the VL profile first)")
            rows, labels, reader = read_vl_split(path)
            check = check_vl_rows(
                ctx,
                rows,
                labels,
                bounds,
                reader,
                cv.on_violation,
                name=f"vl_{split}",
                sample_rows=cv.sample_rows,
            )
            by_label = dict(zip(labels, rows))
            if len(check.reasons) > cv.max_quarantine_fraction * max(len(rows), 1):
                raise StageError(
                    f"{path}: {len(check.reasons)} of {len(rows)} rows failed the VL contract, more than "
                    f"validate_data.max_quarantine_fraction={cv.max_quarantine_fraction}"
                )
            write_jsonl(out / f"{split}.jsonl", [by_label[label] for label in check.kept])
            write_jsonl(
                quarantine / f"{split}.jsonl",
                [quarantine_entry(lb, by_label[lb], r, file=str(path)) for lb, r in check.reasons.items()],
            )
            metrics["files"][split] = {
                "rows": len(rows),
                "kept": len(check.kept),
                "quarantined": len(check.reasons),
                "expectations": check.evaluated,
            }
    ctx.build_docs()
    write_metrics(params, "validate_data", metrics)
    return metrics


def _rows(params: Params, split: str, tasks: Sequence[str] | None = None) -> list[dict[str, Any]]:
    path = Workspace.from_params(params).validated / f"{split}.jsonl"
    if not path.is_file():
        raise StageError(f"{path} not found (run validate_data with the VL profile first)")
    rows = read_jsonl(path, required=("image", "question", "answer", "task"))
    return [r for r in rows if tasks is None or r["task"] in tasks]


def _image(row: dict[str, Any]):
    import base64
    import io

    from PIL import Image

    data = row["image"]
    if not data.startswith("data:image/png;base64,"):
        raise StageError(f"row {row.get('id')}: the VL profile expects embedded PNG data URLs")
    return Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1]))).convert("RGB")


# --- tokenizer, processor, model -------------------------------------------------------------------
def tokenizer(params: Params) -> dict[str, Any]:
    """A byte-level BPE (digits split, the text tokenizer's pre-tokenizer) with the vision tokens, and
    the image-only processor, saved under `<artifacts_dir>/tokenizer`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ruyi_model.tokenizer import EOS_TOKEN, IM_END, IM_START, PAD_TOKEN, SPECIAL_TOKENS, SPLIT_PATTERN

    texts = [f"{r['question']} {r['answer']}" for r in _rows(params, "train")]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=params.tokenizer.vocab_size,
        min_frequency=params.tokenizer.min_frequency,
        special_tokens=[*SPECIAL_TOKENS, *VL_SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START, IM_END, *VL_SPECIALS],
        clean_up_tokenization_spaces=False,
        chat_template=VL_CHAT_TEMPLATE,
    )
    processor = build_processor(params, tok)
    out = Workspace.from_params(params).tokenizer
    with atomic_dir(out) as tmp:
        processor.save_pretrained(tmp)
    metrics = {"vocab_size": len(tok), "train_texts": len(texts)}
    write_metrics(params, "tokenizer", metrics)
    return metrics


def vl_config(params: Params, tok):
    """The stock `Qwen3VLConfig` of the family's deepest member from `model` (text) and `vl.vision`."""
    from transformers import Qwen3VLConfig

    m, vis = params.model, params.vl.vision
    ids = {t: tok.convert_tokens_to_ids(t) for t in VL_SPECIALS}
    text = dict(
        vocab_size=len(tok),
        **m.qwen3_text_fields(),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": m.rope_theta,
            "mrope_section": vis.mrope_section,
        },
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
    )
    vision = dict(
        depth=vis.depth,
        hidden_size=vis.hidden_size,
        intermediate_size=vis.intermediate_size,
        num_heads=vis.num_heads,
        patch_size=vis.patch_size,
        spatial_merge_size=vis.spatial_merge_size,
        temporal_patch_size=2,
        out_hidden_size=m.hidden_size,
        num_position_embeddings=vis.num_position_embeddings,
        deepstack_visual_indexes=list(vis.deepstack_visual_indexes),
    )
    cfg = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def build_processor(params: Params, tok):
    from ruyi_model.vl_processor import build_vl_processor

    side = params.vl.image_size
    return build_vl_processor(
        tok, vl_config(params, tok), VL_CHAT_TEMPLATE, min_pixels=side * side, max_pixels=side * side
    )


def load_processor(params: Params):
    from ruyi_model.vl_processor import Qwen3VLImageOnlyProcessor

    path = Workspace.from_params(params).tokenizer
    if not (path / "processor_config.json").is_file():
        raise StageError(f"no VL processor at {path}: run the tokenizer stage with the VL profile")
    # local_files_only explicit, as every load here: under HF_HUB_OFFLINE=1 transformers sets it anyway and
    # the tokenizer saves the value into the configs that privacy and export write, so without it those
    # outputs depended on the environment (the first VL audit found them different)
    proc = Qwen3VLImageOnlyProcessor.from_pretrained(path, local_files_only=True)
    proc.tokenizer.padding_side = "left"
    return proc


def load_family(params: Params, stage: str, path: str | Path | None = None):
    """The VL family `stage` wrote (`<artifacts_dir>/<stage>`), or the one at `path` when given (a
    parameter such as `evaluate.checkpoint`, named by `stage`)."""
    import torch

    from ruyi_model.vl import FamilialVLForConditionalGeneration

    if path is None:
        path, hint = (
            Workspace.from_params(params).artifacts(stage),
            f"run the {stage} stage with the VL profile first",
        )
    else:
        path, hint = Path(path), f"{stage} names a directory without a saved VL family"
    if not (path / "config.json").is_file():
        raise StageError(f"no VL family at {path}: {hint}")
    try:
        return FamilialVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    except LOAD_ERRORS as e:
        raise StageError(f"cannot load the VL family at {path}: {e}") from None


def _save_family(params: Params, stage: str, model) -> Path:
    out = Workspace.from_params(params).artifacts(stage)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
    return out


# --- batches ---------------------------------------------------------------------------------------
def _prompt(processor, question: str, answer: str | None = None) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is None:
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    messages.append({"role": "assistant", "content": answer})
    return processor.apply_chat_template(messages, tokenize=False)


def encode_sft(processor, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A left-padded batch of chats with one image each; labels only on the answer (and its <|im_end|>)."""
    import torch

    prompts = [_prompt(processor, r["question"]) for r in rows]
    full = [_prompt(processor, r["question"], r["answer"]) for r in rows]
    images = [_image(r) for r in rows]
    batch = processor(text=full, images=images, padding=True, return_tensors="pt")
    plen = processor(text=prompts, images=images, padding=False)["input_ids"]
    labels = torch.full_like(batch["input_ids"], IGNORE)
    ids, width = batch["input_ids"], batch["input_ids"].shape[1]
    end_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for i, p in enumerate(plen):
        start = width - int(batch["attention_mask"][i].sum()) + len(p)
        ends = (ids[i, start:] == end_id).nonzero()
        stop = start + int(ends[0]) + 1 if len(ends) else width  # not the template's newline after it
        labels[i, start:stop] = ids[i, start:stop]
    return {**dict(batch), "labels": labels}


class VLStream:
    """`.batch(position, batch_size)` over shuffled epochs of rows (train_loop's stream protocol).

    Epoch `e` visits the rows in the order of `random.Random(f"{seed}:{e}").shuffle`; the orders of the
    last epochs are kept (a batch spans at most two), so a step costs no shuffle of its own."""

    def __init__(self, processor, rows: Sequence[dict[str, Any]], seed: int):
        if not rows:
            raise StageError("no training rows for this VL stage (check vl.tasks and the data counts)")
        self.processor, self.rows, self.seed = processor, list(rows), seed
        self._orders: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        """The row indices of `epoch`, in the order it visits them."""
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.clear()
            order = list(range(len(self.rows)))
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
            self._orders[epoch] = order
        return self._orders[epoch]

    def batch(self, position: int, batch_size: int) -> dict[str, Any]:
        n = len(self.rows)
        picked = [self.rows[self.order(p // n)[p % n]] for p in range(position, position + batch_size)]
        return encode_sft(self.processor, picked)


def vl_multi_exit_loss_fn(weights: Callable[[int], Sequence[float]]):
    """`sum_k w_k(step) CE_k` of a VL batch from one backbone pass (train_loop's LossFn)."""

    def fn(model, batch: dict, step: int):
        out = model(**batch, exit_loss_weights=list(weights(step)))
        return out.loss, {d: float(v) for d, v in out.exit_losses.items()}

    return fn


def vl_multi_exit_eval(model, batch: dict) -> dict[int, tuple[float, int]]:
    out = model(**batch)
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    return {d: (float(v) * n, n) for d, v in out.exit_losses.items()}


def vl_member_row_losses(model, batch: dict, exits: Sequence[int]) -> dict[int, list[tuple[float, int]]]:
    """Per member (run alone, `exit_layer=d`): each row's summed answer loss and answer tokens
    (`tasks.training.loop.row_losses`): the evaluate stage's per-item losses. Their token mean equals the
    multi-exit pass's `vl_multi_exit_eval` up to float rounding."""
    import torch

    from tasks.training.loop import row_losses

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return {
            d: row_losses(model(**inputs, exit_layer=d, use_cache=False).logits, batch["labels"])
            for d in exits
        }


#: The parameters of the vision tower and its mergers (`vl.vision_lr_scale` in family_sft and rl).
VISION_PREFIX = "model.visual."


def _vision_lr_scales(params: Params) -> dict[str, float]:
    """The lr multipliers of family_sft and rl: the vision tower and its mergers at `vl.vision_lr_scale`."""
    return {VISION_PREFIX: params.vl.vision_lr_scale}


def train_inputs(params: Params, stage: str) -> dict[str, Any]:
    """What a VL training stage's checkpoint must agree on besides its parameters and code: the `vl`
    section, digests of the validated splits it reads (train, select), of the tokenizer / processor, and
    for family_sft of the family cpt wrote (its starting point: a retrained cpt retires family_sft's
    checkpoints)."""
    from tasks.training.checkpoint import dir_sha256

    ws = Workspace.from_params(params)
    inputs: dict[str, Any] = {"vl": params.vl.model_dump()}
    for split in ("train", "select"):
        inputs[split] = sha256_file(ws.validated / f"{split}.jsonl")
    inputs["tokenizer"] = dir_sha256(ws.tokenizer)
    if stage == "family_sft":
        inputs["cpt"] = dir_sha256(ws.artifacts("cpt"))
    return inputs


def _train(
    params: Params,
    stage: str,
    model,
    cfg,
    named,
    rows,
    val_rows,
    extra: dict[str, Any],
    title: str,
    lr_scales: dict[str, float] | None = None,
):
    """`train_loop` on the rows (validation: the first `eval_batches` batches of `val_rows`); writes the
    loss curves (`plots/vl/<stage>/loss.png` + `loss.csv`) and returns the stage's metrics."""
    from tasks.core.codedeps import VL_PIPELINE
    from tasks.training.checkpoint import Checkpointer, fingerprint_info
    from tasks.training.loop import exit_weights_at, train_loop

    processor = load_processor(params)
    stream = VLStream(processor, rows, params.seed)
    val = [
        encode_sft(processor, val_rows[i : i + cfg.batch_size])
        for i in range(0, len(val_rows), cfg.batch_size)
    ]
    val = val[: cfg.eval_batches]
    exits = list(params.model.exit_layers)
    ws = Workspace.from_params(params)
    info = fingerprint_info(
        stage,
        cfg,
        seed=params.seed,
        model=params.model,
        inputs=train_inputs(params, stage),
        extra=extra,
        pipeline=VL_PIPELINE,
    )
    result = train_loop(
        stage=stage,
        model=model,
        cfg=cfg,
        named_params=named,
        stream=stream,
        loss_fn=vl_multi_exit_loss_fn(lambda s: exit_weights_at(cfg.exit_weights, exits, s, cfg.max_steps)),
        val_batches=val,
        eval_fn=vl_multi_exit_eval,
        checkpointer=Checkpointer(ws.checkpoints(stage), info),
        lr_scales=lr_scales,
    )
    write_loss_curves(result.history, ws.plots(stage), title=title)
    initial, final, train = result.val_losses(0), result.val_losses(), result.final_train_losses()
    metrics: dict[str, Any] = {
        f"exit_{d}": {
            "train_loss": round(train.get(d, float("nan")), 6),
            "val_loss_start": round(initial[d], 6),
            "val_loss": round(final[d], 6),
        }
        for d in exits
    }
    metrics.update(
        result.summary(), train_rows=len(rows), trainable_parameters=sum(p.numel() for _, p in named)
    )
    return metrics


def cpt(params: Params) -> dict[str, Any]:
    """Alignment: a fresh family (seeded), only the merger and the deepstack mergers train, on captions."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from ruyi_model.vl import FamilialVLForConditionalGeneration

    torch.manual_seed(params.seed)
    processor = load_processor(params)
    src = Qwen3VLForConditionalGeneration(vl_config(params, processor.tokenizer))
    m = params.model
    model = FamilialVLForConditionalGeneration.from_qwen3_vl(
        src,
        list(m.exit_layers),
        exit_branch_layers=m.exit_branch_layers,
        shared_heads=m.shared_heads,
        loss_impl=m.loss_impl,
    )
    model.requires_grad_(False)
    visual = model.model.visual
    for module in (visual.merger, visual.deepstack_merger_list):
        module.requires_grad_(True)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    metrics: dict[str, Any] = {"trained": "merger + deepstack mergers", "steps": params.cpt.max_steps}
    if params.cpt.max_steps > 0:
        rows = _rows(params, "train", [CAPTION])
        val = _rows(params, "select", [CAPTION])
        title = "cpt (VL alignment: merger + deepstack mergers on captions), loss per member"
        metrics = {
            **metrics,
            **_train(params, "cpt", model, params.cpt, named, rows, val, {"part": "align"}, title),
        }
    _save_family(params, "cpt", model)
    write_metrics(params, "cpt", metrics)
    return metrics


def family_sft(params: Params) -> dict[str, Any]:
    """Joint multi-exit SFT of every parameter (vision tower included) on the VQA tasks; the vision tower
    and its mergers at `vl.vision_lr_scale` times the lr."""
    model = load_family(params, "cpt")
    model.requires_grad_(True)
    named = list(model.named_parameters())
    tasks = [*params.vl.tasks, *([CAPTION] if params.vl.sft_captions else [])]
    rows = _rows(params, "train", tasks)
    val = _rows(params, "select", params.vl.tasks)
    lr_scales = _vision_lr_scales(params)
    title = "family_sft (VL): joint multi-exit SFT on VQA, loss per member (val: select split)"
    metrics = _train(
        params, "family_sft", model, params.family_sft, named, rows, val, {"part": "sft"}, title, lr_scales
    )
    metrics["vision_lr"] = params.family_sft.lr * lr_scales[VISION_PREFIX]
    _save_family(params, "family_sft", model)
    write_metrics(params, "family_sft", metrics)
    return metrics


# --- answers, greedy decoding and accuracy ----------------------------------------------------------
def normalise(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def is_correct(response: str, answer: str) -> bool:
    """Exact match after normalisation (case, spaces, a trailing full stop); numbers compared as numbers."""
    a, b = normalise(response), normalise(answer)
    if a == b:
        return True
    try:
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-9)
    except ValueError:
        return False


def generate_answers(
    model,
    processor,
    rows,
    exit_layer: int,
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    temperature: float = 1.0,
):
    """Greedy (or sampled) answers of member `exit_layer` for `rows`, with the generated token ids."""
    import torch

    answers, outputs = [], []
    tok = processor.tokenizer
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        batch = processor(
            text=[_prompt(processor, r["question"]) for r in chunk],
            images=[_image(r) for r in chunk],
            padding=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            out = model.generate(
                **batch,
                exit_layer=exit_layer,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_k=None,
                top_p=None,
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tok.pad_token_id,
            )
        new = out[:, batch["input_ids"].shape[1] :]
        answers += tok.batch_decode(new, skip_special_tokens=True)
        outputs.append((batch, new))
    return answers, outputs


def graded_table(graded: Iterable[tuple[str, bool]]) -> dict[str, Any]:
    """{"accuracy", "n", "by_task": {task: {"accuracy", "n"}}} of graded answers, `(task, correct)` pairs
    (each answer graded once by `is_correct`)."""
    by: dict[str, list[int]] = {}
    for task, correct in graded:
        by.setdefault(task, []).append(int(correct))
    total = [x for v in by.values() for x in v]
    return {
        "accuracy": round(sum(total) / max(len(total), 1), 6),
        "n": len(total),
        "by_task": {t: {"accuracy": round(sum(v) / len(v), 6), "n": len(v)} for t, v in sorted(by.items())},
    }


def format_table(metrics: dict[str, Any], exits: Sequence[int]) -> str:
    """The per-exit, per-task-type accuracy table (markdown) of evaluate's metrics."""
    tasks = sorted({t for d in exits for t in metrics[f"exit_{d}"]["by_task"]})
    head = "| exit | params | tokens/s | all | " + " | ".join(tasks) + " |"
    lines = [head, "|" + "---|" * (4 + len(tasks))]
    for d in exits:
        e = metrics[f"exit_{d}"]
        cells = [f"{100 * e['by_task'][t]['accuracy']:.1f}" if t in e["by_task"] else "-" for t in tasks]
        tps = e.get("tokens_per_s")
        lines.append(
            f"| {d} | {e['num_parameters']:,} | {'-' if tps is None else f'{tps:.0f}'} | "
            f"{100 * e['accuracy']:.1f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


# --- RL ----------------------------------------------------------------------------------------------
def _completion_logps(model, batch, completion, completion_mask, exit_layer: int, temperature: float):
    import torch

    ids = torch.cat([batch["input_ids"], completion], dim=1)
    attn = torch.cat([batch["attention_mask"], completion_mask], dim=1)
    mm = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(completion)], dim=1)
    c = completion.shape[1]
    logits = model(
        input_ids=ids,
        attention_mask=attn,
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
        mm_token_type_ids=mm,
        exit_layer=exit_layer,
        use_cache=False,
        logits_to_keep=c + 1,
    ).logits[:, :-1, :]
    logps = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logps.gather(-1, completion.unsqueeze(-1)).squeeze(-1) * completion_mask


def _rl_members(params: Params) -> list[int]:
    members = params.rl.members
    if members == "all":
        return list(params.model.exit_layers)
    if members == "dae":
        raise StageError(
            "rl.members: dae needs a DaE member, which the VL profile does not build; use all or a list"
        )
    return list(members)


def rl(params: Params) -> dict[str, Any]:
    """GRPO with a verifiable reward (exact answer) on `vl.rl_tasks`: per step one member (in turn)
    samples `group_size` answers per prompt; the clipped objective and advantages of `rl_algos`. Writes
    the family, `metrics/vl/rl.json`, its plots and `reports/vl/rl/items.jsonl` (`Workspace.rl_items`:
    each held-out prompt's greedy verdict before rl and after, per member: what the gates resample)."""
    import torch

    from data_contracts.items import rl_item_rows
    from tasks.training.loop import param_groups
    from tasks.training.rl_algos import group_advantages, policy_loss

    cfg, v = params.rl, params.vl
    if cfg.algorithm != "grpo":
        raise StageError(
            "rl.algorithm: the VL profile runs grpo (BPPO's prefix selection needs longer answers)"
        )
    if cfg.beta != 0.0 or cfg.num_iterations != 1:
        raise StageError("rl.beta and rl.num_iterations: the VL profile's GRPO runs beta 0, one iteration")
    if cfg.select_prompts:
        raise StageError(
            "rl.select_prompts: the VL profile keeps its last step (its select split is rl's held-out "
            "slice); set it to 0"
        )
    if cfg.rollout_engine != "hf":
        raise StageError(
            "rl.rollout_engine: the VL profile samples with its own loop (the static decoder runs the "
            "text family's members); set it to hf"
        )
    model = load_family(params, "family_sft")
    processor = load_processor(params)
    members = _rl_members(params)
    train_rows = _rows(params, "train", v.rl_tasks)
    held = _rows(params, "select", v.rl_tasks)[: cfg.eval_prompts]
    if not train_rows or not held:
        raise StageError(f"vl.rl_tasks {v.rl_tasks}: no train or select rows")
    budget = min(cfg.max_new_tokens, v.max_answer_tokens)

    # each member's held-out accuracy before rl, every rl.eval_every steps and after, with its verdict
    # on each prompt (as the text rl's)
    curve: HeldOut = {d: [] for d in members}

    def evaluate_held_out(step: int) -> None:
        model.eval()
        for d in members:
            answers = generate_answers(model, processor, held, d, budget, 32)[0]
            correct = [is_correct(a, r["answer"]) for a, r in zip(answers, held, strict=True)]
            accuracy = graded_table((r["task"], c) for r, c in zip(held, correct, strict=True))["accuracy"]
            curve[d].append({"step": step, "accuracy": accuracy, "correct": correct})

    evaluate_held_out(0)
    torch.manual_seed(params.seed)
    # the vision tower and its mergers at vl.vision_lr_scale x the lr, as in family_sft: at the full lr the
    # 12 steps of a 0.03x-trained family moved the tower and cost the deepest member 5.6 points (RESULTS.md)
    lr_scales = _vision_lr_scales(params)
    groups = param_groups(list(model.named_parameters()), cfg.lr, 0.0, lr_scales)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99))  # each group sets its weight decay
    rng = random.Random(f"{params.seed}:vl-rl")
    history, t0 = [], time.perf_counter()
    for step in range(cfg.steps):
        d = members[step % len(members)]
        prompts = rng.sample(train_rows, min(cfg.prompts_per_step, len(train_rows)))
        group = [r for r in prompts for _ in range(cfg.group_size)]
        model.eval()
        answers, outs = generate_answers(
            model, processor, group, d, budget, len(group), True, cfg.temperature
        )
        ((batch, completion),) = outs
        eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        pad = processor.tokenizer.pad_token_id
        mask = torch.ones_like(completion, dtype=torch.float32)
        for i in range(completion.shape[0]):  # tokens after the first <|im_end|> carry no loss
            hits = (completion[i] == eos).nonzero()
            if len(hits):
                mask[i, int(hits[0]) + 1 :] = 0
        completion = completion.masked_fill(mask == 0, pad)
        rewards = torch.tensor(
            [float(is_correct(a, r["answer"])) for a, r in zip(answers, group, strict=True)]
        )
        adv = group_advantages(rewards, cfg.group_size, cfg.scale_rewards)
        model.train()
        logps = _completion_logps(model, batch, completion, mask, d, cfg.temperature)
        loss, stats = policy_loss(
            logps, adv, mask, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type
        )
        opt.zero_grad(set_to_none=True)
        if bool((adv != 0).any()):
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
        history.append({"step": step + 1, "exit": d, "reward": float(rewards.mean()), "loss": float(loss)})
        log.info("vl rl step %d/%d exit %d: reward %.3f", step + 1, cfg.steps, d, float(rewards.mean()))
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            evaluate_held_out(step + 1)
    evaluate_held_out(cfg.steps)
    _save_family(params, "rl", model)
    ws = Workspace.from_params(params)
    write_jsonl(ws.rl_items, rl_item_rows(curve, members, held, cfg.steps))
    metrics: dict[str, Any] = {
        "algorithm": "grpo",
        "members": members,
        "tasks": list(v.rl_tasks),
        "eval_prompts": len(held),
        "seconds": round(time.perf_counter() - t0, 2),
        "mean_reward": round(sum(h["reward"] for h in history) / max(len(history), 1), 6),
        "vision_lr": cfg.lr * lr_scales[VISION_PREFIX],
        **{
            f"exit_{d}": {
                "accuracy_start": curve[d][0]["accuracy"],
                "accuracy_end": curve[d][-1]["accuracy"],
                "held_out_curve": held_out_columns(curve[d], ("step", "accuracy")),
            }
            for d in members
        },
    }
    write_metrics(params, "rl", metrics)
    out = ws.plots("rl")
    write_json(out / "history.json", history)
    plot_rl(history, curve, out, tasks=v.rl_tasks)
    return metrics


def plot_rl(
    history: Sequence[dict[str, Any]],
    curve: HeldOut,
    out_dir: Path,
    tasks: Sequence[str] = (),
) -> Path:
    """`curves.png` of the VL rl stage: each member's sampled reward per step (its running mean over its
    last 5 steps drawn through the points) and its greedy held-out accuracy over the steps (`curve`, the
    text rl's shape `tasks.training.curves.HeldOut`: before rl, every `rl.eval_every` steps and after),
    on the select split's rows of `tasks` (`vl.rl_tasks`, named in the panel's title)."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    colors = {}
    for d in sorted({int(h["exit"]) for h in history}):
        steps, rewards = zip(*((h["step"], h["reward"]) for h in history if h["exit"] == d))
        (line,) = ax1.plot(steps, running_mean(rewards, 5), lw=1.6, label=f"exit {d}")
        ax1.plot(steps, rewards, "o", ms=3, alpha=0.4, color=line.get_color())
        colors[d] = line.get_color()
    draw_held_out(ax2, curve, colors, style="s-")
    ax1.set(xlabel="step", ylabel="reward (sampled, exact answer)", title="reward per step (line: mean of 5)")
    held_out = "select split" + (f", {' / '.join(tasks)}" if tasks else "")
    ax2.set(ylim=(0, 1), xlabel="step", ylabel="greedy accuracy", title=f"held-out accuracy ({held_out})")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("rl (VL, grpo)")
    fig.tight_layout()
    return save_figure(fig, out_dir / "curves.png")


# --- evaluate, gates, export -------------------------------------------------------------------------
def _tokens_per_s(model, processor, row, exit_layer: int, new_tokens: int, repeats: int) -> float:
    import statistics

    import torch

    batch = processor(text=[_prompt(processor, row["question"])], images=[_image(row)], return_tensors="pt")
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(
                **batch,
                exit_layer=exit_layer,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
        times.append(time.perf_counter() - t)
    return new_tokens / statistics.median(times[1:])


def evaluate(params: Params) -> dict[str, Any]:
    """Per exit: greedy VQA accuracy by task type on the eval split, tokens/s, parameters, answer loss;
    every member's answer to every problem in `reports/vl/evaluate/generations.jsonl`
    (`Workspace.eval_generations`: what the deploy stage's served members must answer) and the per-item
    results the gates resample in `reports/vl/evaluate/items.jsonl` (`Workspace.eval_items`: each eval
    item's answer loss and verdict per member)."""
    from data_contracts.items import item_row
    from ruyi_model.vl import member_vl_num_parameters

    ev = params.evaluate
    ws = Workspace.from_params(params)
    model = (
        load_family(params, "evaluate.checkpoint", ev.checkpoint)
        if ev.checkpoint
        else load_family(params, "rl")
    )
    model.eval()
    processor = load_processor(params)
    rows = _rows(params, "eval", params.vl.tasks)[: ev.num_problems]
    exits = list(params.model.exit_layers)
    losses: dict[int, list[float]] = {}
    items: list[dict[str, Any]] = []
    for i in range(0, len(rows), ev.batch_size):
        batch = encode_sft(processor, rows[i : i + ev.batch_size])
        for d, (s, n) in vl_multi_exit_eval(model, batch).items():
            acc = losses.setdefault(d, [0.0, 0])
            acc[0], acc[1] = acc[0] + s, acc[1] + n
        for d, per_row in vl_member_row_losses(model, batch, exits).items():
            items += [
                item_row("loss", r["id"], d, loss_sum=s, tokens=n)
                for r, (s, n) in zip(rows[i : i + ev.batch_size], per_row, strict=True)
            ]
    metrics: dict[str, Any] = {
        "num_problems": len(rows),
        "ln_vocab": math.log(model.config.text_config.vocab_size),
    }
    generations: list[dict[str, Any]] = []
    for d in exits:
        answers, _ = generate_answers(
            model, processor, rows, d, params.vl.max_answer_tokens, ev.decode_batch_size
        )
        graded = [
            {
                "id": r["id"],
                "exit": d,
                "task": r["task"],
                "answer": r["answer"],
                "correct": is_correct(a, r["answer"]),
                "completion": a,
            }
            for r, a in zip(rows, answers, strict=True)
        ]
        generations += graded
        items += [item_row("accuracy", g["id"], d, correct=bool(g["correct"])) for g in graded]
        entry = graded_table((g["task"], g["correct"]) for g in graded)
        entry["loss"] = round(losses[d][0] / max(losses[d][1], 1), 6)
        entry["num_parameters"] = member_vl_num_parameters(model, d)
        entry["samples"] = [
            {"q": r["question"], "a": r["answer"], "got": a} for r, a in zip(rows[:3], answers)
        ]
        metrics[f"exit_{d}"] = entry
    for d in exits:
        tps = _tokens_per_s(model, processor, rows[0], d, ev.speed_new_tokens, ev.speed_repeats)
        metrics[f"exit_{d}"]["tokens_per_s"] = round(tps, 1)
    table = format_table(metrics, exits)
    print(f"\nVL evaluation ({len(rows)} held-out problems), accuracy % per exit and task type:\n{table}\n")
    write_metrics(params, "eval", metrics, split=False)
    quality = {
        k: ({kk: vv for kk, vv in v.items() if kk != "tokens_per_s"} if isinstance(v, dict) else v)
        for k, v in metrics.items()
    }
    write_json(ws.metrics_dir / "eval_quality.json", quality)
    write_jsonl(ws.eval_generations, generations)
    write_jsonl(ws.eval_items, items)
    (ws.metrics_dir / "eval_table.md").write_text(table + "\n")
    plot_tradeoff(metrics, exits, ws.plots("evaluate"))
    return metrics


def plot_tradeoff(metrics: dict[str, Any], exits: Sequence[int], out_dir: Path) -> Path:
    """`tradeoff.png` + `tradeoff.csv` of the VL evaluate stage: per exit, greedy accuracy (all and per
    task type) against the member's parameters, and its decoding speed (tokens/s, batch 1)."""
    import csv

    plt = pyplot()

    entries = [metrics[f"exit_{d}"] for d in exits]
    tasks = sorted({t for e in entries for t in e["by_task"]})
    with atomic_file(out_dir / "tradeoff.csv", "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["exit", "num_parameters", "tokens_per_s", "loss", "accuracy", *tasks])
        for d, e in zip(exits, entries):
            by = [e["by_task"][t]["accuracy"] if t in e["by_task"] else "" for t in tasks]
            writer.writerow(
                [d, e["num_parameters"], e.get("tokens_per_s", ""), e["loss"], e["accuracy"], *by]
            )
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    params_m = [e["num_parameters"] / 1e6 for e in entries]
    ax1.plot(params_m, [e["accuracy"] for e in entries], "ko-", lw=2, label="all")
    for t in tasks:
        pts = [(x, e["by_task"][t]["accuracy"]) for x, e in zip(params_m, entries) if t in e["by_task"]]
        ax1.plot(*zip(*pts), "o--", lw=0.9, label=t)
    for d, x, e in zip(exits, params_m, entries):
        ax1.annotate(f"exit {d}", (x, e["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax1.set(xlabel="member parameters (M)", ylabel="greedy accuracy (held-out VQA)", ylim=(0, 1.02))
    ax1.legend(fontsize=7)
    ax2.bar([f"exit {d}" for d in exits], [e.get("tokens_per_s", 0.0) for e in entries])
    ax2.set(ylabel="tokens/s (batch 1, greedy, with image)", title="decoding speed")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle("VL family trade-off: accuracy and speed per exit")
    fig.tight_layout()
    return save_figure(fig, out_dir / "tradeoff.png")


def gates(params: Params) -> dict[str, Any]:
    """The text profile's gates (`tasks.release.gates.judge`: the same suite, per-item intervals and verdict)
    on the VL metrics; the VL profile compresses nothing, so each exit's relative loss change is 0 by
    construction (`compression: none` in the metrics)."""
    import json

    from data_contracts.gates import SUITE
    from tasks.core.stage import ContractViolation
    from tasks.release.gates import judge

    ws = Workspace.from_params(params)
    paths = (ws.metrics_dir / "eval_quality.json", ws.reproducible_metrics("rl"))
    for p in paths:
        if not p.is_file():
            raise StageError(f"{p} not found (run evaluate and rl with the VL profile first)")
    evals, rlm = (json.loads(p.read_text()) for p in paths)
    compress = {f"exit_{d}": {"relative_loss_change": 0.0} for d in params.model.exit_layers}
    where = (str(paths[0]), "no compression", str(paths[1]))
    result, metrics = judge(params, evals, compress, rlm, where, ws.eval_items, ws.rl_items)
    metrics["compression"] = "none"
    write_metrics(params, "gates", metrics)
    if not result.success:
        raise ContractViolation(
            f"VL model quality gates failed (verdict {metrics['verdict']}):\n{result.describe()}",
            [{"suite": SUITE, **f} for f in metrics["failures"]],
        )
    return metrics


def export(params: Params) -> dict[str, Any]:
    """Every member as a stock Qwen3VLForConditionalGeneration + the processor (`export_exits`), each
    reloaded with `AutoModelForImageTextToText` and checked against the family's logits."""
    import torch
    from transformers import AutoModelForImageTextToText

    from ruyi_model.export import export_exits

    if params.export.gguf_dtypes:
        raise StageError(
            "export.gguf_dtypes: llama.cpp has no Qwen3-VL converter here; set [] in the VL profile"
        )
    ws = Workspace.from_params(params)
    model = load_family(params, "rl").eval()
    processor = load_processor(params)
    out = ws.artifacts("export")
    manifest = export_exits(model, out, processor=processor)
    row = _rows(params, "eval", params.vl.tasks)[0]
    batch = processor(text=[_prompt(processor, row["question"])], images=[_image(row)], return_tensors="pt")
    diffs = {}
    for d in params.model.exit_layers:
        stock = AutoModelForImageTextToText.from_pretrained(out / manifest["members"][str(d)]["dir"]).eval()
        with torch.no_grad():
            diff = (stock(**batch).logits - model(**batch, exit_layer=d).logits).abs().max().item()
        if type(stock).__name__ != "Qwen3VLForConditionalGeneration" or diff > 1e-4:
            raise StageError(f"export: member {d} reloads as {type(stock).__name__}, max logit diff {diff}")
        diffs[f"exit_{d}"] = {
            "max_logit_diff": diff,
            "num_parameters": manifest["members"][str(d)]["num_parameters"],
        }
    metrics = {"modality": manifest["modality"], "members": diffs}
    write_metrics(params, "export", metrics)
    return metrics


def privacy(params: Params) -> dict[str, Any]:
    """The edge-cloud camera's privacy stage (`tasks.training.privacy_run.run_privacy`, the body of
    `python -m tasks.privacy`) on this profile's family: the edge runs the vision tower of
    `privacy.family_dir` (null: the profile's final family, `<artifacts_dir>/rl`), frozen. A failed gate
    raises ContractViolation after writing its metrics: nothing under `<artifacts_dir>/privacy`, so export
    and deploy (which depend on it) never run."""
    from tasks.training.privacy_run import run_privacy

    if params.privacy.family_dir is None:
        family = Workspace.from_params(params).artifacts("rl")
        params = params.model_copy(
            update={"privacy": params.privacy.model_copy(update={"family_dir": str(family)})}
        )
    return run_privacy(params)


def _png(row: dict[str, Any]) -> bytes:
    import io

    buf = io.BytesIO()
    _image(row).save(buf, format="PNG")
    return buf.getvalue()


def _camera_smoke(params: Params, url: str, camera_dir: Path) -> dict[str, Any]:
    """Adds a fetched camera release to the Serve instance at `url` (`tasks.release.camera.add_camera`)
    and sends it fresh clips: the cloud must answer every clip with the behaviours its head gives the
    exact bytes the edge sent (one float tensor `[N, k]`) and the answers its deep member gives them
    (`cloud_answers`), and refuse (4xx) the clips' pixels and features of another shape or dtype."""
    import torch
    from safetensors.torch import load

    from ruyi_model.camera import load_cloud, load_cloud_member
    from tasks.data.camgen import generate_split, make_identities
    from tasks.release.camera import add_camera, cloud_answers, encode_tensors, post_bytes, send_clip

    pp, n = params.privacy, params.deploy.smoke_prompts
    identities = make_identities(pp.identities, params.seed)
    clips = generate_split("deploy", n, identities, n_frames=pp.frames, size=pp.size, seed=params.seed + 1)
    head, contract, behaviours = load_cloud(camera_dir)
    t0 = time.perf_counter()
    add_camera(camera_dir, url)
    result = send_clip(url, clips.frames)
    latency = time.perf_counter() - t0
    z = load(result.sent_to_cloud)
    if list(z) != ["features"] or tuple(z["features"].shape) != (len(clips), contract.dim):
        raise StageError(f"camera smoke test: the edge sent {[(k, tuple(v.shape)) for k, v in z.items()]}")
    with torch.no_grad():
        want = [behaviours[i] for i in head(z["features"]).argmax(-1).tolist()]
    got = result.answers.get("behaviours")
    if got != want:
        raise StageError(f"camera smoke test: the cloud answered {got}, its head on the edge's bytes {want}")
    correct = sum(b == behaviours[i] for b, i in zip(got, clips.behaviour, strict=True))
    # the answers: the deep member's own greedy answers on the same bytes (or the head's rules)
    member = load_cloud_member(camera_dir / "cloud")
    want_answers = cloud_answers(member, z["features"], want, None)
    if result.answers.get("answers") != want_answers:
        raise StageError(
            f"camera smoke test: the cloud's answers {result.answers.get('answers')} differ from its "
            f"{'member' if member is not None else 'head'} on the edge's bytes {want_answers}"
        )
    qa = [
        a == gold
        for clip, pairs in zip(clips.clips, want_answers, strict=True)
        for (_, a), (_, gold) in zip(pairs, clip.questions, strict=True)
    ]
    # what the cloud must refuse: the clips' pixels (as a tensor, as float, under the edge's name, as
    # raw bytes) and features of another width or dtype
    pixels = torch.as_tensor(clips.frames)
    refused = {
        "pixels": encode_tensors({"features": pixels}),
        "float_pixels": encode_tensors({"features": pixels.float()}),
        "frames": encode_tensors({"frames": pixels}),
        "wrong_width": encode_tensors({"features": torch.zeros(len(clips), contract.dim - 1)}),
        "float64": encode_tensors({"features": torch.zeros(len(clips), contract.dim, dtype=torch.float64)}),
        "raw_bytes": pixels.numpy().tobytes(),
    }
    statuses = {name: post_bytes(f"{url}/cloud", body)[0] for name, body in refused.items()}
    if any(status < 400 for status in statuses.values()):
        raise StageError(f"camera smoke test: the cloud accepted what it must refuse: {statuses}")
    return {
        "clips": len(clips),
        "released_dim": contract.dim,
        "bytes_to_cloud": len(result.sent_to_cloud),
        "cloud_refused": statuses,
        "behaviour_accuracy": correct / len(clips),
        "answered_by": result.answers.get("answered_by"),
        "qa_accuracy": sum(qa) / len(qa),
        "start_and_round_trip_s": round(latency, 3),
    }


def deploy(params: Params) -> dict[str, Any]:
    """Publishes the export and the camera release, serves the export, smoke-tests it with images.

    The text deploy stage's pieces (tasks/deploy.py): `tasks.release.store.publish_dir` publishes
    `<artifacts_dir>/export` as `deploy.model_name` and the privacy stage's camera release
    (`<artifacts_dir>/privacy`: edge tower + mapping, cloud head + contract) as `<model_name>-camera`
    (each reused when the store already holds that content); the fetched export is served by
    `tasks.release.serving` (`serving_kwargs`), every `exit_<d>` tier must run the evaluated parameter
    count (`metrics/vl/eval_quality.json`), and every tier gets the first `deploy.smoke_prompts` eval
    images with their questions as OpenAI `image_url` data-URL parts: each answer must be exactly its
    exported stock member's under plain transformers (`tasks.release.vision.vl_smoke_test`) and the
    evaluate stage's answer of that member to that item (`reports/vl/evaluate/generations.jsonl`,
    `tasks.release.smoke`: a StageError in float32, a warning otherwise). Then the fetched camera
    release joins the same Serve instance (`/edge`, `/cloud`: `tasks.release.camera`) and is sent fresh
    clips, edge -> cloud, and what the cloud must refuse (`_camera_smoke`). Once all of that passed, both
    releases are marked validated in the store (`ArtifactStore.mark_validated`), which is what serving
    "the latest" follows."""
    import json
    import statistics

    from tasks.release.serving import check_served_params, serving_kwargs, start_serving
    from tasks.release.smoke import check_same_as_evaluate, compare_with_evaluate, evaluated_completions
    from tasks.release.store import content_digest, open_store, publish_dir
    from tasks.release.vision import vl_smoke_rows, vl_smoke_test

    cfg, ws = params.deploy, Workspace.from_params(params)
    root = require_dir(ws.artifacts("export"), "VL export (run the export stage)", "manifest.json")
    camera_dir = require_dir(
        ws.artifacts("privacy"), "camera release (run the privacy stage)", "manifest.json"
    )
    manifest = json.loads((root / "manifest.json").read_text())
    exits = manifest["exit_layers"]
    # the reproducible part of evaluate's metrics (eval.json adds the measured tokens/s: not an output)
    eval_path = ws.metrics_dir / "eval_quality.json"
    if not eval_path.is_file():
        raise StageError(f"{eval_path} not found (run evaluate with the VL profile first)")
    evaluated = json.loads(eval_path.read_text())
    eval_params = {d: evaluated[f"exit_{d}"]["num_parameters"] for d in exits}
    generations_path, evaluated_answers = evaluated_completions(params)
    rows = _rows(params, "eval", params.vl.tasks)[: cfg.smoke_prompts]
    if not rows:
        raise StageError(f"{ws.validated / 'eval.jsonl'}: no VQA rows for the smoke test")
    store = open_store(cfg.store, cache_dir=cfg.store.cache_dir or ws.releases)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    meta = {"seed": params.seed, "exit_layers": exits, "modality": manifest["modality"]}
    release, reused = publish_dir(store, cfg.model_name, root, cfg.version, meta)
    camera_name = f"{cfg.model_name}-camera"
    camera, camera_reused = publish_dir(store, camera_name, camera_dir, cfg.version, {"seed": params.seed})
    release_dir = store.fetch(cfg.model_name, release.version)
    camera_release_dir = store.fetch(camera_name, camera.version)
    timings["publish_fetch_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    session = start_serving(release_dir, **serving_kwargs(cfg))
    per_tier: dict[str, dict[str, Any]] = {}
    try:
        timings["serve_start_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        tiers = {f"exit_{d}": {"weights": "dense"} for d in exits}
        check_served_params(session.url, eval_params, tiers, where=str(eval_path))
        latencies: dict[str, list[float]] = {t: [] for t in tiers}
        served: list[dict[str, Any]] = []  # one row per (tier, smoke item), as the text smoke test's
        for row in rows:
            t1 = time.perf_counter()
            answers = vl_smoke_test(session.url, root, row["question"], _png(row), cfg.smoke_max_tokens)
            for tier, got in answers.items():
                entry = per_tier.setdefault(
                    tier, {"exit_layer": got["exit_layer"], "requests": 0, "correct": 0, "answers": []}
                )
                entry["requests"] += 1
                entry["correct"] += is_correct(got["image_answer"], row["answer"])
                entry["answers"].append(got["image_answer"])
                latencies[tier].append((time.perf_counter() - t1) / len(answers))
            served += vl_smoke_rows(answers, row["id"])
        # every member must answer as evaluate's (batched, in-training-processor) greedy decoding did:
        # the export's processor and chat template are the ones the family was evaluated with
        same_budget = cfg.smoke_max_tokens == params.vl.max_answer_tokens
        for tier, checked in compare_with_evaluate(served, evaluated_answers, same_budget).items():
            per_tier[tier].update(checked)
            check_same_as_evaluate(tier, checked, generations_path, strict=cfg.dtype == "float32")
        timings["smoke_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        camera_smoke = _camera_smoke(params, session.url, camera_release_dir)
        timings["camera_s"] = time.perf_counter() - t0
    finally:
        t0 = time.perf_counter()
        session.stop()
        timings["serve_stop_s"] = time.perf_counter() - t0
    evidence = {"stage": "deploy", "smoke_prompts": len(rows), "smoke_max_tokens": cfg.smoke_max_tokens}
    store.mark_validated(cfg.model_name, release.version, {**evidence, "tiers": sorted(per_tier)})
    store.mark_validated(camera_name, camera.version, {**evidence, "camera_clips": camera_smoke["clips"]})
    for tier, entry in per_tier.items():
        entry.update(
            accuracy=entry.pop("correct") / entry["requests"],
            answers_match_export=True,
            params=eval_params[int(tier.split("_")[1])],
            request_s_mean=round(statistics.fmean(latencies[tier]), 3),
        )
    reproducible = {
        "model": cfg.model_name,
        "content_sha256": content_digest(release.files),
        "camera_content_sha256": content_digest(camera.files),
        "smoke_prompts": len(rows),
        "smoke_max_tokens": cfg.smoke_max_tokens,
        "tiers": {t: {k: v for k, v in r.items() if k != "request_s_mean"} for t, r in per_tier.items()},
        # the edge samples its release with a fresh seed: the cloud's answers are not reproducible
        "camera": {
            k: camera_smoke[k]
            for k in ("clips", "released_dim", "bytes_to_cloud", "cloud_refused", "answered_by")
        },
    }
    metrics = {
        **reproducible,
        "version": release.version,
        "release_uri": release.uri,
        "reused_release": reused,
        "camera_release_uri": camera.uri,
        "camera_reused_release": camera_reused,
        "store_uri": store.uri,
        "serving_url": session.url,
        "tiers": per_tier,
        "camera": camera_smoke,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    write_json(ws.reports("deploy") / "smoke.json", {"rows": [r["id"] for r in rows], "tiers": per_tier})
    write_metrics(params, "deploy_smoke", reproducible, split=False)
    write_metrics(params, "deploy", metrics, split=False)
    log.info(
        "deployed %s (%s) and %s: %s; camera started and answered in %.1f s",
        release.uri,
        "reused" if reused else "new",
        camera.uri,
        ", ".join(f"{t} {r['accuracy']:.0%}" for t, r in per_tier.items()),
        camera_smoke["start_and_round_trip_s"],
    )
    return metrics


STAGES: dict[str, Callable[[Params], dict[str, Any]]] = {
    "prepare_data": prepare_data,
    "validate_data": validate_data,
    "tokenizer": tokenizer,
    "cpt": cpt,
    "family_sft": family_sft,
    "rl": rl,
    "evaluate": evaluate,
    "gates": gates,
    "privacy": privacy,
    "export": export,
    "deploy": deploy,
}


def run_stage(name: str, params: Params) -> dict[str, Any]:
    if name not in STAGES:
        raise StageError(
            f"stage {name} has no vision-language version (model.modality: vl runs {', '.join(STAGES)}; "
            "docs/choices.md#vision-language-profile says why)"
        )
    return STAGES[name](params)
