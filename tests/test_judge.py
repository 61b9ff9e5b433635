"""`python -m distill.evaluate --out` (distill/judge.py) end to end on the demo pipeline folder (written by
diffusers' save_pretrained): the reference row at distance 0, the same report from the same seed, a rerun that
renders only its new rows, a folder made with another LoRA refused without --overwrite, two LoRAs of one file name
in two rows, the demo table's flags refused, one image per row, and what sec/img times."""

from __future__ import annotations

import json
import re

import pytest
from safetensors.torch import load_file, save_file
from test_evaluate_refusals import refused

from distill.evaluate import main
from sampling.demo import DEMO_FOLDER, DEMO_LORA
from weights.io import file_sha256, read_header

COMMON = ["--prompts", "a red circle", "a blue square at the top", "--per-prompt", "2", "--teacher-steps", "6",
          "--device", "cpu", "--dtype", "fp32"]


def run(out, lora="demo", steps=("2",), *extra) -> int:
    return main(["--lora", lora, *COMMON, "--steps", *steps, "--out", str(out), *extra])


def report(out) -> dict:
    return json.loads((out / "report.json").read_text())


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "sec/img"} for r in rows]


def expected_row(out, folder: str, ref_folder: str) -> dict:
    """A row's columns worked out from its saved files with distill/metrics.py (and the demo world's reader)
    directly: image (b, i) is noise b of prompt i (`{b:03d}_{i:03d}.png`, row i of `latents-{b:03d}`), paired
    with the reference's image of the same name; diversity (pairwise, vendi) within each prompt, over its noises,
    averaged over the prompts."""
    import numpy as np
    import torch
    from PIL import Image

    from distill import metrics
    from distill.demo import quality

    prompts, noises = COMMON[1:3], int(COMMON[4])

    def files(name):
        pixels = {(b, i): np.asarray(Image.open(out / name / f"{b:03d}_{i:03d}.png").convert("RGB"))
                  for b in range(noises) for i in range(len(prompts))}
        latents = {b: load_file(out / name / f"latents-{b:03d}.safetensors")["latents"] for b in range(noises)}
        return pixels, {(b, i): latents[b][i] for b in range(noises) for i in range(len(prompts))}

    (pixels, latents), (ref_pixels, ref_latents) = files(folder), files(ref_folder)
    pairs = sorted(pixels)
    a, b = (np.stack([p[k] for k in pairs]) / 255 for p in (pixels, ref_pixels))
    lat, ref_lat = (torch.stack([t[k] for k in pairs]) for t in (latents, ref_latents))
    feats, ref_feats = metrics.latent_features(lat), metrics.latent_features(ref_lat)
    psnrs = [metrics.psnr(x, y) for x, y in zip(a, b)]
    is_ref = folder == ref_folder

    def per_prompt(fn):
        return float(np.mean([fn(np.stack([feats[pairs.index((n, i))] for n in range(noises)]))
                              for i in range(len(prompts))]))

    row = {"nfe": json.loads((out / folder / "manifest.json").read_text())["steps"],  # one call per step
           "mean|d|": metrics.mean_abs(a, b), "psnr": None if is_ref else float(np.mean(psnrs)),
           "ssim": metrics.ssim(a, b), "lat mse": metrics.mse(lat, ref_lat), "fd": metrics.frechet(feats, ref_feats),
           "kid": 0.0 if is_ref else metrics.kid(feats, ref_feats),
           "pairwise": per_prompt(metrics.pairwise), "vendi": per_prompt(metrics.vendi)}
    per_image = [prompts[i] for _, i in pairs]
    scored, ref_scored = (quality.score(np.stack([p[k] for k in pairs]), per_image) for p in (pixels, ref_pixels))
    hist = quality.histogram_distances(scored["reads"], ref_scored["reads"], per_image)
    return row | {"adherence": scored["adherence"], "hist": float(np.mean(list(hist.values())))}  # base: no style


