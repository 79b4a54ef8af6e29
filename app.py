"""`python app.py`: LoLDU Studio, a Gradio app to train kilobyte adapters from a few images and generate with them.

    python app.py                                  # the embedded toy world, offline (docs/toyworld.md)
    python app.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5   # GPU + Hub

Only the UI lives here; the logic (library, shared pipeline, training jobs, validation) is in loldu_sd/studio/.
Nothing heavy happens at import: the model loads on first use.
"""
import argparse
import base64
import functools
import html
import io
import json
import logging

import gradio as gr
import pandas as pd
from PIL import Image

from loldu_sd import toyworld
from loldu_sd.studio import (
    LIMITS,
    AdapterLibrary,
    MAX_IMAGES,
    MAX_COMPARE,
    MAX_MIX,
    CompareRequest,
    GenerateRequest,
    JobSnapshot,
    Studio,
    StudioError,
    TrainRequest,
    load_images,
    renamed,
    suggest_instance_prompt,
)

CSS = """
.loldu-bar {height: 14px; background: var(--neutral-200); border-radius: 7px; overflow: hidden; margin: 4px 0;}
.loldu-bar > div {height: 100%; background: var(--color-accent); transition: width .3s;}
.loldu-lib {width: 100%; border-collapse: collapse;}
.loldu-lib td, .loldu-lib th {padding: 4px 8px; border-bottom: 1px solid var(--neutral-200); text-align: left;}
.loldu-lib img {width: 64px; height: 64px; object-fit: cover; border-radius: 4px;}
"""


LIBRARY_ROWS = 200


# ---- presentation helpers -----------------------------------------------------------------------------------------
def _thumb_uri(im: Image.Image, size: int = 96) -> str:
    """A small JPEG data URI of a library sample (no file serving needed)."""
    im = im.copy()
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def library_html(library: AdapterLibrary) -> str:
    """The Library table: name, base model, rank, size in KB, creation time, sample image."""
    rows, (adapters, skipped) = [], library.scan()
    if len(adapters) > LIBRARY_ROWS:  # a thumbnail per row: a 10,000-adapter library would take minutes
        skipped = [f"showing the newest {LIBRARY_ROWS} of {len(adapters)} adapters (all are in the pickers)", *skipped]
    for a in adapters[:LIBRARY_ROWS]:
        sample = library.sample_image(a)
        img = f'<img src="{_thumb_uri(sample)}" alt="sample">' if sample else "<i>no sample</i>"
        note = f"<br><small>{html.escape(a.note)}</small>" if a.note else ""
        rows.append(f"<tr data-adapter=\"{html.escape(a.name)}\"><td>{img}</td><td><b>{html.escape(a.name)}</b>"
                    f"{note}</td><td>{html.escape(a.base_model)}</td><td>{a.rank or '?'}</td>"
                    f"<td class='size'>{a.size_kb:.1f} KB</td><td>{a.created_str}</td></tr>")
    notes = "".join(f"<p class='library-skipped'><small>{html.escape(n)}</small></p>" for n in skipped)
    if not rows:
        return f"<p id='library-empty'>The library is empty: train an adapter or import one below.</p>{notes}"
    head = "<tr><th>sample</th><th>name</th><th>base model</th><th>rank</th><th>size</th><th>created</th></tr>"
    return f"<table class='loldu-lib'>{head}{''.join(rows)}</table>{notes}"


def status_html(snap: JobSnapshot | None = None, text: str = "") -> str:
    """Progress bar and one status line for the Train tab."""
    if snap is None:
        return f"<div id='train-progress'><p>{html.escape(text)}</p></div>"
    frac = snap.step / max(snap.total, 1)
    loss = f" · loss {snap.losses[-1][1]:.4f}" if snap.losses else ""
    speed = f" · {snap.seconds_per_step:.2f} s/step" if snap.seconds_per_step else ""
    icon = {"done": "Done: ", "cancelled": "Cancelled: ", "failed": "Failed: "}.get(snap.state, "")
    return (f"<div id='train-progress' data-state='{snap.state}'><div class='loldu-bar'>"
            f"<div style='width:{100 * frac:.1f}%'></div></div>"
            f"<p>step {snap.step}/{snap.total}{loss}{speed}</p><p>{icon}{html.escape(snap.message)}</p></div>")


