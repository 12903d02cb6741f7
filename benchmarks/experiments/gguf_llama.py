"""The exported GGUF members run by llama.cpp (`llama-cpp-python`) against the HF members: greedy agreement
and tokens/s, side by side.

    python benchmarks/experiments/gguf_llama.py [--export artifacts/export] [--dtypes f32,q8_0]
        [--eval-file data/validated/eval.jsonl] [--num-prompts 20] [--max-new-tokens 32] [--threads 1]
        [--json out.json]

For every member `exit_<d>/` of an export (the export stage's layout) and every dtype whose
`exit_<d>/model-<dtype>.gguf` exists: the first N held-out questions (eval.jsonl) as chat prompts, the
HF member (`Qwen3ForCausalLM`, fp32, KV cache) and llama.cpp (`llama_cpp.Llama` on the GGUF file, greedy:
temperature 0, no repetition penalty) each decode up to --max-new-tokens greedily from the same prompt
ids, stopping at the member's eos (`<|im_end|>`). Columns: `agree` = share of prompts whose
continuations are identical, `prefix` = mean share of the HF continuation that llama.cpp reproduces
before the first difference, `tok ids` = share of prompts that llama.cpp's own tokenizer (from the GGUF)
encodes to the HF ids, then tokens/s of each (new tokens / decoding wall time, batch 1, one prompt at
a time, both on --threads threads). Needs the optional extra `llama` (`make llama`).
Method: docs/choices.md#export; figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def load_questions(eval_file: Path, n: int) -> list[str]:
    from tasks.core.files import read_jsonl

    if not eval_file.is_file():
        raise SystemExit(f"{eval_file}: no such file (run prepare_data/validate_data, or pass --eval-file)")
    rows = read_jsonl(eval_file, required=("question",))[:n]
    if not rows:
        raise SystemExit(f"{eval_file}: no questions")
    return [str(r["question"]) for r in rows]


def hf_greedy(model, prompts: list[list[int]], max_new: int, eos: int) -> tuple[list[list[int]], float]:
    """Greedy continuations (eos excluded) and the total decoding wall time in seconds."""
    import torch

    outs, seconds = [], 0.0
    with torch.inference_mode():
        for ids in prompts:
            t0 = time.perf_counter()
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
            seconds += time.perf_counter() - t0
            new = out[0, len(ids) :].tolist()
            outs.append(new[: new.index(eos)] if eos in new else new)
    return outs, seconds


def llama_greedy(llm, prompts: list[list[int]], max_new: int, eos: int) -> tuple[list[list[int]], float]:
    outs, seconds = [], 0.0
    for ids in prompts:
        new: list[int] = []
        t0 = time.perf_counter()
        for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if tok == eos or tok == llm.token_eos():
                break
            new.append(int(tok))
            if len(new) >= max_new:
                break
        seconds += time.perf_counter() - t0
        outs.append(new)
    return outs, seconds


def _prefix(a: list[int], b: list[int]) -> float:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n / max(len(a), 1) if a else float(not b)


def run(args) -> list[dict]:
    import torch
    from llama_cpp import Llama
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from ruyi_model.decoding import encode_prompts

    torch.set_num_threads(args.threads)
    export = Path(args.export)
    manifest_file = export / "manifest.json"
    if not manifest_file.is_file():
        raise SystemExit(f"{manifest_file}: not an export (run the export stage first, or pass --export)")
    manifest = json.loads(manifest_file.read_text())
    questions = load_questions(Path(args.eval_file), args.num_prompts)
    rows = []
    for d in manifest["exit_layers"]:
        member_dir = export / f"exit_{d}"
        tokenizer = AutoTokenizer.from_pretrained(member_dir, local_files_only=True)
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        prompts = encode_prompts(tokenizer, questions)
        hf = Qwen3ForCausalLM.from_pretrained(member_dir, dtype=torch.float32, local_files_only=True).eval()
        hf_out, hf_s = hf_greedy(hf, prompts, args.max_new_tokens, eos)
        del hf
        for dtype in args.dtypes:
            path = member_dir / f"model-{dtype}.gguf"
            if not path.is_file():
                print(f"exit_{d}: no {path.name}, skipped", file=sys.stderr)
                continue
            llm = Llama(
                model_path=str(path),
                n_ctx=max(len(p) for p in prompts) + args.max_new_tokens + 8,
                n_threads=args.threads,
                n_threads_batch=args.threads,
                n_batch=512,
                seed=0,
                verbose=False,
            )
            texts = [tokenizer.decode(p) for p in prompts]
            tok_same = sum(
                llm.tokenize(t.encode(), add_bos=False, special=True) == p for t, p in zip(texts, prompts)
            )
            ll_out, ll_s = llama_greedy(llm, prompts, args.max_new_tokens, eos)
            del llm
            rows.append(
                {
                    "member": f"exit_{d}",
                    "dtype": dtype,
                    "file_mib": round(path.stat().st_size / 2**20, 2),
                    "prompts": len(prompts),
                    "agree": sum(a == b for a, b in zip(hf_out, ll_out)) / len(prompts),
                    "prefix": sum(_prefix(a, b) for a, b in zip(hf_out, ll_out)) / len(prompts),
                    "tokenizer_ids_equal": tok_same / len(prompts),
                    "hf_new_tokens": sum(map(len, hf_out)),
                    "hf_tok_s": sum(map(len, hf_out)) / hf_s,
                    "llama_new_tokens": sum(map(len, ll_out)),
                    "llama_tok_s": sum(map(len, ll_out)) / ll_s,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", type=Path, default=REPO / "artifacts" / "export")
    ap.add_argument("--dtypes", default="f32,q8_0", help="comma-separated: f32,f16,q8_0")
    ap.add_argument("--eval-file", type=Path, default=REPO / "data" / "validated" / "eval.jsonl")
    ap.add_argument("--num-prompts", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="threads of both runtimes")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    args.dtypes = [x.strip() for x in args.dtypes.split(",") if x.strip()]
    bad = [x for x in args.dtypes if x not in ("f32", "f16", "q8_0")]
    if bad or args.num_prompts < 1 or args.max_new_tokens < 1 or args.threads < 1:
        ap.error(f"bad arguments (dtypes {bad or 'ok'}; counts must be positive)")
    try:
        import llama_cpp
    except ImportError:
        print("llama_cpp is not installed: `make llama` (the optional extra `llama`)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows = run(args)
    print(
        f"# llama-cpp-python {llama_cpp.__version__}, {platform.machine()} {platform.processor() or ''}, "
        f"{args.threads} thread(s), {args.num_prompts} prompts x {args.max_new_tokens} new tokens max, "
        f"{time.perf_counter() - t0:.1f} s"
    )
    print("| member | dtype | GGUF MiB | agree | prefix | tok ids | HF tok/s | llama.cpp tok/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['member']} | {r['dtype']} | {r['file_mib']} | {r['agree']:.2f} | {r['prefix']:.2f} | "
            f"{r['tokenizer_ids_equal']:.2f} | {r['hf_tok_s']:.1f} | {r['llama_tok_s']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
