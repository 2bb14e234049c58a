"""onnxruntime-genai 0.18's speculative decoding on the same target and draft as `speculative.py run`.

Models (once, under WORK/genai-spec/<target label>/, WORK = `speculative.py run`'s --work): both checkpoints
through `edgegpt convert` to Hugging Face directories, then genai's model builder (`-p int8 -e cpu`, in
PEERS/venv-builder, PEERS = --peers-work) for each. `plain` is the target as built; `draft` is the same
folder with the draft's built model under draft/ and named in genai_config.json's `model.draft` (its
decoder section: file name, shapes, input and output names). Its n-gram lookup is
`GeneratorParams.set_speculative_options(ngram_size=N)` on the plain model. genai's greedy is
`do_sample=False`; temperature 0.8 is `do_sample=True` with top_k = the vocabulary (its top-k is on by
default) and top_p 1.

Measurement runs in a fresh process (PEERS/venv-peers's interpreter running this file) per run: the same
prompts' token ids, exactly `new` tokens each (min_length = max_length: eos ignored), timed from after the
first token to the last, like `speculative.py run`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

MODES = ("plain", "draft", "lookup")
NGRAM = 3  # the n-gram length genai's lookup matches (it needs >= 2)


def prepare(work: Path, peers: Path, target_checkpoint: Path, draft_checkpoint: Path,
            threads: int) -> dict[str, Path]:
    """{"plain": built target, "draft": built target with the built draft beside it}, under `work`; the venvs
    are `runtimes.py setup`'s, under `peers`."""
    from .models import Models, model_label
    from .processes import log, run_logged
    from .setup import builder_python

    builder = builder_python(peers)
    if not builder.exists():
        raise RuntimeError(f"{builder} is missing: run `python benchmarks/runtimes.py setup`")
    root = work / "genai-spec" / model_label(target_checkpoint)
    root.mkdir(parents=True, exist_ok=True)
    models = Models(target_checkpoint, work, threads)

    def build(checkpoint: Path, name: str) -> Path:
        def make(out: Path) -> None:
            from edgegpt.convert import convert

            hf = root / f"{name}-hf"
            shutil.rmtree(hf, ignore_errors=True)
            convert(checkpoint, hf)
            run_logged([builder, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", out, "-p", "int8",
                        "-e", "cpu", "-c", root / "cache"])
            set_threads(out / "genai_config.json", "decoder", threads)
        return models.once(root / f"{name}-int8", make)

    plain = build(target_checkpoint, "target")
    draft_built = build(draft_checkpoint, "draft")

    def combine(out: Path) -> None:
        shutil.copytree(plain, out)
        shutil.copytree(draft_built, out / "draft")
        config = json.loads((out / "genai_config.json").read_text())
        draft_config = json.loads((draft_built / "genai_config.json").read_text())["model"]["decoder"]
        draft_config["filename"] = "draft/" + draft_config["filename"]
        config["model"]["draft"] = draft_config
        (out / "genai_config.json").write_text(json.dumps(config, indent=2))
    log(f"genai models under {root}")
    return {"plain": plain, "draft": models.once(root / "target-with-draft", combine)}


def set_threads(config_path: Path, section: str, threads: int) -> None:
    """genai takes its intra-op threads from the session options in genai_config.json."""
    config = json.loads(config_path.read_text())
    config["model"][section].setdefault("session_options", {})["intra_op_num_threads"] = threads
    config_path.write_text(json.dumps(config, indent=2))


def skipped_row(reason: str) -> dict:
    return {"part": "shakespeare", "prompts": "continuation", "sampling": "-", "mode": "onnxruntime-genai",
            "skipped": reason[:300], "acceptance": None, "tokens_per_step": 1.0, "decode_tokens_per_s": None,
            "runs_tokens_per_s": [], "x_plain": None, "same_text": None}


def run_once(args: argparse.Namespace, ids: list[list[int]], paths: dict[str, Path], run: int) -> dict:
    """One run in a fresh genai process: {"sampling|mode": {tokens, seconds, proposed, accepted, ...}}."""
    from .processes import log, spawn
    from .setup import peers_python

    prompt_file = args.work / "genai-prompts.json"
    prompt_file.write_text(json.dumps(ids))
    stdout, _, _ = spawn([peers_python(args.peers), Path(__file__), "--plain", paths["plain"], "--draft",
                          paths["draft"], "--prompts", prompt_file, "--new", args.new_tokens, "--samplings",
                          *args.samplings, "--seed", run])
    result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
    log(f"genai run {run + 1}/{args.runs}: " + ", ".join(
        f"{k} {v['tokens'] / v['seconds']:.0f}" for k, v in result.items() if v.get("seconds")))
    return result