def loss_frame(snap: JobSnapshot | None) -> pd.DataFrame:
    """The loss curve as the LinePlot wants it."""
    frame = pd.DataFrame(snap.losses if snap else [], columns=["step", "loss"])
    return frame.astype({"step": int, "loss": float})  # typed even when empty, or the plot treats them as labels




def _error(e: Exception) -> gr.Error:
    return gr.Error(str(e), print_exception=False)


def _library_action(fn):
    """Turn a StudioError of a library button into a one-line Gradio error."""
    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except StudioError as e:
            raise _error(e) from None
    return wrapper


def show_thumbnails(files):
    """Decode the chosen images and show them; unreadable ones are named in a warning."""
    good = []
    for f in files or []:
        try:
            good += load_images([f], minimum=1)
        except StudioError as e:
            gr.Warning(str(e))
    if len(files or []) > MAX_IMAGES:
        gr.Warning(f"at most {MAX_IMAGES} images per run; remove {len(files) - MAX_IMAGES}")
    return good


# ---- event handlers ---------------------------------------------------------------------------------------------
class Events:
    """The UI's event handlers, bound to the one Studio that every session shares."""

    def __init__(self, studio: Studio):
        self.studio = studio

    def _request(self, files, instance_prompt, class_prompt, steps, rank, lr, seed, every, name) -> TrainRequest:
        """The Train form as a request; the toy world's small model trains on several photos a step."""
        batch = toyworld.TRAIN_BATCH_SIZE if toyworld.is_toyworld(self.studio.base_model) else 1
        return TrainRequest(list(files or []), instance_prompt, name, class_prompt, steps, rank, lr, seed, every,
                            batch_size=batch)

    def train_check(self, files, instance_prompt, class_prompt, steps, rank, lr, seed, every, name,
                    request: gr.Request):
        """Fast pre-queue check: validates the form, and tells the user when they will wait behind another job."""
        req = self._request(files, instance_prompt, class_prompt, steps, rank, lr, seed, every, name)
        try:
            req.validate(self.studio.library)
        except StudioError as e:
            raise _error(e) from None
        if self.studio.trainer.busy():
            if request and request.session_hash:
                self.studio.trainer.note_waiting(request.session_hash)  # so that Cancel can withdraw it
            return status_html(text="Another training job is running; you are queued and will start automatically "
                                    "when it finishes (Cancel withdraws it).")
        return status_html(text="Starting...")

    def train(self, files, instance_prompt, class_prompt, steps, rank, lr, seed, every, name, request: gr.Request):
        """Run one training job (one at a time: Gradio's queue) and stream progress, loss curve and previews."""
        req = self._request(files, instance_prompt, class_prompt, steps, rank, lr, seed, every, name)
        owner = request.session_hash if request else ""
        if owner and self.studio.trainer.take_waiting(owner):
            yield status_html(text="Cancelled before it started: nothing was trained."), loss_frame(None), []
            return
        try:  # StudioBusyError only for API callers that bypass the queue's concurrency limit
            job = self.studio.trainer.start(req, owner=owner or "")
        except StudioError as e:
            raise _error(e) from None
        snap = None
        for snap in job.snapshots():
            yield status_html(snap), loss_frame(snap), snap.previews
        if snap is not None and snap.state == "failed":
            gr.Warning(snap.message)

    def cancel(self, request: gr.Request):
        """Stop this session's training job after its current step, or withdraw it while it waits in the queue."""
        what = self.studio.trainer.cancel(owner=request.session_hash if request else None)
        if what == "running":
            gr.Info("cancelling after the current step; the last checkpoint will be saved")
        elif what == "queued":
            gr.Info("your queued training job is withdrawn; it will not start")
        else:
            gr.Warning("no training job of yours is running or queued")

    def generate(self, prompt, negative, steps, guidance, seed, num_images, *mix):
        """Generate images with the picked adapters mixed by weight."""
        pairs = [(mix[i], mix[i + 1]) for i in range(0, len(mix), 2) if mix[i]]
        try:
            out = self.studio.generate(GenerateRequest(prompt, pairs, negative, steps, guidance, seed, num_images))
        except StudioError as e:
            raise _error(e) from None
        used = ", ".join(f"{n} × {w:g}" for n, w in pairs) or "no adapter (base model)"
        return out.images, (f"{len(out.images)} image(s) with {used} · adapters ready in "
                            f"{1000 * out.switch_seconds:.0f} ms · denoising {out.seconds:.1f} s")

    def compare(self, prompt, negative, steps, guidance, seed, include_base, names):
        """One prompt for the picked concepts (and the base model) in one batch, shown side by side."""
        try:
            out = self.studio.compare(CompareRequest(prompt, list(names or []), include_base, negative, steps,
                                                     guidance, seed))
        except StudioError as e:
            raise _error(e) from None
        return list(zip(out.images, out.labels)), (f"{len(out.images)} images in one batch: "
                                                   f"{', '.join(out.labels)} · denoising {out.seconds:.1f} s")

    def refresh(self, *picked):
        """Re-read the library from disk: the table and every adapter dropdown (keeping valid selections)."""
        names = self.studio.library.names()
        keep = [[n for n in p if n in names] if isinstance(p, list) else p if p in names else None for p in picked]
        return (library_html(self.studio.library), *[gr.update(choices=names, value=v) for v in keep])

    @_library_action
    def download(self, name):
        """A copy of the adapter file for the browser."""
        if not name:
            raise StudioError("pick an adapter first")
        return str(self.studio.download_path(name)), f"{name}: ready to download"

    @_library_action
    def export_lora(self, name, fmt):
        """The adapter as a standard LoRA file."""
        if not name:
            raise StudioError("pick an adapter first")
        path = self.studio.export_lora(name, fmt)
        return str(path), f"{name}: exported as a {fmt} LoRA ({path.stat().st_size / 1024:.1f} KB)"

    @_library_action
    def delete(self, name):
        """Delete an adapter (the browser asked for confirmation)."""
        if not name:
            return None, "nothing deleted"
        self.studio.delete_adapter(name)
        return None, f"{name}: deleted"

    @_library_action
    def rename(self, name, new):
        """Rename an adapter."""
        if not name:
            raise StudioError("pick an adapter first")
        info = self.studio.rename_adapter(name, new)
        return None, f"{name} renamed to {info.name}{renamed(new, info.name)}"

    @_library_action
    def import_adapter(self, upload, name):
        """Validate an uploaded .safetensors adapter against the base model and add it to the library."""
        if not upload:
            raise StudioError("choose a .safetensors adapter file first")
        info = self.studio.import_adapter(upload, name or None)
        note = renamed(name, info.name) if name else ""
        return None, f"imported {info.name} ({info.size_kb:.1f} KB, rank {info.rank}){note}"


