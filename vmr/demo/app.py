"""Streamlit demo: find the moments of a sentence in a video.

    vmr demo [--checkpoint DIR] [--index IDX] [--port P] [--host 127.0.0.1] [--max-upload-mb MB]
    streamlit run vmr/demo/app.py -- --checkpoint DIR [--index IDX]

The model is an inference bundle (or a run directory); without one the app uses the quickstart's
model when it exists. It is loaded once per process and cached across reruns; the encoding of the
video on the page is kept across questions. With an index (``vmr index``), a second page searches
the whole collection. Bad input (not a
video, a corrupt video, a file over the size limit, an empty query) gets a message in the page
and the app stays usable.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import streamlit as st

from vmr.data.annotations import VIDEO_EXTENSIONS

VIDEO_TYPES = list(VIDEO_EXTENSIONS)  # what the uploader takes: the containers a video id may name
QUICKSTART = (Path("runs/quickstart/export_best"), Path("runs/quickstart/export"))


def checkpoint_argument() -> tuple[Path | None, bool]:
    """The bundle to load and whether the user named it (``--checkpoint`` or VMR_DEMO_CHECKPOINT)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--checkpoint")
    args, _ = parser.parse_known_args(sys.argv[1:])
    named = args.checkpoint or os.environ.get("VMR_DEMO_CHECKPOINT")
    if named:
        return Path(named), True
    return next((p for p in QUICKSTART if (p / "model.safetensors").is_file()), None), False