def rows(samples: list[dict]) -> list[dict]:
    """The rows of `speculative.py run`'s table for genai (plain, draft, lookup per sampling setting)."""
    table = []
    for key in samples[0]:
        sampling, mode = key.split("|")
        rates = [s[key]["tokens"] / s[key]["seconds"] for s in samples if s[key].get("seconds")]
        plain_rates = [s[f"{sampling}|plain"]["tokens"] / s[f"{sampling}|plain"]["seconds"] for s in samples
                       if s[f"{sampling}|plain"].get("seconds")]
        proposed = sum(s[key].get("proposed", 0) for s in samples)
        accepted = sum(s[key].get("accepted", 0) for s in samples)
        steps = sum(s[key].get("target_steps", 0) for s in samples)
        made = sum(s[key].get("emitted", 0) for s in samples)
        error = next((s[key]["error"] for s in samples if s[key].get("error")), None)
        table.append({
            "part": "shakespeare", "prompts": "continuation", "sampling": sampling, "mode": f"genai {mode}",
            "acceptance": round(accepted / proposed, 3) if proposed else None,
            "tokens_per_step": round(made / steps, 2) if steps and mode != "plain" else 1.0,
            "decode_tokens_per_s": round(statistics.median(rates), 1) if rates else None,
            "runs_tokens_per_s": [round(x, 1) for x in rates],
            "x_plain": None, "same_text": None, "genai_x_plain": (
                round(statistics.median([a / b for a, b in zip(rates, plain_rates)]), 3) if rates else None),
            **({"skipped": error} if error else {}),
        })
    return table


# -- the measuring process (runs in PEERS/venv-peers) ------------------------------------------------------------


def search_options(sampling: str, vocab: int, total: int) -> dict:
    options = {"max_length": total, "min_length": total, "repetition_penalty": 1.0}
    if sampling == "greedy":
        return {**options, "do_sample": False}
    return {**options, "do_sample": True, "temperature": 0.8, "top_k": vocab, "top_p": 1.0,
            **({"repetition_penalty": 1.1} if "rep" in sampling else {})}


def generate(og, model, ids: list[int], new: int, sampling: str, vocab: int, seed: int, ngram: bool) -> dict:
    params = og.GeneratorParams(model)
    params.set_search_options(**search_options(sampling, vocab, len(ids) + new), random_seed=seed)
    if ngram:
        params.set_speculative_options(ngram_size=NGRAM)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    generator.generate_next_token()  # the first token, from the prompt's logits
    t0 = time.perf_counter()
    made = 1
    while not generator.is_done():
        generator.generate_next_token()
        made += 1
    seconds = time.perf_counter() - t0
    out = {"tokens": made - 1, "seconds": seconds}
    try:
        stats = generator.get_speculative_stats()
    except Exception:  # plain decoding has none
        stats = {}
    if stats:
        # Steps where nothing was guessed (a lookup miss) run as plain decoding steps, outside its rounds.
        fallback = int(stats.get("standard_fallback_steps", 0))
        out.update(proposed=int(stats.get("draft_tokens_evaluated", stats.get("draft_tokens_proposed", 0))),
                   accepted=int(stats.get("draft_tokens_accepted", 0)),
                   target_steps=int(stats.get("target_forward_passes", 0)) + fallback,
                   emitted=int(stats.get("tokens_emitted", 0)) + fallback)
    return out


def measure(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plain")
    parser.add_argument("--draft")
    parser.add_argument("--prompts")
    parser.add_argument("--new", type=int)
    parser.add_argument("--samplings", nargs="*")
    parser.add_argument("--seed", type=int)
    args = parser.parse_args(argv)
    import onnxruntime_genai as og

    models = {"plain": og.Model(args.plain), "draft": og.Model(args.draft)}
    vocab = json.loads((Path(args.plain) / "genai_config.json").read_text())["model"]["vocab_size"]
    prompts = json.loads(Path(args.prompts).read_text())
    result: dict[str, dict] = {}
    for sampling in args.samplings:  # warm-up
        for mode in MODES:
            try:
                generate(og, models["plain" if mode != "draft" else "draft"], prompts[0], 16, sampling, vocab, 0,
                         mode == "lookup")
            except Exception as e:
                result[f"{sampling}|{mode}"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    for p, ids in enumerate(prompts):
        for sampling in args.samplings:
            for mode in MODES:
                key = f"{sampling}|{mode}"
                if "error" in result.get(key, {}):
                    continue
                total = result.setdefault(key, {"tokens": 0, "seconds": 0.0})
                one = generate(og, models["plain" if mode != "draft" else "draft"], ids, args.new, sampling, vocab,
                               1000 * args.seed + p, mode == "lookup")
                for name, value in one.items():
                    total[name] = total.get(name, 0) + value
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    measure(sys.argv[1:])