# ---- layout: one builder per tab ----------------------------------------------------------------------------------
def build_demo(studio: Studio) -> gr.Blocks:
    """The four-tab UI (Train, Generate, Compare, Library) bound to one Studio."""
    events = Events(studio)
    with gr.Blocks(title="LoLDU Studio", analytics_enabled=False) as demo:
        gr.Markdown(f"# LoLDU Studio\nKilobyte adapters for Stable Diffusion "
                    f"([LoLDU](https://arxiv.org/abs/2410.13618)) · base model `{html.escape(studio.base_model)}`")
        trained = train_tab(events)
        gen_tab, gen_picks = generate_tab(events)
        cmp_tab, cmp_pick = compare_tab(events)
        lib_tab, refresh_args = library_tab(events, [*gen_picks, cmp_pick])
        trained.then(**refresh_args)
        gen_tab.select(**refresh_args)  # every session re-reads the shared library from disk
        cmp_tab.select(**refresh_args)
        lib_tab.select(**refresh_args)
        demo.load(**refresh_args)
    return demo


def sample_concept():
    """Files, class noun, instance prompt and name of the toy world's sample concept."""
    meta = toyworld.CONCEPTS_DIR / f"{toyworld.SAMPLE_CONCEPT}.json"
    noun = json.loads(meta.read_text())["class_noun"]
    return toyworld.sample_concept_files(), noun, f"a photo of a sks {noun}", toyworld.SAMPLE_CONCEPT


