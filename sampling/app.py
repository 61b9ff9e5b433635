"""`python -m sampling.app`: the teacher against its few-step student, side by side in the browser.

    python -m sampling.app                                   # the built-in demo and its SCFM LoRA, on a CPU
    python -m sampling.app --model FLUX.1-dev/ --lora-dir runs/flux-scfm --lora-dir loras/styles
    python -m sampling.app --model sd3.5_large.safetensors --vae ... --fp8 --lora-dir runs/sd35-scfm

Compare: one prompt and seed; column A the teacher (its own steps and guidance), column B the student (an SCFM
LoRA at the steps, grid, shift and scale its metadata recommends, plus style LoRAs), an optional column C; each
image appears as it finishes, with its NFE and seconds, and a slider lays any two over each other. Sweep: one or
two axes among steps, LoRA scale, shift, guidance and seed, rendered as one labelled grid. Every image is the PNG
`sampling.generate` would write for the same settings (its parameters inside), served as written, and
`python -m sampling.generate --from-png IMAGE.png` renders it again. An empty seed box or -1 draws a random seed (shown
in the box, recorded in the PNGs). A sweep has at most 64 cells, and Stop ends it after the cell being sampled
(the cells done stay in --out). LoRAs saved into a --lora-dir folder after launch appear on Rescan (or a new tab).

The model is read once; a LoRA change merges on the loaded weights (sampling/compare.py). Only the model files and
the LoRAs named at launch (--lora, --lora-dir) are read; the server listens on 127.0.0.1 unless --host says
otherwise, is never shared without --share, and runs one job at a time (a queue): two users never hold the model's
memory twice. Needs the `ui` extra: pip install -e ".[ui]".
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

from weights.io import WeightsError

from .compare import AXES, MAX_CELLS, Column, Session, grid_image, parse_values, random_seed, sweep_columns
from .components import refuse_lora_model
from .demo import DEMO_LORA, IMAGE_SIZE
from .flags import add_model_files
from .options import OneLineParser, add_run_options, check_run_options, out_of_memory, plain_warnings

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported (below, in build_ui)

NAMES = ("A", "B", "C")
# small images (the demo's 64 px) drawn at the box's size, pixels kept sharp; the served PNG is untouched
CSS = "".join(f"#image-{n} img {{width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}}"
              for n in NAMES) + ".image-slider img {image-rendering: pixelated}"
PROMPT = "a red circle above a blue square"  # a caption of the demo's world (distill/demo)
# the LoRA scale sliders' range: negative scales are legitimate (a LoRA subtracted), and a LoRA may recommend more
# than 2; one recommending a scale outside it widens its slider (hint_values), which would otherwise refuse it
SCALE_RANGE = (-2.0, 4.0)
# gradio copies every image it serves into its cache (/tmp/gradio) and keeps it for good: files this page made are
# deleted hourly once an hour old, and all of them when the server stops (the PNGs in --out are never touched)
DELETE_CACHE = (3600, 3600)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m sampling.app", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_files(p)
    add_run_options(p.add_argument_group("run"))
    app = p.add_argument_group("app")
    app.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                     help="a folder whose .safetensors LoRAs the page offers (repeatable; default: the demo's)")
    app.add_argument("--out", help="where the PNGs go (default: a new temporary folder)")
    app.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    app.add_argument("--port", type=port_number, default=7860, help="the port to listen on, 1 to 65535 (default 7860)")
    app.add_argument("--share", action="store_true", help="a public gradio.live link (off unless asked)")
    return p


def port_number(text: str) -> int:
    """--port, checked while parsing (past 65535 was gradio's traceback after the model loaded); 0, a socket's "any
    free port", too: gradio then checks its server at port 0 and fails."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (1 to 65535); pass --port 7860 (the default)")
    return port


def _number(value, kind=float):
    """An optional number field (a textbox: an empty one is "the default", which a number box cannot say)."""
    text = "" if value is None else str(value).strip()
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number; leave the field empty for the default") from None


def pick_seed(seed, randomize: bool) -> int:
    """The page's Seed box: a random seed when asked to, or when the box is empty or -1 (A1111's and ComfyUI's
    "random"); the drawn seed is shown in the box and recorded in the PNGs like a typed one."""
    if randomize or seed is None or str(seed).strip() in ("", "-1"):
        return random_seed()
    seed = int(seed)
    if seed < 0:  # generate refuses it too, in the command line's words ("-1 does not mean random here")
        raise ValueError(f"Seed {seed}: seeds are 0 or more; leave the box empty or type -1 for a random one")
    return seed


def size(width, height) -> tuple[int, int]:
    """The page's Width and Height boxes (a cleared box is None)."""
    if width is None or height is None:
        raise ValueError("Width and Height need a number of pixels each")
    return int(width), int(height)


def optional(label: str):
    import gradio as gr

    return gr.Textbox(label=label, placeholder="default")


def scale_slider(label: str):
    import gradio as gr

    return gr.Slider(*SCALE_RANGE, value=1.0, step=0.05, label=label)


@contextmanager
def shown_in_page(session: Session):
    """A refusal, a full disk or an out-of-memory error in a page's handler as one line in the page (gradio shows
    any other exception as a bare "Error"). After running out of memory the next click samples again: the
    Session merges its LoRA stack afresh after a change that failed, and a column's reserved name is removed."""
    import gradio as gr
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # what the failed column held goes back before the next click
        line = out_of_memory(session.launch, "a smaller Width and Height").removeprefix("error: ")
        raise gr.Error(f"{line} (the flags: restart the app with them)") from None
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        fix = ("free some space on its disk" if e.errno in (errno.ENOSPC, errno.EDQUOT) else
               "check that file or folder and its permissions")
        raise gr.Error(f"{e.strerror or e}{where}; {fix} (the PNGs go to {session.out}), then try again") from None
    except (WeightsError, ValueError) as e:
        raise gr.Error(str(e)) from None


def describe(result, col: Column) -> str:
    loras = ", ".join(f"{Path(p).name} @ {s:g}" for p, s in col.loras) or "no LoRA"
    change = f"; LoRA change {result.lora_seconds:.2f} s" if result.lora_seconds else ""
    return f"{loras}: {result.nfe} NFE, {result.seconds:.2f} s{change}"


def build_ui(session: Session):
    import gradio as gr

    files = session.lora_files()
    choices = lora_choices(files)
    scfm = str(DEMO_LORA.resolve()) if session.demo else (files[0] if files else None)
    scfm = scfm if scfm in files else None  # a default the dropdown lacks would refuse every Generate
    side = IMAGE_SIZE if session.demo else 1024

    def hint_values(path):
        """The student's fields from a LoRA's metadata (empty where it states nothing)."""
        if not path:
            return scale(1.0), "", "", "", "no LoRA: the base model"
        with shown_in_page(session):
            h = session.hints(path)
        shift = h.shift if isinstance(h.shift, (int, float)) else ""
        said = ", ".join(f"{k} {v}" for k, v in (("steps", h.steps), ("grid", h.schedule), ("shift", h.shift),
                                                   ("guidance", h.guidance), ("scale", h.lora_scale)) if v is not None)
        text = [("" if v is None else str(v)) for v in (h.steps, shift, h.guidance)]
        # `is None`, not `or`: a recommended scale of 0 is 0
        return (scale(1.0 if h.lora_scale is None else h.lora_scale), *text,
                f"{Path(path).name} recommends: {said or 'nothing'}")

    def scale(value: float):
        """The scale slider at `value`, its range widened to take it (the slider refuses a value outside it)."""
        return gr.update(value=value, minimum=min(SCALE_RANGE[0], value), maximum=max(SCALE_RANGE[1], value))

    with gr.Blocks(title="scfm: compare", analytics_enabled=False, delete_cache=DELETE_CACHE) as ui:
        gr.Markdown(f"### scfm compare: {'the built-in demo' if session.demo else session.model}")
        paths = gr.State({})
        with gr.Tab("Compare"):
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", value=PROMPT if session.demo else "", elem_id="prompt", scale=3)
                # FLUX.1 reads a negative prompt only for its real CFG (--true-cfg), which the page does not
                # offer: generate refuses it there, so the box is not shown
                negative = gr.Textbox(label="Negative prompt", elem_id="negative", scale=2,
                                      visible=session.family.guidance != "embedding")
            with gr.Row():
                seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed", info="empty or -1: random")
                randomize = gr.Checkbox(label="Random seed (shown above once drawn)")
                width = gr.Number(label="Width", value=side, precision=0)
                height = gr.Number(label="Height", value=side, precision=0)
            with gr.Row():
                with gr.Column():
                    gr.Markdown("**A: teacher** (empty fields: the model's defaults)")
                    a_steps, a_guidance = optional("Steps"), optional("Guidance / CFG")
                with gr.Column():
                    gr.Markdown("**B: student**")
                    with gr.Row(equal_height=True):
                        b_lora = gr.Dropdown(choices, value=scfm or "", label="SCFM LoRA", scale=4)
                        # LoRAs saved into a --lora-dir after launch (a training run's export), without a restart
                        rescan = gr.Button("↻ Rescan", size="sm", scale=1, min_width=60, elem_id="rescan")
                    b_scale, b_steps, b_shift, b_guidance, b_hint = (
                        scale_slider("LoRA scale"), optional("Steps"), optional("Shift"),
                        optional("Guidance / CFG"), gr.Markdown())
                with gr.Column():
                    c_on = gr.Checkbox(label="C: another setting")
                    c_lora = gr.Dropdown(choices, value=scfm or "", label="LoRA")
                    c_scale, c_steps, c_shift, c_guidance, c_hint = (
                        scale_slider("LoRA scale"), optional("Steps"), optional("Shift"),
                        optional("Guidance / CFG"), gr.Markdown())
            with gr.Row():  # style LoRAs, merged with B's and C's
                styles = []
                for i in range(2):
                    styles.append((gr.Dropdown(choices, value="", label=f"Style LoRA {i + 1} (on B and C)"),
                                   scale_slider("Scale")))
            run = gr.Button("Generate", variant="primary", elem_id="generate")
            images, downloads, infos = [], [], []
            with gr.Row():
                for name in NAMES:
                    with gr.Column():
                        images.append(gr.Image(label=name, type="filepath", format="png", elem_id=f"image-{name}",
                                               interactive=False, height=320))
                        downloads.append(gr.File(label=f"{name} (PNG)", elem_id=f"file-{name}"))
                        infos.append(gr.Markdown(elem_id=f"info-{name}"))
            pair = gr.Radio(["A|B", "A|C", "B|C"], value="A|B", label="Slider: one image over the other")
            slider = gr.ImageSlider(type="filepath", format="png", label="A | B", max_height=320)
        with gr.Tab("Sweep"):
            gr.Markdown("Column B's settings, varied along one or two axes (values separated by commas).")
            with gr.Row():
                axis1, values1 = gr.Dropdown(list(AXES), value="steps", label="Axis 1"), gr.Textbox("1, 2, 4")
                axis2, values2 = gr.Dropdown(["(none)", *AXES], value="lora scale", label="Axis 2"), gr.Textbox(
                    "0.75, 1.0, 1.25")
            with gr.Row():
                run_sweep = gr.Button("Render grid", elem_id="sweep")
                stop_sweep = gr.Button("Stop", variant="stop", elem_id="stop-sweep")
            sweep_info = gr.Markdown(f"At most {MAX_CELLS} cells; Stop ends the sweep after the cell being sampled.",
                                     elem_id="sweep-info")
            grid, grid_file = gr.Image(type="filepath", format="png", label="Grid"), gr.File(label="Grid (PNG)")

        # each student column's fields from its own LoRA's metadata (C never takes B's guidance or scale)
        for lora, fields in ((b_lora, [b_scale, b_steps, b_shift, b_guidance, b_hint]),
                             (c_lora, [c_scale, c_steps, c_shift, c_guidance, c_hint])):
            lora.change(hint_values, lora, fields)
            ui.load(hint_values, lora, fields)

        def student(lora, scale, steps, shift, guidance, style_values):
            stack = [(lora, float(scale))] if lora else []
            stack += [(s, float(v)) for s, v in zip(style_values[::2], style_values[1::2]) if s]
            return Column(stack, _number(steps, int), _number(shift), _number(guidance))

        def compare(prompt, negative, seed, randomize, width, height, a_steps, a_guidance, b_lora, b_scale, b_steps,
                    b_shift, b_guidance, c_on, c_lora, c_scale, c_steps, c_shift, c_guidance, pair, *style_values,
                    progress=gr.Progress()):
            with shown_in_page(session):
                seed = pick_seed(seed, randomize)
                width, height = size(width, height)
                cols = {"A": Column([], _number(a_steps, int), None, _number(a_guidance)),
                        "B": student(b_lora, b_scale, b_steps, b_shift, b_guidance, style_values)}
                if c_on:
                    cols["C"] = student(c_lora, c_scale, c_steps, c_shift, c_guidance, style_values)
            shown = {n: (None, None, "") for n in NAMES}
            done: dict[str, str] = {}

            def outputs():
                flat = [x for n in NAMES for x in shown[n]]
                return [seed, *flat, done, pick(pair, done)]

            yield outputs()
            for name, col in cols.items():

                def step(i, n, _latents, name=name):  # the sampler's callback (sampling/samplers.py)
                    progress((i, n), desc=f"column {name}")

                with shown_in_page(session):
                    r = session.render(prompt, negative or "", seed, width, height, col, callback=step)
                done[name] = str(r.path)
                shown[name] = (str(r.path), str(r.path), describe(r, col))
                yield outputs()

        def pick(pair, done):
            a, b = pair.split("|")
            return (done[a], done[b]) if a in done and b in done else None

        compare_inputs = [prompt, negative, seed, randomize, width, height, a_steps, a_guidance, b_lora, b_scale,
                          b_steps, b_shift, b_guidance, c_on, c_lora, c_scale, c_steps, c_shift, c_guidance, pair,
                          *[x for s in styles for x in s]]
        outs = [seed, *[x for n in range(3) for x in (images[n], downloads[n], infos[n])], paths, slider]
        # Generate and Render grid share one queue slot (gradio limits each handler on its own by default): the
        # model is one, and Session.busy serialises what runs anyway (a cancelled job's thread, say)
        run.click(compare, compare_inputs, outs, concurrency_id="model", concurrency_limit=1)
        pair.change(pick, [pair, paths], slider)

        def sweep(prompt, negative, seed, randomize, width, height, b_lora, b_scale, b_steps, b_shift, b_guidance,
                  axis1, values1, axis2, values2, *style_values, progress=gr.Progress()):
            """A generator, each finished cell shown as it lands: gradio cancels a generator between two yields
            (Stop), where a plain function would run its whole sweep to the end."""
            from PIL import Image

            with shown_in_page(session):  # every refusal (too many cells too) before the first render
                axes = [(axis1, parse_values(axis1, values1))]
                if axis2 != "(none)":
                    axes.append((axis2, parse_values(axis2, values2)))
                width, height = size(width, height)
                base = student(b_lora, b_scale, b_steps, b_shift, b_guidance, style_values)
                seed = pick_seed(seed, randomize)
                cells = sweep_columns(base, seed, axes)
            yield seed, None, None, f"{len(cells)} cells: rendering the first"
            rendered = []
            for i, (labels, col, s) in enumerate(cells):
                where = f"cell {i + 1} of {len(cells)} ({', '.join(f'{k} {v}' for k, v in labels.items())})"

                def step(j, n, _latents, where=where):  # the sampler's callback (sampling/samplers.py)
                    progress((j, n), desc=where)

                with shown_in_page(session):
                    r = session.render(prompt, negative or "", s, width, height, col, callback=step)
                rendered.append(Image.open(r.path).convert("RGB"))
                # the cell's PNG (in --out already) in the grid's place until the grid is done: what a Stop keeps
                yield seed, str(r.path), gr.skip(), f"{where}: {r.path.name}"
            with shown_in_page(session):
                path = session.save_grid(grid_image(rendered, axes, [labels for labels, _, _ in cells]))
            yield seed, str(path), str(path), f"{len(cells)} cells: {path.name}"

        sweeping = run_sweep.click(sweep, [prompt, negative, seed, randomize, width, height, b_lora, b_scale, b_steps,
                                           b_shift, b_guidance, axis1, values1, axis2, values2,
                                           *[x for s in styles for x in s]], [seed, grid, grid_file, sweep_info],
                                   concurrency_id="model", concurrency_limit=1)
        # gradio's cancel: no handler of ours, so it never waits in the model's queue behind the sweep it stops
        stop_sweep.click(None, cancels=[sweeping])

        lora_boxes = [b_lora, c_lora, *[box for box, _ in styles]]

        def rescan_loras(*values):
            """The LoRA dropdowns offer the --lora-dir folders as they are now; a choice whose file is gone
            falls back to none (a dropdown refuses a value it does not offer)."""
            now = lora_choices(session.lora_files())
            offered = {v for _, v in now}
            return [gr.update(choices=now, value=v if v in offered else "") for v in values]

        rescan.click(rescan_loras, lora_boxes, lora_boxes)
        ui.load(rescan_loras, lora_boxes, lora_boxes)  # a tab opened later lists what is there then
    return ui


def lora_choices(files: list[str]) -> list[tuple[str, str]]:
    return [("none", ""), *((Path(f).name, f) for f in files)]  # a dropdown without "none" picks the first file


def check_launch_files(args) -> None:
    """Before the model loads: a --lora-dir that is a file (Session refuses a missing one), a LoRA as --model."""
    for d in args.lora_dir:
        if Path(d).expanduser().is_file():
            lora = f", or this file as --lora {d}" if d.endswith(".safetensors") else ""
            raise ValueError(f"--lora-dir {d}: a file, not a folder; pass a folder of .safetensors LoRAs{lora}")
    if args.model is not None:
        refuse_lora_model(args.model)


def check_port(host: str, port: int) -> None:
    """Bind the address the server will listen on, and let it go: a port in use fails now, in one line, not as
    gradio's traceback after the model loaded."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError):
        raise ValueError(f"--host {host}: not an address of this machine; pass --host 127.0.0.1") from None
    with socket.socket(family, kind, proto) as s:
        # as uvicorn binds: a port left in TIME_WAIT by a server just stopped is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise ValueError(in_use(port) if e.errno == errno.EADDRINUSE else
                             f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); pass another "
                             "--host or --port") from None


def in_use(port: int) -> str:
    return f"--port {port}: in use; pass another --port"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_run_options(args)
        check_launch_files(args)  # before gradio's import, seconds long
        import gradio  # noqa: F401  (the optional extra: refused in one line when missing)
    except ImportError:
        print('error: the app needs gradio: pip install -e ".[ui]"', file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        check_port(args.host, args.port)
        session = Session(args)
    except (WeightsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ui = build_ui(session)
    ui.queue(default_concurrency_limit=1)  # one job at a time: the model's memory is held once
    print(f"PNGs go to {session.out}", flush=True)
    try:
        ui.launch(server_name=args.host, server_port=args.port, share=args.share, allowed_paths=[str(session.out)],
                  footer_links=[], css=CSS)
    except OSError as e:  # gradio's "Cannot find empty port": another server took it while the model loaded
        line = in_use(args.port) if "port" in str(e) else f"cannot start the server: {e}"
        print(f"error: {line.splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    plain_warnings()
    sys.exit(main())