def test_report_reference_reruns_and_refusals(tmp_path, capsys):
    assert run(tmp_path / "a") == 0
    rows = report(tmp_path / "a")["rows"]
    assert [r["name"] for r in rows] == ["teacher 6", "teacher 2", "student 2"]
    for row, folder in zip(rows, ("teacher_6", "teacher_2", "student_2")):  # every column, from the files
        want = expected_row(tmp_path / "a", folder, "teacher_6")
        assert set(row) == {"name", "sec/img", *want}
        for column, value in want.items():
            assert row[column] == (value if value is None else pytest.approx(value, rel=1e-9, abs=1e-12)), (
                row["name"], column)
    ref = rows[0]
    assert (ref["mean|d|"], ref["psnr"], ref["ssim"], ref["lat mse"], ref["fd"]) == (0, None, 1, 0, 0)
    assert all(r["mean|d|"] > 0 and r["psnr"] > 0 and r["fd"] > 0 for r in rows[1:]) and rows[2]["nfe"] == 2
    assert ref["hist"] == 0 and all(0 <= r["adherence"] <= 100 for r in rows)  # the demo world's columns
    assert (tmp_path / "a" / "grid.png").exists() and len(list((tmp_path / "a" / "student_2").glob("*.png"))) == 4
    manifest = json.loads((tmp_path / "a" / "student_2" / "manifest.json").read_text())
    assert manifest["loras"][0]["file"] == DEMO_LORA.name and manifest["steps"] == 2

    assert run(tmp_path / "b") == 0  # the same seed: the same report
    assert without_timing(report(tmp_path / "b")["rows"]) == without_timing(rows)

    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*/*.png")}  # the rows' images
    capsys.readouterr()
    assert run(tmp_path / "a", "demo", ("2", "4")) == 0
    err = capsys.readouterr().err
    assert "rendering teacher 4" in err and "rendering student 4" in err and "rendering student 2" not in err
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # nothing rendered again

    other = tmp_path / "other.safetensors"
    save_file({k: v * 0.5 for k, v in load_file(DEMO_LORA).items()}, other, read_header(DEMO_LORA)[1])
    assert re.search("student_2: rendered with other settings .* pass --overwrite", refused(
        ["--lora", str(other), *COMMON, "--steps", "2", "--out", str(tmp_path / "a")], during_run=True))
    assert run(tmp_path / "a", str(other), ("2",), "--overwrite") == 0
    assert report(tmp_path / "a")["rows"][2]["mean|d|"] != rows[2]["mean|d|"]


def test_a_whole_model_compares_from_the_same_noises(tmp_path):
    """--compare-model: another model's rows (here the demo folder named as a model: generate's defaults for a
    named model, so not the demo's own rows), rendered after the first model is released."""
    assert run(tmp_path, "demo", ("2",), "--compare-model", str(DEMO_FOLDER)) == 0
    rows = report(tmp_path)["rows"]
    assert [r["name"] for r in rows][-1] == "flux-demo 2" and rows[-1]["nfe"] == 2
    manifest = json.loads((tmp_path / "flux-demo_2" / "manifest.json").read_text())
    assert manifest["model"] == str(DEMO_FOLDER) and manifest["loras"] == []


def test_clip_columns_with_the_users_clip_weights(tmp_path):
    """--clip-vision: CLIP score per row equals 100 max(cos, 0) computed with transformers' CLIPModel on the
    row's PNGs (a tiny random CLIPModel on CLIP's real vocabulary, saved as the real files are)."""
    import dataclasses

    import numpy as np
    import torch
    from PIL import Image
    from test_clip_vision import TEXT, VISION
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from model.tokenizers import CLIPTokenizer

    text = dataclasses.replace(TEXT, vocab_size=49408, eos_token_id=49407)
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "hidden_act", "eos_token_id")
    config = CLIPConfig(text_config={**{n: getattr(text, n) for n in names}, "bos_token_id": 49406,
                                     "pad_token_id": 49407},
                        vision_config={f.name: getattr(VISION, f.name) for f in dataclasses.fields(VISION)},
                        projection_dim=VISION.projection_dim)
    torch.manual_seed(0)
    hf = CLIPModel(config).eval()
    hf.save_pretrained(tmp_path / "clip")
    assert run(tmp_path / "eval", "demo", ("2",), "--clip-vision", str(tmp_path / "clip")) == 0
    rows = {r["name"]: r for r in report(tmp_path / "eval")["rows"]}
    assert rows["teacher 6"]["fd clip"] == pytest.approx(0, abs=1e-6) and rows["teacher 6"]["cmmd"] == 0
    prompts = COMMON[1:3]
    images = [Image.open(tmp_path / "eval" / "student_2" / f"{b:03d}_{i:03d}.png") for b in range(2) for i in range(2)]
    with torch.no_grad():
        pixels = CLIPImageProcessorPil(size={"shortest_edge": VISION.image_size},
                                       crop_size=VISION.image_size)(images, return_tensors="pt")["pixel_values"]
        img = hf.get_image_features(pixel_values=pixels).pooler_output
        txt = hf.get_text_features(input_ids=CLIPTokenizer.load()(prompts)).pooler_output[[0, 1, 0, 1]]
    cos = torch.nn.functional.cosine_similarity(img, txt)
    want = float(np.mean((100 * cos.clamp(min=0)).numpy()))
    assert rows["student 2"]["clip"] == pytest.approx(want, rel=1e-5)


def small(out, *extra) -> list[str]:
    """One prompt, two noises, 2-step reference, 1-step rows: the cheapest run that still has two images a row."""
    return ["--prompts", "a red circle", "--per-prompt", "2", "--teacher-steps", "2", "--steps", "1", "--device",
            "cpu", "--dtype", "fp32", "--out", str(out), *extra]


def test_compare_loras_of_one_file_name_get_their_folder_in_the_row_name(tmp_path):
    """The seed-comparison workflow: runs/a and runs/b each hold scfm-lora-slow_ema.safetensors. Both rows are
    rendered, each from its own file (the stem alone put both in one folder: refused, or with --overwrite the
    first one's images deleted and its row scored on the second's)."""
    a, b = (tmp_path / "runs" / s / "scfm-lora-slow_ema.safetensors" for s in "ab")
    a.parent.mkdir(parents=True), b.parent.mkdir()
    save_file(load_file(DEMO_LORA), a, read_header(DEMO_LORA)[1])
    save_file({k: v * 0.5 for k, v in load_file(DEMO_LORA).items()}, b, read_header(DEMO_LORA)[1])
    out = tmp_path / "eval"
    assert main(small(out, "--compare", f"{a}:1", "--compare", f"{b}:1")) == 0
    rows = {r["name"]: r for r in report(out)["rows"]}
    assert list(rows) == ["teacher 2", "teacher 1", "a/scfm-lora-slow_ema@1 1", "b/scfm-lora-slow_ema@1 1"]
    for name, path in (("a", a), ("b", b)):
        folder = out / f"{name}--scfm-lora-slow_ema-at-1_1"
        assert len(list(folder.glob("*.png"))) == 2
        assert json.loads((folder / "manifest.json").read_text())["loras"][0]["sha256"] == file_sha256(path)
    assert rows["a/scfm-lora-slow_ema@1 1"]["mean|d|"] != rows["b/scfm-lora-slow_ema@1 1"]["mean|d|"]

    from distill.judge import file_labels  # deeper when the nearest folders share a name too

    assert file_labels(["/r/a/x.safetensors", "/r/b/x.safetensors", "/q/a/x.safetensors", "/r/a/y.safetensors"],
                       lambda p: p.stem) == ["r/a/x", "b/x", "q/a/x", "y"]
    for twice in ([f"{a}:1", f"{a}:1"], [f"{a}:1", f"{tmp_path}/runs/../runs/a/{a.name}:1"]):  # refused, no render
        msg = refused(small(tmp_path / "twice", "--compare", twice[0], "--compare", twice[1]))
        assert msg.startswith("error: row 'scfm-lora-slow_ema@1 1' is asked for twice"), msg
    assert not (tmp_path / "twice").exists()


def test_flags_of_the_demo_table_are_refused_with_out_and_threads_is_read(tmp_path, monkeypatch):
    """--json, --grid, --no-grid, --grid-scale, --floor and a second --lora were read by the demo table alone and
    silently ignored with --out: refused in one line before anything loads. --threads is read (a stand-in judge
    records the threads it ran with; the caller's are restored)."""
    import torch

    import distill.judge

    out = tmp_path / "eval"
    flags = ["--json", str(tmp_path / "t.json"), "--grid", str(tmp_path / "g.png"), "--no-grid", "--grid-scale",
             "3", "--floor"]
    msg = refused(small(out, *flags))
    assert msg.startswith("error: --json, --grid, --no-grid, --grid-scale, --floor: not read with --out; it "
                          f"writes {out}/report.json"), msg
    assert refused(small(out, "--lora", "demo", "--lora", "demo")) == ("error: a second --lora: not read with "
                                                                        "--out; pass the other LoRAs as --compare "
                                                                        "PATH[:SCALE]")
    assert not out.exists()

    seen = []

    def stand_in(args):
        seen.append(torch.get_num_threads())
        raise ValueError("stand-in")

    monkeypatch.setattr(distill.judge, "judge", stand_in)
    before = torch.get_num_threads()
    assert refused(small(out, "--threads", str(before + 1))) == "error: stand-in"
    assert seen == [before + 1] and torch.get_num_threads() == before


def test_one_image_per_row_reports_null_and_a_failure_leaves_no_report(tmp_path, monkeypatch):
    """--per-prompt 1 with one prompt: the Fréchet distance needs a covariance (two images) and crashed after all
    the rendering; now null, as KID already was, and so is the diversity of one noise. A failure after rendering
    leaves neither the session's _app folder nor a report or grid. In the variant world the style column is there
    (without --out too; the base world's table drops it: test_report_reference_reruns_and_refusals)."""
    import distill.judge

    out = tmp_path / "eval"
    argv = small(out, "--world", "variant")
    argv[1:4] = ["a red circle at the top left", "--per-prompt", "1"]  # a caption whose shape the 2-step teacher finds

    def failing(*args):
        raise ValueError("scoring failed")

    monkeypatch.setattr(distill.judge, "scored", failing)
    assert refused(argv, during_run=True) == "error: scoring failed"
    assert sorted(p.name for p in out.iterdir()) == ["teacher_1", "teacher_2"]  # the rendered rows, kept
    monkeypatch.undo()
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "report.json", "teacher_1", "teacher_2"]
    ref, row = report(out)["rows"]
    assert (ref["fd"], ref["kid"], row["fd"], row["kid"]) == (0.0, 0.0, None, None)
    assert all(r["pairwise"] is None and r["vendi"] is None for r in (ref, row)) and row["mean|d|"] > 0
    assert ref["style"] == row["style"] == 0  # the teacher draws the base world's colours


def test_seconds_per_image_time_the_sampler_and_decode_only(tmp_path, monkeypatch):
    """sec/img is what sampling costs a user per image: the sampler's calls and the VAE decode. On a fake clock
    that the text encoders, the LoRA merge and a model's first (warm-up) call move far, and each sampling call by
    1 s and each decode by 0.5 s, every row reads 1.5 s per image (one prompt: one image per call), the student's
    included (the whole render was timed before: the student read slower than the teacher at the same NFE)."""
    import time

    from sampling.base import Pipeline
    from sampling.pipeline import FluxPipeline

    now, warm = [0.0], set()
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])

    def advancing(method, seconds, first=None):
        def call(self, *args, **kwargs):
            result = method(self, *args, **kwargs)
            now[0] += first if first is not None and (method, id(self)) not in warm else seconds
            warm.add((method, id(self)))
            return result
        return call

    monkeypatch.setattr(Pipeline, "encode_prompts", advancing(Pipeline.encode_prompts, 100))
    monkeypatch.setattr(Pipeline, "set_loras", advancing(Pipeline.set_loras, 1000))
    monkeypatch.setattr(FluxPipeline, "sample", advancing(FluxPipeline.sample, 1, first=50))
    monkeypatch.setattr(Pipeline, "decode", advancing(Pipeline.decode, 0.5, first=20))
    assert main(small(tmp_path / "eval", "--lora", "demo")) == 0
    rows = report(tmp_path / "eval")["rows"]
    assert [(r["name"], r["sec/img"]) for r in rows] == [("teacher 2", 1.5), ("teacher 1", 1.5), ("student 1", 1.5)]