def train_tab(events: Events):
    """The Train tab; returns the training event, so that the library can refresh after it."""
    toy = toyworld.is_toyworld(events.studio.base_model)
    with gr.Tab("Train", id="train"):
        with gr.Row():
            with gr.Column():
                files = gr.File(label=f"Concept images (3-5 work best, at most {MAX_IMAGES}; PNG/JPEG/WebP, "
                                      "≤ 20 MB each)", file_count="multiple", file_types=["image"],
                                elem_id="train-images")
                thumbs = gr.Gallery(label="Your images", columns=5, height=150, interactive=False,
                                    elem_id="train-thumbs")
                with gr.Row():
                    noun = gr.Textbox(label="What is it? (class noun)", placeholder="robot", scale=2,
                                      elem_id="class-noun")
                    suggest = gr.Button("Suggest prompt", scale=1)
                instance_prompt = gr.Textbox(label="Instance prompt", placeholder="a photo of sks robot",
                                             elem_id="instance-prompt")
                class_prompt = gr.Textbox(label="Class prompt (optional: prior preservation)",
                                          placeholder="a photo of a robot")
                name = gr.Textbox(label="Adapter name", placeholder="my-robot", elem_id="adapter-name")
                with gr.Accordion("Settings", open=False):
                    steps = gr.Slider(*LIMITS.train_steps, value=toyworld.TRAIN_STEPS if toy else 100, step=1,
                                      label="Steps", elem_id="train-steps")
                    rank = gr.Slider(*LIMITS.rank, value=32, step=1, label="Rank")
                    lr = gr.Number(value=toyworld.LEARNING_RATE if toy else 5e-4, label="Learning rate",
                                   minimum=LIMITS.learning_rate[0],
                                   maximum=LIMITS.learning_rate[1], elem_id="train-lr")
                    seed = gr.Number(value=42, precision=0, label="Seed")
                    every = gr.Slider(*LIMITS.validation_every, value=25, step=1, label="Preview every N steps",
                                      elem_id="train-every")
                if toy:
                    sample = gr.Button(f"Use the sample concept (the toy world's '{toyworld.SAMPLE_CONCEPT}')",
                                       size="sm", elem_id="sample-concept")
                with gr.Row():
                    start = gr.Button("Start training", variant="primary", elem_id="train-start")
                    stop = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
            with gr.Column():
                status = gr.HTML(status_html(text="Upload 3-5 images, write a prompt, press Start."),
                                 elem_id="train-status")
                loss_plot = gr.LinePlot(loss_frame(None), x="step", y="loss", title="Training loss",
                                        height=240, elem_id="loss-plot")
                previews = gr.Gallery(label="Validation previews", columns=4, height=200, elem_id="train-previews")
    if toy:
        sample.click(sample_concept, None, [files, noun, instance_prompt, name], api_visibility="private")
    files.change(show_thumbnails, files, thumbs, api_visibility="private")
    suggest.click(suggest_instance_prompt, noun, instance_prompt, api_visibility="private")
    stop.click(events.cancel, None, None, api_name="cancel", concurrency_limit=None)
    inputs = [files, instance_prompt, class_prompt, steps, rank, lr, seed, every, name]
    return start.click(events.train_check, inputs, status, api_visibility="private").success(
        events.train, inputs, [status, loss_plot, previews], api_name="train", concurrency_limit=1,
        concurrency_id="train", show_progress="minimal", show_progress_on=[status])


def default_guidance(events: Events) -> float:
    """Guidance scale the base model was made for: SD's 7.5, or the toy world's own."""
    return toyworld.GUIDANCE_SCALE if toyworld.is_toyworld(events.studio.base_model) else 7.5


def sampling_fields(prefix: str, seed_label: str, guidance: float = 7.5) -> tuple:
    """Prompt, negative prompt, steps, guidance and seed inputs (elem_ids `{prefix}-prompt`, `{prefix}-steps`)."""
    prompt = gr.Textbox(label="Prompt", placeholder="a photo of sks robot on the beach", elem_id=f"{prefix}-prompt")
    negative = gr.Textbox(label="Negative prompt", placeholder="blurry, low quality")
    with gr.Row():
        steps = gr.Slider(*LIMITS.gen_steps, value=25, step=1, label="Steps", elem_id=f"{prefix}-steps")
        guidance = gr.Slider(*LIMITS.guidance, value=guidance, step=0.5, label="Guidance")
        seed = gr.Number(value=0, precision=0, label=seed_label)
    return prompt, negative, steps, guidance, seed


def generate_tab(events: Events):
    """The Generate tab; returns it and its adapter dropdowns (the library refresh updates them)."""
    with gr.Tab("Generate", id="generate") as tab:
        slots = []
        with gr.Row():
            for i in range(MAX_MIX):
                with gr.Column(min_width=200):
                    pick = gr.Dropdown(choices=[], value=None, label=f"Adapter {i + 1}", allow_custom_value=True,
                                       elem_id=f"gen-adapter-{i}")
                    weight = gr.Slider(*LIMITS.weight, value=1.0, step=0.05, label="weight")
                    slots += [pick, weight]
        prompt, negative, steps, guidance, seed = sampling_fields("gen", "Seed", default_guidance(events))
        with gr.Row():
            n_images = gr.Slider(*LIMITS.num_images, value=1, step=1, label="Images")
        go = gr.Button("Generate", variant="primary", elem_id="gen-go")
        gallery = gr.Gallery(label="Results", columns=4, height=320, object_fit="contain", elem_id="gen-gallery")
        status = gr.Markdown(elem_id="gen-status")
    go.click(events.generate, [prompt, negative, steps, guidance, seed, n_images, *slots], [gallery, status],
             api_name="generate", concurrency_limit=1, concurrency_id="generate")
    return tab, slots[::2]


