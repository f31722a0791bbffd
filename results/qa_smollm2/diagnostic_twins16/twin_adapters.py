"""How different are the adapters of a training passage, its answer-swapped twin and an unrelated passage?

    python results/qa_smollm2/diagnostic_twins16/twin_adapters.py WORKDIR STEP > OUT.json

For 12 (passage, twin) pairs of the 16-paragraph file, per adapted layer, the effective weight change
dW = B^T A of the passage's adapter is compared with the twin's ("twin"), with an unrelated training
passage's ("unrelated"), and with the bias LoRA's alone ("generated_share"): mean relative distances
||dW - dW_other|| / ||dW||.
"""
import sys, json
import numpy as np
import jax
from d2l_jax.api import D2L
from d2l_jax.data.qa_sets import QASource

workdir, step = sys.argv[1], int(sys.argv[2])
d2l = D2L.load(workdir, step=step)
S = "/work/runs/overfit/squad16.json"
orig = QASource(S, split="all", template="none").records
swapped = QASource(S, split="all", template="none", context="answer_swapped").records
by_prompt = {r["prompt"]: r for r in orig}
pairs = [(by_prompt[s["prompt"]]["context"], s["context"]) for s in swapped if s["prompt"] in by_prompt][:12]
contexts = sorted({p for p, _ in pairs})
def delta(adapter):
    lora = adapter.lora
    out = {}
    for m in lora.A:
        A, B = np.asarray(lora.A[m][0], np.float32), np.asarray(lora.B[m][0], np.float32)
        for l in range(A.shape[0]):
            if np.abs(A[l]).sum() and np.abs(B[l]).sum():
                out[f"{m}.{l}"] = np.einsum("ro,ri->oi", B[l], A[l])
    return out
out = []
for i, (p, s) in enumerate(pairs):
    other = next(c for c in contexts if c != p)
    fa, fs, fo = (delta(x) for x in d2l.adapters([p, s, other]))
    fb = delta(d2l.adapters([p], scaler=0.0)[0])
    row = {}
    for k in fa:
        x, y, z, b = fa[k], fs[k], fo[k], fb.get(k, 0 * fa[k])
        n = np.linalg.norm(x)
        row[k] = [float(np.linalg.norm(x - y) / n), float(np.linalg.norm(x - z) / n), float(np.linalg.norm(x - b) / n)]
    out.append(row)
keys = out[0].keys()
print(json.dumps({k: {"twin": float(np.mean([r[k][0] for r in out])), "unrelated": float(np.mean([r[k][1] for r in out])), "generated_share": float(np.mean([r[k][2] for r in out]))} for k in keys}, indent=1))