def index_argument() -> Path | None:
    """The index to search (``--index`` or VMR_DEMO_INDEX), if the demo was started with one."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--index")
    args, _ = parser.parse_known_args(sys.argv[1:])
    named = args.index or os.environ.get("VMR_DEMO_INDEX")
    return Path(named) if named else None


@st.cache_resource(show_spinner="Opening the index ...")
def open_index(checkpoint: str, folder: str):
    """The opened index (vmr/search.py) and its record; once per process."""
    from vmr.search import Index, read_index

    model, _ = load_model(checkpoint)
    return Index.open(folder, model), read_index(Path(folder))


def search_page(checkpoint: Path, folder: Path, top_k: int) -> None:
    """Search the whole indexed collection for a sentence: the best moments over all its videos."""
    import pandas as pd

    from vmr.errors import UserError
    from vmr.search import index_videos

    try:
        index, record = open_index(str(checkpoint), str(folder))
    except UserError as error:
        st.error(f"Cannot open the index: {error}")
        return
    st.caption(f"{len(index)} videos in {folder}"
               + (f"; {len(index.skipped)} unreadable ones left out" if index.skipped else ""))
    query = st.text_input("Sentence", placeholder="a red circle moves left", key="search_query")
    if st.button("Search", type="primary"):
        try:
            start = time.perf_counter()
            st.session_state["found"] = {**index.search(query, top_k), "seconds": time.perf_counter() - start}
        except UserError as error:
            st.session_state.pop("found", None)
            st.error(str(error))
    found = st.session_state.get("found")
    if not found:
        return
    st.subheader(f"Best moments for \u201c{found['query']}\u201d")
    st.caption(f"Searched {found['videos']} videos in {found['seconds']:.2f} s ({found['reranked']} reranked by the "
               "full model after the shortlist)")
    st.dataframe(pd.DataFrame([{"rank": i + 1, "video": r["video"], "start (s)": round(r["start"], 2),
                                "end (s)": round(r["end"], 2), "score": round(r["score"], 3)}
                               for i, r in enumerate(found["results"])]), hide_index=True, width="stretch")
    files = index_videos(record)  # never more than `vmr index --videos` would read there
    playable = [i for i, r in enumerate(found["results"]) if r["video"] in files]
    if playable:
        choice = st.radio("Play", playable, horizontal=True, format_func=lambda i: f"#{i + 1}")
        hit = found["results"][choice]
        st.video(str(files[hit["video"]]), start_time=int(hit["start"]))


@st.cache_resource(show_spinner="Loading the model ...")
def load_model(checkpoint: str):
    from vmr.bundle import load_model as load

    return load(checkpoint)


@st.cache_resource(show_spinner="Making the sample videos ...")
def sample_videos() -> dict[str, dict]:
    """Three synthetic videos with their ground truth (made once per process, deterministic)."""
    import json

    from vmr.synth import synthesize

    folder = Path(tempfile.gettempdir()) / "vmr-demo-samples"
    if not (folder / "val.jsonl").is_file():
        synthesize(folder, videos=3, queries_per_video=4, min_duration=20, max_duration=30, fps=8, size=128,
                   val_fraction=0.0, seed=11, progress=False)
    samples: dict[str, dict] = {}
    for line in (folder / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        entry = samples.setdefault(row["vid"], {"path": folder / "videos" / f"{row['vid']}.mp4", "queries": {}})
        entry["queries"][row["query"]] = row["relevant_windows"]
    return samples


def thumbnail(video: Path | bytes, seconds: float):
    """The frame shown at ``seconds`` of a file or its bytes, as an HWC uint8 array, or None if it
    cannot be decoded."""
    from vmr.data.video import open_video

    try:
        decoder = open_video(video)  # by presentation time, as the model read it (variable frame rates)
        start = float(decoder.metadata.begin_stream_seconds or 0.0)
        end = decoder.metadata.end_stream_seconds or seconds
        frame = decoder.get_frames_played_at([min(seconds + start, max(start, float(end) - 1e-3))]).data[0]
    except (RuntimeError, ValueError, IndexError):
        return None
    return frame.permute(1, 2, 0).numpy()


def scores_chart(result: dict, truth: list | None):
    import altair as alt
    import pandas as pd

    scores = pd.DataFrame({"time (s)": result["frame_times"], "score": result["frame_scores"]})
    moments = pd.DataFrame([{"start": m["start"], "end": m["end"], "what": f"moment {i + 1}"}
                            for i, m in enumerate(result["moments"])])
    layers = []
    if truth:
        gt = pd.DataFrame([{"start": s, "end": e, "what": "ground truth"} for s, e in truth])
        layers.append(alt.Chart(gt).mark_rect(opacity=0.25, color="green").encode(x="start:Q", x2="end:Q"))
    if len(moments):
        layers.append(alt.Chart(moments).mark_rect(opacity=0.2, color="orange").encode(
            x="start:Q", x2="end:Q", tooltip=["what", "start", "end"]))
    layers.append(alt.Chart(scores).mark_line(point=True).encode(
        x=alt.X("time (s)", scale=alt.Scale(domain=[0, result["duration"]])),
        y=alt.Y("score", scale=alt.Scale(domain=[0, 1]))))
    return alt.layer(*layers).properties(height=220)


def find_moments(model, cfg, video: Path | tuple[str, bytes], query: str, top_k: int, nms_iou: float) -> dict:
    """``vmr predict``'s result plus the processing time (raises UserError on a bad video or query).
    ``video`` is a file, or an upload's (name, bytes), read from memory (never written to disk), so
    messages name the user's file. The video's encoding (vmr/encode.py) is kept in the session:
    another question on the same video runs only the text side and the layers above."""
    import hashlib

    from vmr.encode import encode_video
    from vmr.errors import UserError
    from vmr.text import check_query

    if not query.strip():
        raise UserError("Type a query first, e.g. 'a red circle moves left'.")
    check_query(model.tokenizer, query)
    start = time.perf_counter()
    if isinstance(video, Path):
        key, source, name = ("file", str(video), video.stat().st_mtime_ns), video, str(video)
    else:
        name, data = video
        key, source = ("upload", name, hashlib.sha256(data).hexdigest()), data
    kept = st.session_state.get("encoding")
    reused = kept is not None and kept[0] == key
    if not reused:
        st.session_state.pop("encoding", None)
        encoded = encode_video(model, source, video_id=Path(name).stem if isinstance(video, Path) else name)
        st.session_state["encoding"] = (key, encoded)
    result = st.session_state["encoding"][1].ask(model, query, top_k, nms_iou, video=name)[0]
    return {**result, "seconds": time.perf_counter() - start, "reused": reused}


def show_results(result: dict, truth: list | None, media: Path | bytes) -> None:
    import pandas as pd

    st.subheader(f"Moments for \u201c{result['query']}\u201d")
    sampling = result["sampling"]
    st.caption(f"Processed in {result['seconds']:.2f} s: {sampling['frames']} frames scored over "
               f"{result['duration']:.1f} s of video, in {sampling['windows']} window(s)"
               + (" (the video's encoding from an earlier question was reused)" if result.get("reused") else ""))
    if not result["moments"]:
        st.info("No moment found for this query.")
        return
    table = pd.DataFrame([{"rank": i + 1, "start (s)": round(m["start"], 2), "end (s)": round(m["end"], 2),
                           "length (s)": round(m["end"] - m["start"], 2), "score": round(m["score"], 3)}
                          for i, m in enumerate(result["moments"])])
    st.dataframe(table, hide_index=True, width="stretch")
    player, chart = st.columns([2, 3])
    with player:
        choice = st.radio("Play moment", list(range(len(result["moments"]))), horizontal=True,
                          format_func=lambda i: f"#{i + 1} at {result['moments'][i]['start']:.1f} s")
        st.video(media if isinstance(media, bytes) else str(media), start_time=int(result["moments"][choice]["start"]))
    with chart:
        st.altair_chart(scores_chart(result, truth), width="stretch")
    columns = st.columns(len(result["moments"]))
    for i, (column, moment) in enumerate(zip(columns, result["moments"], strict=True)):
        image = thumbnail(media, moment["start"])
        if image is not None:
            column.image(image, caption=f"#{i + 1}: {moment['start']:.1f}-{moment['end']:.1f} s", width="stretch")


def main() -> None:
    from vmr.demo import upload_limit_mb
    from vmr.errors import UserError

    st.set_page_config(page_title="vmr: find moments in a video", layout="wide")
    st.title("Find moments in a video")
    try:
        max_upload_mb = upload_limit_mb()
    except UserError as error:
        st.error(str(error))
        st.stop()
    checkpoint, named = checkpoint_argument()
    if checkpoint is None:
        st.warning("No model to load. Start the demo with `vmr demo --checkpoint DIR` (an inference bundle or "
                   "a run directory), or run `make quickstart` first to train the sample model.")
        st.stop()
    if not named:
        st.info(f"No --checkpoint given: using the quickstart's model ({checkpoint}).")
    try:
        model, cfg = load_model(str(checkpoint))
    except UserError as error:
        st.error(f"Cannot load the model: {error}")
        st.stop()

    with st.sidebar:
        st.header("Settings")
        spec = model.sampling
        st.markdown(f"**Time resolution:** one frame every {1 / spec.fps:.2f} s ({spec.fps:g} frames/s), "
                    f"the whole video, seen in windows of {spec.window / spec.fps:g} s ({spec.window} frames)")
        top_k = st.slider("Top-k moments", 1, 10, 5)
        nms_iou = st.slider("NMS IoU threshold", 0.1, 0.95, float(model.config.nms_iou), 0.05)
        st.caption(f"Model: {checkpoint}")

    index = index_argument()
    if index is not None and st.radio("Page", ["One video", "Search the collection"], horizontal=True,
                                      key="page") == "Search the collection":
        search_page(checkpoint, index, top_k)
        return
    source = st.radio("Video", ["Bundled sample", "Upload a video"], horizontal=True)
    video, media, name, truth_by_query, suggestion = None, None, None, {}, ""
    if source == "Bundled sample":
        samples = sample_videos()
        name = st.selectbox("Sample", sorted(samples))
        video = media = samples[name]["path"]
        name, truth_by_query = str(video), samples[name]["queries"]
        suggestion = next(iter(truth_by_query))
        st.caption("Its events: " + "; ".join(truth_by_query))
    else:
        uploaded = st.file_uploader(f"A video file ({', '.join(VIDEO_TYPES).upper()}, up to {max_upload_mb:g} MB)",
                                    type=VIDEO_TYPES)
        if uploaded is not None:
            if uploaded.size > max_upload_mb * 2**20:
                st.error(f"{uploaded.name} is {uploaded.size / 2**20:.1f} MB, over the {max_upload_mb:g} MB limit.")
            else:
                # Kept in this session's memory only; on disk just while the model reads it.
                name, media = uploaded.name, uploaded.getvalue()
                video = (name, media)
    query = st.text_input("Query", value=suggestion, placeholder="a red circle moves left")

    if st.button("Find moments", type="primary", disabled=video is None):
        try:
            st.session_state["result"] = find_moments(model, cfg, video, query, top_k, nms_iou)
        except UserError as error:
            st.session_state.pop("result", None)
            st.error(str(error))
    result = st.session_state.get("result")
    if result is not None and result["video"] == name:
        show_results(result, truth_by_query.get(result["query"]), media)


# Streamlit runs this file as __main__. The guard matters: after an in-process run (AppTest) the
# interpreter's __main__ can still point here, and a process pool started later re-imports
# __main__ in every worker, which must not start the app.
if __name__ == "__main__":
    main()
