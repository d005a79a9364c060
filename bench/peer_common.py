"""Shared helpers for the Python peers the classifier is benchmarked against.

Imported by bench/peer_litert.py, bench/peer_sequential.py and
bench/peer_service.py (not run on its own). The peers must preprocess and
report exactly alike, so that the only difference between them, and between
them and the Rust tool, is the flow.
Standard library for HTTP; Pillow, NumPy and ai-edge-litert for the rest.
"""
import argparse
import csv
import io
import json
import urllib.error
import urllib.request

import numpy as np
from PIL import Image
from ai_edge_litert.interpreter import Interpreter

TOP_K = 3  # the output format of the Rust tool's default --top-k


def parse_args(doc):
    """The CLI both peers share, so bench.py can call them interchangeably."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", required=True, help="URL of the .tflite model")
    p.add_argument("--labels", required=True, help="URL of the label map (CSV id,name or text)")
    p.add_argument("--threads", type=int, default=2, help="LiteRT CPU threads")
    p.add_argument("--concurrency", type=int, default=16, help="parallel downloads")
    p.add_argument("images", nargs="+", metavar="IMAGE_URL")
    return p.parse_args()


def fetch(url, timeout=60):
    """Download a URL whole; urlopen raises on 4xx/5xx, so a body is always good."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def describe(exc):
    """A short one-line error, in the style of the Rust tool ("HTTP 404 Not Found")."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot fetch: {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def parse_labels(data):
    """Map class index -> name, from a CSV with an id,name header or one label a line.

    The birds CSV lists rows out of id order (964,background comes first), so
    the id column is used, never the row number.
    """
    text = data.decode("utf-8-sig")
    lines = text.splitlines()
    if lines and lines[0].strip().lower().replace(" ", "") == "id,name":
        return {int(row[0]): row[1] for row in csv.reader(lines[1:]) if row}
    return dict(enumerate(line.strip() for line in lines))


def make_interpreter(model_bytes, threads):
    """Build an interpreter from bytes; LiteRT applies XNNPACK by default on CPU."""
    interp = Interpreter(model_content=model_bytes, num_threads=threads)
    interp.allocate_tensors()
    return interp


def preprocess(image_bytes, input_detail):
    """Decode, convert to RGB and resize bilinearly to the model's input, as the reference did.

    Needs only the input details (not the interpreter), so it can run in worker
    threads while the single interpreter is busy elsewhere.
    """
    _, height, width, _ = input_detail["shape"]
    img = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    pixels = np.asarray(img.resize((int(width), int(height)), Image.BILINEAR), dtype=np.uint8)
    dtype = input_detail["dtype"]
    if dtype == np.uint8:
        # Quantized uint8 models expect raw pixels: their own scale/zero point
        # turn them into the real values the network was trained on.
        batch = pixels
    elif dtype == np.int8:
        # int8 models converted from uint8 ones keep the scale and shift the zero
        # point by 128, so shifting the pixels by 128 is the same input.
        batch = (pixels.astype(np.int16) - 128).astype(np.int8)
    else:
        # Float models (MobileNet family) expect pixels in [-1, 1].
        batch = pixels.astype(np.float32) / 127.5 - 1.0
    return batch[np.newaxis, ...]


def infer(interp, batch):
    """Run one image; return the class scores as floats (dequantized if needed)."""
    interp.set_tensor(interp.get_input_details()[0]["index"], batch)
    interp.invoke()
    out = interp.get_output_details()[0]
    raw = interp.get_tensor(out["index"])[0]
    scale, zero_point = out["quantization"]
    if scale:  # a scale of 0 means the output is not quantized
        return (raw.astype(np.float32) - zero_point) * scale
    return raw.astype(np.float32)


def result_record(source, scores, labels, k=TOP_K):
    """The Rust tool's record: top-k best first, ties broken by lower index."""
    top = np.argsort(-scores, kind="stable")[:k]
    preds = [{"label": labels.get(int(i), str(int(i))), "index": int(i),
              "score": round(float(scores[i]), 6)} for i in top]
    return {"source": source, "predictions": preds}


def result_line(source, scores, labels, k=TOP_K):
    """The Rust tool's JSON line (see result_record)."""
    return json.dumps(result_record(source, scores, labels, k))


def error_line(source, exc):
    return json.dumps({"source": source, "error": describe(exc)})