def compare_tab(events: Events):
    """The Compare tab: one prompt for up to MAX_COMPARE concepts in one batch; returns it and its dropdown."""
    with gr.Tab("Compare", id="compare") as tab:
        with gr.Row():
            pick = gr.Dropdown(choices=[], value=[], multiselect=True, max_choices=MAX_COMPARE, scale=3,
                               allow_custom_value=True, label=f"Concepts (up to {MAX_COMPARE})",
                               elem_id="cmp-adapters")
            base = gr.Checkbox(value=True, label="Also the base model", elem_id="cmp-base")
        prompt, negative, steps, guidance, seed = sampling_fields("cmp", "Seed (the same noise for every concept)",
                                                                  default_guidance(events))
        go = gr.Button("Compare", variant="primary", elem_id="cmp-go")
        gallery = gr.Gallery(label="One batch, one image per concept", columns=MAX_COMPARE + 1, height=320,
                             object_fit="contain", elem_id="cmp-gallery")
        status = gr.Markdown(elem_id="cmp-status")
    go.click(events.compare, [prompt, negative, steps, guidance, seed, base, pick], [gallery, status],
             api_name="compare", concurrency_limit=1, concurrency_id="generate")
    return tab, pick


def library_tab(events: Events, gen_picks: list):
    """The Library tab; returns it and the refresh event arguments (table and every adapter dropdown)."""
    with gr.Tab("Library", id="library") as tab:
        refresh = gr.Button("Refresh", size="sm")
        table = gr.HTML(elem_id="library-table")
        with gr.Row():
            chosen = gr.Dropdown(choices=[], value=None, label="Adapter", allow_custom_value=True,
                                 elem_id="lib-adapter")
            new_name = gr.Textbox(label="New name")
            fmt = gr.Radio(["diffusers", "kohya"], value="diffusers", label="LoRA format")
        with gr.Row():
            dl = gr.Button("Download")
            ren = gr.Button("Rename")
            exp = gr.Button("Export as LoRA")
            rm = gr.Button("Delete", variant="stop")
        out_file = gr.File(label="Download / exported file", interactive=False, height=90)
        with gr.Row():
            upload = gr.File(label="Import a LoLDU adapter (.safetensors)", file_types=[".safetensors"])
            import_name = gr.Textbox(label="Name (default: file name)")
            imp = gr.Button("Import")
        status = gr.Markdown(elem_id="lib-status")
    picks = [*gen_picks, chosen]
    refresh_args = dict(fn=events.refresh, inputs=picks, outputs=[table, *picks], api_visibility="private")
    refresh.click(**refresh_args)
    for button, fn, inputs, js in [
            (dl, events.download, [chosen], None), (exp, events.export_lora, [chosen, fmt], None),
            (rm, events.delete, [chosen], "(n) => (n && confirm('Delete adapter ' + n + '?')) ? n : ''"),
            (ren, events.rename, [chosen, new_name], None), (imp, events.import_adapter, [upload, import_name], None)]:
        button.click(fn, inputs, [out_file, status], js=js, api_name=fn.__name__).then(**refresh_args)
    return tab, refresh_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained_model_name_or_path", default=str(toyworld.PIPELINE_DIR),
                   help="Hub id or local diffusers folder of the base model (default: the embedded toy world).")
    p.add_argument("--library_dir", default="library", help="Folder of saved adapters (created if missing).")
    p.add_argument("--host", default="127.0.0.1", help="Interface to bind (default: loopback only).")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="Also open a public Gradio share link (off by default).")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available).")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Start the studio."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    demo = build_demo(Studio(args.pretrained_model_name_or_path, args.library_dir, device=args.device))
    demo.queue(default_concurrency_limit=4).launch(
        server_name=args.host, server_port=args.port, share=args.share, max_file_size="20mb",
        footer_links=["api", "gradio"], css=CSS)


if __name__ == "__main__":
    main()
