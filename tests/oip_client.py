"""tritonclient.http against `classifier serve`'s Open Inference Protocol v2.

Usage: oip_client.py HOST:PORT MODEL CLASSES IMAGE LABEL [IMAGE LABEL ...]

Each IMAGE is a file whose top-1 class is LABEL. Run by tests/oip.rs; exits
non-zero (an assertion) on the first answer that is not as expected.
"""

import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def parse_class(text):
    """Triton's classification string: score:index:label (the label may hold
    ':'); bytes from a binary answer, str from a JSON one."""
    if isinstance(text, bytes):
        text = text.decode()
    score, index, label = text.split(":", 2)
    return float(score), int(index), label


def main():
    url, model, classes = sys.argv[1], sys.argv[2], int(sys.argv[3])
    pairs = sys.argv[4:]
    files, labels = pairs[0::2], pairs[1::2]
    assert files and len(files) == len(labels), "give IMAGE LABEL pairs"
    n = len(files)

    client = httpclient.InferenceServerClient(url=url)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(model)
    assert client.is_model_ready(model, model_version="1")
    server = client.get_server_metadata()
    assert server["name"] == "classifier", server
    assert {"classification", "binary_tensor_data"} <= set(server["extensions"]), server
    metadata = client.get_model_metadata(model)
    assert metadata["name"] == model, metadata
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}], metadata
    assert metadata["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1, classes]}], metadata
    print(f"metadata: {metadata}")

    images = np.array([open(f, "rb").read() for f in files], dtype=np.object_)
    image = httpclient.InferInput("image", [n], "BYTES")
    image.set_data_from_numpy(images)

    # The classification extension, in binary (tritonclient's default).
    top3 = httpclient.InferRequestedOutput("scores", class_count=3)
    result = client.infer(model, [image], outputs=[top3], request_id="top3")
    assert result.get_response()["id"] == "top3", result.get_response()
    ranked = result.as_numpy("scores")
    assert ranked.shape == (n, min(3, classes)), ranked.shape
    best = []
    for row, file, label in zip(ranked, files, labels):
        parsed = [parse_class(c) for c in row]
        print(f"{file}: {[c.decode() for c in row]}")
        assert parsed[0][2] == label, f"{file}: top-1 {parsed[0]}, expected {label!r}"
        scores = [p[0] for p in parsed]
        assert scores == sorted(scores, reverse=True), parsed
        best.append(parsed[0])

    # No output named: every score, FP32 in class order, in binary.
    result = client.infer(model, [image])
    scores = result.as_numpy("scores")
    assert scores.dtype == np.float32 and scores.shape == (n, classes), (scores.dtype, scores.shape)
    for row, top in zip(scores, ranked):
        top_scores = [parse_class(c)[0] for c in top]
        highest = sorted((float(s) for s in row), reverse=True)[: len(top_scores)]
        assert [round(s, 6) for s in highest] == top_scores, (highest, top_scores)
    for row, (score, index, label) in zip(scores, best):
        # Probabilities; a quantized softmax (the birds model's, in steps of
        # 1/256) rounds the many small ones down, so the sum may fall short.
        assert ((row >= 0) & (row <= 1)).all(), row
        assert float(row.sum()) <= 1.0 + 1e-3, row.sum()
        assert int(row.argmax()) == index, (row.argmax(), index)
        assert abs(float(row[index]) - score) < 1e-6, (row[index], score)

    # Outputs in JSON, the image sent on the versioned path.
    top1 = httpclient.InferRequestedOutput("scores", binary_data=False, class_count=1)
    result = client.infer(model, [image], outputs=[top1], model_version="1")
    json_top1 = [parse_class(row[0])[2] for row in result.as_numpy("scores")]
    assert json_top1 == labels, json_top1

    # Compressed requests.
    result = client.infer(model, [image], outputs=[top3], request_compression_algorithm="gzip")
    assert [parse_class(row[0])[2] for row in result.as_numpy("scores")] == labels

    # Errors come back as tritonclient's exceptions, with the server's message.
    try:
        client.infer("no-such-model", [image])
        raise AssertionError("an unknown model was answered")
    except InferenceServerException as e:
        assert e.status() == "404" and "unknown model" in e.message(), (e.status(), e.message())
    broken = httpclient.InferInput("image", [1], "BYTES")
    broken.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    try:
        client.infer(model, [broken])
        raise AssertionError("a broken image was answered")
    except InferenceServerException as e:
        assert e.status() == "400" and 'input "image" element 0' in e.message(), (e.status(), e.message())
    print(f"ok: {n} images through tritonclient {httpclient.__name__}")


if __name__ == "__main__":
    main()
